"""Fused 8-bit Adam moment update.

One pass per [NB, BLOCK] tile: load grad and both moments' codes/absmax -> dequantize -> update
-> write direction = m / (sqrt(v) + eps) -> requantize with the new in-kernel block absmax ->
write codes/absmax in place.  Optional direction norms per column (dim 0) or per row (dim 1)
are accumulated with fp32 atomics into a sum-of-squares buffer; a sqrt of that small vector
follows.  Atomics make the norms' last bits run-to-run nondeterministic (summation order);
direction and codes are deterministic.  The torch reference is
``lowrank_optim.quant.torch_path.adam8bit_step_torch`` (re-exported here).
"""

import torch

from lowrank_optim.quant.format import BLOCK, dynamic_map, num_blocks
from lowrank_optim.quant.torch_path import adam8bit_step_torch

from . import jit, require_triton, tl
from .quant8 import block_offsets, blocks_per_program, quantize_tile, triton_cdiv

__all__ = ["adam8bit_step_torch", "adam8bit_step_triton"]

# NORM_MODE: which norms to accumulate
_NO_NORM, _COL_NORM, _ROW_NORM_ELEMENTWISE, _ROW_NORM_SEGMENTS = 0, 1, 2, 3


@jit
def _adam8bit_kernel(
    g_ptr,
    mc_ptr,
    ma_ptr,
    vc_ptr,
    va_ptr,
    smap_ptr,
    umap_ptr,
    d_ptr,
    sumsq_ptr,
    n,
    nblocks,
    ncols,
    beta1,
    c1,
    beta2,
    c2,
    eps,
    NORM_MODE: tl.constexpr,
    NB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    blk, offs = block_offsets(NB, BLOCK)
    mask = offs < n
    bmask = blk < nblocks
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_code = tl.load(mc_ptr + offs, mask=mask, other=0).to(tl.int32)
    v_code = tl.load(vc_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(smap_ptr + m_code) * tl.load(ma_ptr + blk, mask=bmask, other=0.0)[:, None]
    v = tl.load(umap_ptr + v_code) * tl.load(va_ptr + blk, mask=bmask, other=0.0)[:, None]
    # same op order as the torch reference (c1 = 1 - beta1 computed on the host)
    m = m * beta1 + g * c1
    v = v * beta2 + g * g * c2
    # out-of-range lanes must not leak into the new absmax
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    d = tl.math.div_rn(m, tl.math.sqrt_rn(v) + eps)
    tl.store(d_ptr + offs, d, mask=mask)
    m_new, m_absmax = quantize_tile(m, smap_ptr)
    v_new, v_absmax = quantize_tile(v, umap_ptr)
    tl.store(mc_ptr + offs, m_new, mask=mask)
    tl.store(vc_ptr + offs, v_new, mask=mask)
    tl.store(ma_ptr + blk, m_absmax, mask=bmask)
    tl.store(va_ptr + blk, v_absmax, mask=bmask)

    d2 = d * d
    if NORM_MODE == 1:  # column norms: a block hits many columns, one atomic per element
        tl.atomic_add(sumsq_ptr + offs % ncols, d2, mask=mask)
    if NORM_MODE == 2:  # row norms of narrow rows (ncols < BLOCK): one atomic per element
        tl.atomic_add(sumsq_ptr + offs // ncols, d2, mask=mask)
    if NORM_MODE == 3:
        # rows at least BLOCK wide: a block spans at most two rows -> two atomics per block
        start = blk * BLOCK
        row0 = start // ncols
        in_row0 = (offs // ncols) == row0[:, None]
        s0 = tl.sum(tl.where(in_row0 & mask, d2, 0.0), axis=1)
        s1 = tl.sum(tl.where((~in_row0) & mask, d2, 0.0), axis=1)
        last = tl.minimum(start + BLOCK, n) - 1
        tl.atomic_add(sumsq_ptr + row0, s0, mask=bmask)
        tl.atomic_add(sumsq_ptr + row0 + 1, s1, mask=bmask & (last // ncols > row0))


def adam8bit_step_triton(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps, col_norm_dim=None):
    """Same contract as ``lowrank_optim.quant.adam8bit_step`` (state must be contiguous: it is
    updated in place)."""
    require_triton(grad)
    n = grad.numel()
    nblocks = num_blocks(n)
    g = grad.contiguous()  # blocks follow row-major order; a strided grad is copied once
    direction = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    ncols, mode = 1, _NO_NORM
    if col_norm_dim is not None:
        rows, ncols = grad.shape
        if col_norm_dim == 0:
            mode, nnorm = _COL_NORM, ncols
        else:
            mode, nnorm = (_ROW_NORM_SEGMENTS if ncols >= BLOCK else _ROW_NORM_ELEMENTWISE), rows
        sumsq = torch.zeros(nnorm, dtype=torch.float32, device=grad.device)
    else:
        sumsq = direction  # unused placeholder pointer
    if n:
        nb = blocks_per_program(nblocks)
        _adam8bit_kernel[(triton_cdiv(nblocks, nb),)](
            g,
            m_codes,
            m_absmax,
            v_codes,
            v_absmax,
            dynamic_map(True, grad.device),
            dynamic_map(False, grad.device),
            direction,
            sumsq,
            n,
            nblocks,
            ncols,
            beta1,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            eps,
            NORM_MODE=mode,
            NB=nb,
            BLOCK=BLOCK,
            enable_fp_fusion=False,
        )  # no FMA contraction: bit-identical to torch
    if col_norm_dim is None:
        return direction
    return direction, sumsq.sqrt_()
