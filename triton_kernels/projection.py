"""Projection kernels for index-based projectors and the fused project-back + weight update.

An index-based projector keeps ``idx`` (r row indices) into an orthonormal basis ``B`` (k x d),
e.g. DCT rows or identity rows (coordinate subspaces).  The kernels gather ``B[idx]`` rows
tile by tile inside the matmul instead of materialising the r x d matrix.

  project_rows(G, B, idx, side)       right: G (m x d) @ B[idx].T -> m x r
                                      left:  B[idx] @ G (d x n)   -> r x n
  project_back_rows(low, B, idx, side) right: low (m x r) @ B[idx]   -> m x d
                                      left:  B[idx].T @ low (r x n) -> d x n
  project_back_apply(W, low, B, idx, side, lr, weight_decay, scale, residual=None, residual_coef=0.0)
      W <- W * (1 - lr * wd) - lr * (scale * project_back_rows(low) + residual_coef * residual), in place
  project_back_apply_dense(W, low, P, side, ...): same with an explicit basis P
      (right: P n x r, back = low @ P.T; left: P m x r, back = P @ low).

All kernels are one strided matmul kernel (any strides, so non-contiguous inputs need no copy)
with fp32 accumulation and an optional fused update epilogue that reads and writes W once.
Inputs may be fp32/fp16/bf16; mixed dtypes are computed in fp32; results are stored in the
output's dtype.  fp32 dots use TF32 only when torch allows it for matmuls.
"""

import torch

from . import interpreter_enabled, jit, require_triton, tl

__all__ = [
    "project_rows_torch",
    "project_rows_triton",
    "project_back_rows_torch",
    "project_back_rows_triton",
    "project_back_apply_torch",
    "project_back_apply_triton",
    "project_back_apply_dense_torch",
    "project_back_apply_dense_triton",
]


# ----------------------------------------------------------------------------- torch references
def _check_side(side):
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def _mm(a, b):
    """a @ b, in fp32 when dtypes differ, result in a's dtype."""
    if a.dtype == b.dtype:
        return a @ b
    return (a.float() @ b.float()).to(a.dtype)


def project_rows_torch(G, B, idx, side):
    _check_side(side)
    rows = B[idx]
    return _mm(G, rows.T) if side == "right" else _mm(rows, G).to(G.dtype)


def project_back_rows_torch(low, B, idx, side):
    _check_side(side)
    rows = B[idx]
    return _mm(low, rows) if side == "right" else _mm(rows.T, low).to(low.dtype)


def project_back_apply_dense_torch(W, low, P, side, lr, weight_decay, scale, residual=None, residual_coef=0.0):
    """The one torch reference of the fused update, in fp32, rounded once to W's dtype:
    ``W <- W (1 - lr wd) - lr (scale * back + residual_coef * residual)``, back = low @ P.T (right) or P @ low."""
    _check_side(side)
    back = low.float() @ P.float().T if side == "right" else P.float() @ low.float()
    update = scale * back
    if residual is not None:
        update = update + residual_coef * residual.float()
    W.copy_(W.float() * (1.0 - lr * weight_decay) - lr * update)
    return W


def project_back_apply_torch(W, low, B, idx, side, lr, weight_decay, scale, residual=None, residual_coef=0.0):
    """The rows variant: the basis is B[idx].T (right: back = low @ B[idx]; left: B[idx].T @ low)."""
    return project_back_apply_dense_torch(W, low, B[idx].T, side, lr, weight_decay, scale, residual, residual_coef)


# ----------------------------------------------------------------------------- kernel
# GATHER: which operand index goes through idx (A is M x K, B is K x N)
_NO_GATHER, _GATHER_AM, _GATHER_AK, _GATHER_BK, _GATHER_BN = 0, 1, 2, 3, 4


