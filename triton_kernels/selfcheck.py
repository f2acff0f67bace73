"""Each kernel against its torch reference on a small input.

``lowrank_optim.quant.dispatch`` runs :func:`run` the first time a kernel is used on a CUDA device (per kernel,
device, argument dtypes and variant) and falls back to torch when it raises; the GPU report runs every check.
Inputs come from a private generator, so a check never moves the global RNG.  Tolerances: codes identical under
the interpreter, and on GPU at most 0.1% one-code flips at exact rounding ties; dequantized values identical;
fp32 results within 1e-5 relative (TF32 matmuls 5e-3), fp16 3e-3, bf16 2e-2.
"""

from typing import Callable, Dict, Tuple

import torch

from lowrank_optim.quant.format import BLOCK, zero_state
from lowrank_optim.quant.torch_path import adam8bit_step_torch, dequantize_blockwise_torch, quantize_blockwise_torch

from . import adam8bit, projection, quant8

__all__ = ["KernelMismatch", "CHECKS", "DEFAULT_CASES", "run"]


class KernelMismatch(AssertionError):
    """A kernel's output differs from its torch reference beyond the tolerance."""


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(20240611)


def _randn(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _basis(rows, cols, dtype, device, gen) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen))[0].to(device=device, dtype=dtype)


