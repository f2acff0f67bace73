"""Blockwise 8-bit dynamic quantization kernels (format defined in ``lowrank_optim.quant.format``).

The torch reference is ``lowrank_optim.quant.torch_path`` (the CPU path), re-exported here
under the ``*_torch`` names, so kernel and reference sit side by side without two copies.
Each program handles ``NB`` blocks of ``BLOCK`` elements as an [NB, BLOCK] tile.  Kernels are
launched with ``enable_fp_fusion=False`` and use IEEE ``div_rn``/``sqrt_rn`` so that their fp32
arithmetic (hence the codes) is bit-identical to the torch reference on GPU as well.
"""

import torch

from lowrank_optim.quant.format import BLOCK, dynamic_map, num_blocks
from lowrank_optim.quant.torch_path import dequantize_blockwise_torch, quantize_blockwise_torch

from . import interpreter_enabled, jit, require_triton, tl

__all__ = [
    "quantize_blockwise_torch",
    "quantize_blockwise_triton",
    "dequantize_blockwise_torch",
    "dequantize_blockwise_triton",
    "blocks_per_program",
]


@jit
def nearest_code(x, map_ptr):
    """Index of the nearest entry of the sorted 256-entry map for each x (ties -> lower index).
    8-step binary search for lo = last entry <= x (0 if none), then compare with lo + 1: the format's rounding
    rule, whose lookup table the torch path reads -> identical codes."""
    lo = tl.zeros(x.shape, dtype=tl.int32)
    for k in tl.static_range(8):
        cand = lo + (128 >> k)
        lo = tl.where(tl.load(map_ptr + cand) <= x, cand, lo)
    hi = tl.minimum(lo + 1, 255)
    pick_hi = (tl.load(map_ptr + hi) - x) < (x - tl.load(map_ptr + lo))
    return tl.where(pick_hi, hi, lo)


@jit
def quantize_tile(x, map_ptr):
    """x: fp32 [NB, BLOCK] tile, out-of-range elements already 0 -> (uint8 codes, fp32 absmax [NB])."""
    absmax = tl.max(tl.abs(x), axis=1)
    denom = tl.where(absmax > 0, absmax, 1.0)
    # div_rn: IEEE division like torch (plain '/' is approximate on NVIDIA GPUs)
    scaled = tl.math.div_rn(x, denom[:, None])
    return nearest_code(scaled, map_ptr).to(tl.uint8), absmax


@jit
def block_offsets(NB: tl.constexpr, BLOCK: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)  # int64: tensors may exceed 2^31
    return blk, blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]


@jit
def _quantize_kernel(x_ptr, map_ptr, codes_ptr, absmax_ptr, n, nblocks, NB: tl.constexpr, BLOCK: tl.constexpr):
    blk, offs = block_offsets(NB, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    codes, absmax = quantize_tile(x, map_ptr)
    tl.store(codes_ptr + offs, codes, mask=mask)
    tl.store(absmax_ptr + blk, absmax, mask=blk < nblocks)


@jit
def _dequantize_kernel(codes_ptr, absmax_ptr, map_ptr, out_ptr, n, nblocks, NB: tl.constexpr, BLOCK: tl.constexpr):
    blk, offs = block_offsets(NB, BLOCK)
    mask = offs < n
    codes = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + blk, mask=blk < nblocks, other=0.0)
    tl.store(out_ptr + offs, tl.load(map_ptr + codes) * absmax[:, None], mask=mask)


def blocks_per_program(nblocks: int) -> int:
    """4 blocks (1024 elements) per program on GPU; under the interpreter (~1 ms per program)
    as many as 64 to keep the program count low."""
    cap = 64 if interpreter_enabled() else 4
    nb = 1
    while nb < cap and nb < nblocks:
        nb *= 2
    return nb


def quantize_blockwise_triton(x: torch.Tensor, signed: bool):
    require_triton(x)
    n = x.numel()
    nblocks = num_blocks(n)
    xc = x.contiguous()  # blocks are defined on row-major order; a strided x is copied once
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if n:
        nb = blocks_per_program(nblocks)
        _quantize_kernel[(triton_cdiv(nblocks, nb),)](
            xc, dynamic_map(signed, x.device), codes, absmax, n, nblocks, NB=nb, BLOCK=BLOCK, enable_fp_fusion=False
        )
    return codes, absmax


def dequantize_blockwise_triton(codes: torch.Tensor, absmax: torch.Tensor, signed: bool):
    require_triton(codes)
    n = codes.numel()
    nblocks = num_blocks(n)
    if absmax.numel() != nblocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, expected {nblocks}")
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    if n:
        nb = blocks_per_program(nblocks)
        _dequantize_kernel[(triton_cdiv(nblocks, nb),)](
            codes.contiguous(),
            absmax.contiguous(),
            dynamic_map(signed, codes.device),
            out,
            n,
            nblocks,
            NB=nb,
            BLOCK=BLOCK,
            enable_fp_fusion=False,
        )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