@jit
def _gather_mm_kernel(
    a_ptr,
    b_ptr,
    idx_ptr,
    c_ptr,
    res_ptr,
    M,
    N,
    K,
    sa_m,
    sa_k,
    sb_k,
    sb_n,
    sc_m,
    sc_n,
    sr_m,
    sr_n,
    decay,
    coef_back,
    coef_res,
    GATHER: tl.constexpr,
    APPLY: tl.constexpr,
    HAS_RES: tl.constexpr,
    CAST_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """C = A @ B, or (APPLY) C <- C * decay - (coef_back * A @ B + coef_res * R) in place."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_mask = rm < M
    n_mask = rn < N
    am = rm.to(tl.int64)  # int64 offsets: stride products may exceed 2^31
    bn = rn.to(tl.int64)
    if GATHER == 1:
        am = tl.load(idx_ptr + rm, mask=m_mask, other=0).to(tl.int64)
    if GATHER == 4:
        bn = tl.load(idx_ptr + rn, mask=n_mask, other=0).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        ak = rk.to(tl.int64)
        bk = rk.to(tl.int64)
        if GATHER == 2:
            ak = tl.load(idx_ptr + rk, mask=k_mask, other=0).to(tl.int64)
        if GATHER == 3:
            bk = tl.load(idx_ptr + rk, mask=k_mask, other=0).to(tl.int64)
        a = tl.load(a_ptr + am[:, None] * sa_m + ak[None, :] * sa_k, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + bk[:, None] * sb_k + bn[None, :] * sb_n, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c_mask = m_mask[:, None] & n_mask[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * sc_m + rn.to(tl.int64)[None, :] * sc_n
    if APPLY:
        update = acc * coef_back
        if HAS_RES:
            r_ptrs = res_ptr + rm.to(tl.int64)[:, None] * sr_m + rn.to(tl.int64)[None, :] * sr_n
            update += tl.load(r_ptrs, mask=c_mask, other=0.0).to(tl.float32) * coef_res
        w = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        acc = w * decay - update
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _tile(n: int, cap: int) -> int:
    t = 16  # tl.dot needs every tile dim >= 16
    while t < n and t < cap:
        t *= 2
    return t


def _launch(a, sa, b, sb, idx, c, M, N, K, gather, update=None):
    """a/b: base tensors with (row, col) strides sa/sb of the logical A (M x K) and B (K x N)."""
    require_triton(a, b, c)
    if M == 0 or N == 0:
        return c
    same16 = a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)
    cast_f32 = not same16 and (a.dtype != torch.float32 or b.dtype != torch.float32)
    # input_precision only matters for fp32 dots (16-bit dots ignore it; "tf32" is the default)
    precision = "tf32" if same16 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    caps = (128, 128, 64) if interpreter_enabled() else (64, 64, 32)  # interpreter: few big programs
    BM, BN, BK = _tile(M, caps[0]), _tile(N, caps[1]), _tile(K, caps[2])
    if update is None:
        res, sr, coefs, apply, has_res = c, (0, 0), (1.0, 1.0, 0.0), False, False
    else:
        res, decay, coef_back, coef_res = update
        has_res = res is not None
        res, sr = (res, res.stride()) if has_res else (c, (0, 0))
        coefs, apply = (decay, coef_back, coef_res), True
    idx = idx if idx is not None else c  # unused pointer when not gathering
    grid = ((M + BM - 1) // BM, (N + BN - 1) // BN)
    _gather_mm_kernel[grid](
        a,
        b,
        idx,
        c,
        res,
        M,
        N,
        K,
        sa[0],
        sa[1],
        sb[0],
        sb[1],
        c.stride(0),
        c.stride(1),
        sr[0],
        sr[1],
        *coefs,
        GATHER=gather,
        APPLY=apply,
        HAS_RES=has_res,
        CAST_F32=cast_f32,
        PRECISION=precision,
        BM=BM,
        BN=BN,
        BK=BK,
        enable_fp_fusion=True,
    )
    return c


def _rows_operands(low_or_G, B, idx, side, back):
    """(a, sa, b, sb, M, N, K, gather) for the four gathered products."""
    X = low_or_G
    r = idx.numel()
    sB0, sB1 = B.stride()
    if not back and side == "right":  # G (m x d) @ B[idx].T
        return X, X.stride(), B, (sB1, sB0), X.shape[0], r, X.shape[1], _GATHER_BN
    if not back:  # B[idx] (r x d) @ G (d x n)
        return B, (sB0, sB1), X, X.stride(), r, X.shape[1], X.shape[0], _GATHER_AM
    if side == "right":  # low (m x r) @ B[idx] (r x d)
        return X, X.stride(), B, (sB0, sB1), X.shape[0], B.shape[1], r, _GATHER_BK
    return B, (sB1, sB0), X, X.stride(), B.shape[1], X.shape[1], r, _GATHER_AK  # B[idx].T @ low


def _check_rows(X, B, idx, side, back):
    _check_side(side)
    if X.dim() != 2 or B.dim() != 2 or idx.dim() != 1:
        raise ValueError("expected 2-D matrices and a 1-D index tensor")
    if back:
        want = idx.numel()
        got = X.shape[1] if side == "right" else X.shape[0]
    else:
        want = B.shape[1]
        got = X.shape[1] if side == "right" else X.shape[0]
    if got != want:
        raise ValueError(f"shape mismatch: {tuple(X.shape)} vs basis {tuple(B.shape)} with {idx.numel()} rows")


def project_rows_triton(G, B, idx, side):
    _check_rows(G, B, idx, side, back=False)
    idx = idx.contiguous()
    a, sa, b, sb, M, N, K, gather = _rows_operands(G, B, idx, side, back=False)
    out = torch.empty(M, N, dtype=G.dtype, device=G.device)
    return _launch(a, sa, b, sb, idx, out, M, N, K, gather)


def project_back_rows_triton(low, B, idx, side):
    _check_rows(low, B, idx, side, back=True)
    idx = idx.contiguous()
    a, sa, b, sb, M, N, K, gather = _rows_operands(low, B, idx, side, back=True)
    out = torch.empty(M, N, dtype=low.dtype, device=low.device)
    return _launch(a, sa, b, sb, idx, out, M, N, K, gather)


def _update_args(W, M, N, lr, weight_decay, scale, residual, residual_coef):
    if tuple(W.shape) != (M, N):
        raise ValueError(f"W has shape {tuple(W.shape)}, the projected-back update is {(M, N)}")
    if residual is not None and residual.shape != W.shape:
        raise ValueError("residual must have W's shape")
    return residual, 1.0 - lr * weight_decay, lr * scale, lr * residual_coef


def project_back_apply_triton(W, low, B, idx, side, lr, weight_decay, scale, residual=None, residual_coef=0.0):
    _check_rows(low, B, idx, side, back=True)
    idx = idx.contiguous()
    a, sa, b, sb, M, N, K, gather = _rows_operands(low, B, idx, side, back=True)
    update = _update_args(W, M, N, lr, weight_decay, scale, residual, residual_coef)
    return _launch(a, sa, b, sb, idx, W, M, N, K, gather, update)


def project_back_apply_dense_triton(W, low, P, side, lr, weight_decay, scale, residual=None, residual_coef=0.0):
    _check_side(side)
    if side == "right":  # low (m x r) @ P.T (r x n)
        a, sa, b, sb = low, low.stride(), P, (P.stride(1), P.stride(0))
        M, N, K = low.shape[0], P.shape[0], low.shape[1]
    else:  # P (m x r) @ low (r x n)
        a, sa, b, sb = P, P.stride(), low, low.stride()
        M, N, K = P.shape[0], low.shape[1], low.shape[0]
    if (P.shape[1] != low.shape[1]) if side == "right" else (P.shape[1] != low.shape[0]):
        raise ValueError(f"shape mismatch: low {tuple(low.shape)} vs basis {tuple(P.shape)}")
    update = _update_args(W, M, N, lr, weight_decay, scale, residual, residual_coef)
    return _launch(a, sa, b, sb, None, W, M, N, K, _NO_GATHER, update)