def _codes_error(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (got.int() - ref.int()).abs()
    worst = int(diff.max()) if diff.numel() else 0
    flips = float((diff > 0).float().mean()) if diff.numel() else 0.0
    allowed = (1, 1e-3) if got.is_cuda else (0, 0.0)
    if worst > allowed[0] or flips > allowed[1]:
        raise KernelMismatch(f"{name}: codes differ from the torch reference (max {worst}, {flips:.2%} of them)")
    return float(worst)


def _tolerance(*dtypes, device: torch.device) -> float:
    if torch.bfloat16 in dtypes:
        return 2e-2
    if torch.float16 in dtypes:
        return 3e-3
    return 5e-3 if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else 1e-5


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Norm-relative error within ``tol``; returns the max absolute error."""
    got, ref = got.float(), ref.float()
    if got.shape != ref.shape:
        raise KernelMismatch(f"{name}: shape {tuple(got.shape)}, reference {tuple(ref.shape)}")
    err = (got - ref).norm() / ref.norm().clamp_min(1e-30)
    if not bool(torch.isfinite(err)) or float(err) > tol:
        raise KernelMismatch(f"{name}: relative error {float(err):.3g} > {tol:g} against the torch reference")
    return float((got - ref).abs().max())


def _equal(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape or not torch.equal(got, ref):
        raise KernelMismatch(f"{name}: not identical to the torch reference")
    return 0.0


# ----------------------------------------------------------------------------- one check per kernel
def check_quantize(device, dtypes, signed) -> float:
    gen = _generator()
    x = _randn(3 * BLOCK + 77, torch.float32, "cpu", gen) * 10.0 ** torch.empty(3 * BLOCK + 77).uniform_(
        -7, 1, generator=gen
    )
    x[BLOCK : 2 * BLOCK] = 0  # an all-zero block
    x = (x if signed else x * x).to(device=device, dtype=dtypes[0])
    codes, absmax = quant8.quantize_blockwise_triton(x, signed)
    ref_codes, ref_absmax = quantize_blockwise_torch(x, signed)
    _equal("quantize_blockwise absmax", absmax, ref_absmax)
    return _codes_error("quantize_blockwise", codes, ref_codes)


def check_dequantize(device, dtypes, signed) -> float:
    gen = _generator()
    codes = torch.randint(0, 256, (3 * BLOCK + 77,), generator=gen, dtype=torch.uint8).to(device)
    absmax = torch.rand(4, generator=gen).to(device)
    out = quant8.dequantize_blockwise_triton(codes, absmax, signed)
    return _equal("dequantize_blockwise", out, dequantize_blockwise_torch(codes, absmax, signed))


_ADAM_CASES = {"none": ((5, 300), None), "col": ((33, 70), 0), "row_narrow": ((33, 70), 1), "row_wide": ((6, 300), 1)}


def check_adam8bit(device, dtypes, variant) -> float:
    shape, dim = _ADAM_CASES[variant]
    gen = _generator()
    state = [t.to(device) for t in (*zero_state(shape, True), *zero_state(shape, False))]
    ref_state = [t.clone() for t in state]
    worst = 0.0
    for _ in range(2):
        g = _randn(shape, dtypes[0], device, gen)
        out = adam8bit.adam8bit_step_triton(g, *state, 0.9, 0.999, 1e-8, col_norm_dim=dim)
        ref = adam8bit_step_torch(g, *ref_state, 0.9, 0.999, 1e-8, col_norm_dim=dim)
        out, ref = (out, ref) if dim is not None else ((out,), (ref,))
        worst = max(worst, _close("adam8bit_step direction", out[0], ref[0], 1e-5))
        if dim is not None:
            _close("adam8bit_step norms", out[1], ref[1], 1e-5)
        for i in (0, 2):  # codes; absmax equal (the moments are computed by the same fp32 ops)
            worst = max(worst, _codes_error("adam8bit_step codes", state[i], ref_state[i]))
            _equal("adam8bit_step absmax", state[i + 1], ref_state[i + 1])
            ref_state[i].copy_(state[i])  # continue from the same state if a tie flipped
    return worst


_D, _OTHER, _R = 70, 33, 20


def check_project_rows(device, dtypes, side) -> float:
    gen = _generator()
    B, idx = _basis(_D, _D, dtypes[1], device, gen), torch.randperm(_D, generator=gen)[:_R].to(device)
    G = _randn((_OTHER, _D) if side == "right" else (_D, _OTHER), dtypes[0], device, gen)
    out = projection.project_rows_triton(G, B, idx, side)
    return _close(
        "project_rows", out, projection.project_rows_torch(G, B, idx, side), _tolerance(*dtypes, device=device)
    )


def check_project_back_rows(device, dtypes, side) -> float:
    gen = _generator()
    B, idx = _basis(_D, _D, dtypes[1], device, gen), torch.randperm(_D, generator=gen)[:_R].to(device)
    low = _randn((_OTHER, _R) if side == "right" else (_R, _OTHER), dtypes[0], device, gen)
    out = projection.project_back_rows_triton(low, B, idx, side)
    return _close(
        "project_back_rows",
        out,
        projection.project_back_rows_torch(low, B, idx, side),
        _tolerance(*dtypes, device=device),
    )


def _apply_inputs(dtypes, side, device, gen, basis_rows):
    w_dtype, low_dtype, basis_dtype, res_dtype = dtypes
    shape = (_OTHER, _D) if side == "right" else (_D, _OTHER)
    W = _randn(shape, w_dtype, device, gen)
    low = _randn((_OTHER, _R) if side == "right" else (_R, _OTHER), low_dtype, device, gen)
    basis = _basis(_D, basis_rows, basis_dtype, device, gen)
    res = None if res_dtype is None else _randn(shape, res_dtype, device, gen)
    kw = dict(lr=0.1, weight_decay=0.01, scale=0.25, residual=res, residual_coef=0.5)
    return W, low, basis, kw


def check_project_back_apply(device, dtypes, side) -> float:
    gen = _generator()
    W, low, B, kw = _apply_inputs(dtypes, side, device, gen, _D)
    idx = torch.randperm(_D, generator=gen)[:_R].to(device)
    W_ref = W.clone()
    projection.project_back_apply_triton(W, low, B, idx, side, **kw)
    projection.project_back_apply_torch(W_ref, low, B, idx, side, **kw)
    return _close("project_back_apply", W, W_ref, _tolerance(*dtypes, device=device))


def check_project_back_apply_dense(device, dtypes, side) -> float:
    gen = _generator()
    W, low, P, kw = _apply_inputs(dtypes, side, device, gen, _R)
    W_ref = W.clone()
    projection.project_back_apply_dense_triton(W, low, P, side, **kw)
    projection.project_back_apply_dense_torch(W_ref, low, P, side, **kw)
    return _close("project_back_apply_dense", W, W_ref, _tolerance(*dtypes, device=device))


CHECKS: Dict[str, Callable] = {
    "quantize_blockwise": check_quantize,
    "dequantize_blockwise": check_dequantize,
    "adam8bit_step": check_adam8bit,
    "project_rows": check_project_rows,
    "project_back_rows": check_project_back_rows,
    "project_back_apply": check_project_back_apply,
    "project_back_apply_dense": check_project_back_apply_dense,
}

_F32 = torch.float32
# (kernel, dtypes, variant) cases that cover every kernel and variant in fp32, for a full sweep (the GPU report)
DEFAULT_CASES: Tuple = (
    *(("quantize_blockwise", (_F32,), s) for s in (True, False)),
    *(("dequantize_blockwise", (), s) for s in (True, False)),
    *(("adam8bit_step", (_F32,), v) for v in _ADAM_CASES),
    *(("project_rows", (_F32, _F32), side) for side in ("left", "right")),
    *(("project_back_rows", (_F32, _F32), side) for side in ("left", "right")),
    *(("project_back_apply", (_F32, _F32, _F32, r), side) for side in ("left", "right") for r in (None, _F32)),
    *(("project_back_apply_dense", (_F32, _F32, _F32, r), side) for side in ("left", "right") for r in (None, _F32)),
)


def run(name: str, device, dtypes: Tuple, variant) -> float:
    """Check kernel ``name`` for these argument dtypes and variant on ``device``; returns the max error (absolute,
    or in codes) and raises on a mismatch, a compile error or a launch failure."""
    if name not in CHECKS:
        raise ValueError(f"no self-check for kernel {name!r}; known: {sorted(CHECKS)}")
    with torch.no_grad():
        return CHECKS[name](torch.device(device), tuple(dtypes), variant)
