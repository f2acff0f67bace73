"""8-bit optimizer-state format: blockwise dynamic quantization (the one place it is defined).

Format
  * A tensor is read in flat row-major order and cut into blocks of ``BLOCK`` = 256 elements
    (the last block may be short).  Each block stores its absmax in fp32; each element stores a
    uint8 code indexing a 256-entry "dynamic" map of values in [-1, 1] (signed, first moment) or
    [0, 1] (unsigned, second moment).  value = map[code] * absmax[block].
  * The maps equal bitsandbytes' ``create_dynamic_map(signed=...)``: seven decades
    (1e-6 .. 1) of evenly spaced mantissas, plus 0 and 1.  They are cached per device.
  * Rounding: x / absmax goes to the nearest map entry (ties go to the lower code).  0 is an
    exact map entry, so zero stays zero and the nearest entry never has the opposite sign.
  * Tensors with fewer than ``MIN_8BIT_SIZE`` elements are kept in fp32 by the caller
    (see :func:`use_8bit`); quantizing tiny tensors saves nothing and costs accuracy.

Backends: torch reference math lives here; Triton kernels live in ``triton_kernels`` and are
imported lazily, so this module works without triton.  ``set_backend("auto"|"torch"|"triton")``,
initial value from the ``LOWRANK_OPTIM_BACKEND`` environment variable.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

BLOCK = 256
MIN_8BIT_SIZE = 4096
BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BLOCK", "MIN_8BIT_SIZE", "use_8bit", "num_blocks", "dynamic_map", "zero_state",
    "quantize_blockwise", "dequantize_blockwise", "adam8bit_step",
    "quantize_blockwise_torch", "dequantize_blockwise_torch", "adam8bit_step_torch",
    "set_backend", "get_backend",
]


def use_8bit(numel: int, min_size: int = MIN_8BIT_SIZE) -> bool:
    """Whether a state tensor with ``numel`` elements is stored in 8 bits (else fp32)."""
    return numel >= min_size


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


# ----------------------------------------------------------------------------- maps
def _build_dynamic_map(signed: bool) -> torch.Tensor:
    """256 sorted fp32 values: 0, 1 and, for each decade 10^e (e = -6..0), the midpoints of an
    even grid over [0.1, 1] scaled by 10^e.  Finer decades get more points; the unsigned map
    spends the sign bit on twice as many points per decade.  Arithmetic is fp32, as in bnb."""
    values = [0.0, 1.0]
    for i in range(7):
        points = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, points + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        mags = mids * (10.0 ** (i - 6))
        values += mags.tolist()
        if signed:
            values += (-mags).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


_MAPS: Dict[Tuple[bool, torch.device], torch.Tensor] = {}


def dynamic_map(signed: bool, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The cached 256-entry fp32 map on ``device`` (shared: do not modify it)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (bool(signed), device)
    qmap = _MAPS.get(key)
    if qmap is None:
        qmap = _MAPS[key] = _build_dynamic_map(signed).to(device)
    return qmap


def zero_state(shape, signed: bool, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes/absmax representing an all-zero tensor (initial Adam moments)."""
    zero_code = int(torch.nonzero(dynamic_map(signed) == 0)[0])
    numel = 1
    for s in shape:
        numel *= s
    codes = torch.full(tuple(shape), zero_code, dtype=torch.uint8, device=device)
    return codes, torch.zeros(num_blocks(numel), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------- backend
def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown quant backend {name!r}; expected one of {BACKENDS}")
    return name


_BACKEND = _check_backend(os.environ.get("LOWRANK_OPTIM_BACKEND", "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Select the backend: "auto" (Triton for CUDA tensors when triton imports, torch otherwise),
    "torch", or "triton" (forced; CPU tensors then need ``TRITON_INTERPRET=1`` set before triton
    is imported)."""
    global _BACKEND
    _BACKEND = _check_backend(name)


def get_backend() -> str:
    return _BACKEND


def kernels_for(t: torch.Tensor) -> bool:
    """Whether the Triton kernels handle ``t`` under the current backend (CUDA by default, or forced)."""
    return _use_triton(t)


def _use_triton(t: torch.Tensor) -> bool:
    if _BACKEND == "torch" or (_BACKEND == "auto" and not t.is_cuda):
        return False  # decided without importing triton
    from triton_kernels import interpreter_enabled, triton_available

    if _BACKEND == "auto":
        return triton_available()
    if not triton_available():
        raise RuntimeError("quant backend 'triton' was forced but triton cannot be imported")
    if not t.is_cuda and not interpreter_enabled():
        raise RuntimeError("quant backend 'triton' on CPU tensors needs the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported, or use backend 'auto'/'torch'")
    return True


# ----------------------------------------------------------------------------- torch reference
def _nearest_code(scaled: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Nearest map index; lo = last entry <= x (0 if none), ties -> lo.  The Triton kernel does the
    same comparisons in the same fp32 arithmetic, so the codes match exactly."""
    lo = torch.searchsorted(qmap, scaled, right=True).sub_(1).clamp_(0, 255)
    hi = (lo + 1).clamp_(max=255)
    pick_hi = (qmap[hi] - scaled) < (scaled - qmap[lo])
    return torch.where(pick_hi, hi, lo).to(torch.uint8)


def quantize_blockwise_torch(x: torch.Tensor, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    nb = num_blocks(n)
    flat = x.reshape(-1).float()  # reshape copies a non-contiguous x into row-major order
    blocks = F.pad(flat, (0, nb * BLOCK - n)).view(nb, BLOCK)
    absmax = blocks.abs().amax(dim=1) if nb else flat.new_zeros(0)
    # all-zero blocks divide by 1 instead of 0 (0/0 would be NaN)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    codes = _nearest_code(scaled, dynamic_map(signed, x.device))
    return codes.view(-1)[:n].view(x.shape), absmax


def dequantize_blockwise_torch(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    qmap = dynamic_map(signed, codes.device)
    flat = qmap.index_select(0, codes.reshape(-1).int())
    scale = absmax.repeat_interleave(BLOCK)[: flat.numel()]
    return (flat * scale).view(codes.shape)


def adam8bit_step_torch(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps,
                        col_norm_dim: Optional[int] = None):
    g = grad.float()
    # plain mul/add in this order (no lerp/addcmul): the kernel does the identical fp32 ops,
    # so requantized codes match bit for bit
    m = dequantize_blockwise_torch(m_codes, m_absmax, True) * beta1 + g * (1.0 - beta1)
    v = dequantize_blockwise_torch(v_codes, v_absmax, False) * beta2 + g * g * (1.0 - beta2)
    direction = m / (torch.sqrt(v) + eps)
    for state, codes, absmax, signed in ((m, m_codes, m_absmax, True), (v, v_codes, v_absmax, False)):
        new_codes, new_absmax = quantize_blockwise_torch(state, signed)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)
    if col_norm_dim is None:
        return direction
    return direction, torch.linalg.vector_norm(direction, dim=col_norm_dim)


# ----------------------------------------------------------------------------- public API
def quantize_blockwise(x: torch.Tensor, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (uint8 codes shaped like x, fp32 absmax of shape [ceil(numel / 256)])."""
    if _use_triton(x):
        from triton_kernels.quant8 import quantize_blockwise_triton

        return quantize_blockwise_triton(x, signed)
    return quantize_blockwise_torch(x, signed)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """-> fp32 tensor shaped like codes."""
    if _use_triton(codes):
        from triton_kernels.quant8 import dequantize_blockwise_triton

        return dequantize_blockwise_triton(codes, absmax, signed)
    return dequantize_blockwise_torch(codes, absmax, signed)


def _check_state(grad, codes, absmax, name):
    if codes.shape != grad.shape or codes.dtype != torch.uint8 or not codes.is_contiguous():
        raise ValueError(f"{name}_codes must be contiguous uint8 with the grad's shape {tuple(grad.shape)}")
    if absmax.dtype != torch.float32 or absmax.numel() != num_blocks(grad.numel()) or not absmax.is_contiguous():
        raise ValueError(f"{name}_absmax must be contiguous fp32 with {num_blocks(grad.numel())} elements")


def adam8bit_step(grad, m_codes, m_absmax, v_codes, v_absmax, beta1: float, beta2: float, eps: float,
                  col_norm_dim: Optional[int] = None):
    """One Adam moment update on 8-bit state, in place.  Returns ``direction = m / (sqrt(v) + eps)``
    (fp32, grad's shape, no bias correction) and, if ``col_norm_dim`` is 0 or 1 (2-D grads only),
    also the L2 norms of ``direction`` reduced over that dim."""
    _check_state(grad, m_codes, m_absmax, "m")
    _check_state(grad, v_codes, v_absmax, "v")
    if col_norm_dim is not None and (col_norm_dim not in (0, 1) or grad.dim() != 2):
        raise ValueError("col_norm_dim must be None, 0 or 1, and needs a 2-D grad")
    args = (grad, m_codes, m_absmax, v_codes, v_absmax, float(beta1), float(beta2), float(eps), col_norm_dim)
    if _use_triton(grad):
        from triton_kernels.adam8bit import adam8bit_step_triton

        return adam8bit_step_triton(*args)
    return adam8bit_step_torch(*args)
