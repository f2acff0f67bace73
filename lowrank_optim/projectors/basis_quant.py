"""Blockwise-quantized storage of an explicit basis (the ``basis_bits`` option of the matrix projectors).

Formats, for a basis P read in flat row-major order:
  * 32: ``proj_<side>`` fp32, as before.
  * 8:  the project's 8-bit state format (``lowrank_optim.quant``, signed dynamic map, blocks of 256):
        ``proj_<side>_codes`` uint8 shaped like P and ``proj_<side>_absmax`` fp32 per block.
  * 4:  symmetric linear int4 per block of ``INT4_BLOCK`` = 64 entries: ``q = round(x / absmax * 7)`` in [-7, 7],
        stored as the nibble ``q + 8``, two per byte (even flat index in the low nibble), in ``proj_<side>_int4``
        (flat uint8, ceil(numel / 2) bytes), with ``proj_<side>_absmax`` fp32 per block. ``x ~ q * absmax / 7``.
The basis is dequantized to fp32 on every use; what is stored, not the bits option, decides how it is read, so a
state saved with one setting still reads after a change of the option.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from .. import quant
from ..state_layout import StateTensor, rank_bytes, state_tensor

BASIS_BITS = (32, 8, 4)
INT4_BLOCK = 64
INT4_LEVELS = 7  # symmetric: codes -7..7, so 0 is exact and no level is wasted on one side


def int4_blocks(numel: int) -> int:
    return (numel + INT4_BLOCK - 1) // INT4_BLOCK


def quantize_int4(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (packed uint8 of ceil(numel / 2) bytes, fp32 absmax per block of 64)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = int4_blocks(n)
    blocks = F.pad(flat, (0, nb * INT4_BLOCK - n)).view(nb, INT4_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)  # all-zero block: codes 0
    q = torch.round(blocks / safe * INT4_LEVELS).clamp_(-INT4_LEVELS, INT4_LEVELS)
    # An odd count takes one padding entry along: it is 0, so its nibble is 8 (and never read back).
    nibbles = (q.to(torch.int16) + 8).view(-1)[: n + (n % 2)]
    pairs = nibbles.view(-1, 2)
    packed = (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)
    return packed, absmax


def dequantize_int4(packed: torch.Tensor, absmax: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of ``quantize_int4`` (up to the rounding): fp32 tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= int(d)
    wide = packed.to(torch.int16)
    nibbles = torch.stack([wide & 0xF, wide >> 4], dim=1).view(-1)[:n]
    q = (nibbles - 8).float()
    nb = int4_blocks(n)
    q = F.pad(q, (0, nb * INT4_BLOCK - n)).view(nb, INT4_BLOCK)
    return (q * absmax.unsqueeze(1) / INT4_LEVELS).view(-1)[:n].view(*shape)


def encode_basis(key: str, basis: torch.Tensor, bits: int) -> Dict[str, torch.Tensor]:
    """State entries holding ``basis`` under ``key`` (e.g. "proj_left") in the ``bits`` format."""
    if bits == 32:
        return {key: basis.contiguous()}
    if bits == 8:
        codes, absmax = quant.quantize_blockwise(basis.contiguous(), signed=True)
        return {key + "_codes": codes, key + "_absmax": absmax}
    if bits == 4:
        packed, absmax = quantize_int4(basis)
        return {key + "_int4": packed, key + "_absmax": absmax}
    raise ValueError(f"basis_bits must be one of {BASIS_BITS}, got {bits!r}")


def has_basis(state: Dict, key: str) -> bool:
    return any(k in state for k in (key, key + "_codes", key + "_int4"))


def decode_basis(state: Dict, key: str, shape) -> torch.Tensor:
    """The fp32 basis stored under ``key`` in whichever format it was saved."""
    if key in state:
        return state[key]
    if key + "_codes" in state:
        return quant.dequantize_blockwise(state[key + "_codes"], state[key + "_absmax"], signed=True)
    if key + "_int4" in state:
        return dequantize_int4(state[key + "_int4"], state[key + "_absmax"], shape)
    raise KeyError(f"no basis {key!r} in the projector state")


def basis_layout(shape, bits: int) -> List[StateTensor]:
    """The tensors ``encode_basis`` stores for a basis of ``shape`` (see ``state_layout.py``)."""
    numel = math.prod(shape)
    if bits == 32:
        return [state_tensor(shape, torch.float32)]
    if bits == 8:
        return [state_tensor(shape, torch.uint8), state_tensor((quant.num_blocks(numel),), torch.float32)]
    return [state_tensor(((numel + 1) // 2,), torch.uint8), state_tensor((int4_blocks(numel),), torch.float32)]


def basis_bytes(numel: int, bits: int) -> int:
    """Bytes ``encode_basis`` stores for a basis of ``numel`` entries (one process)."""
    return rank_bytes(basis_layout((numel,), bits))


__all__ = [
    "BASIS_BITS",
    "INT4_BLOCK",
    "basis_bytes",
    "basis_layout",
    "decode_basis",
    "dequantize_int4",
    "encode_basis",
    "has_basis",
    "int4_blocks",
    "quantize_int4",
]
