"""Backend choice and kernel dispatch: Triton kernels (``lowrank_optim.kernels``, imported lazily, so this works
without triton) for CUDA tensors, the torch path otherwise.

``set_backend("auto"|"torch"|"triton")``, initial value from the ``LOWRANK_OPTIM_BACKEND`` environment variable.

Self-check: the first time a kernel runs on a CUDA device (per kernel, device, argument dtypes and variant), it is
run on a small input against its torch reference (``lowrank_optim.kernels.selfcheck``).  On a compile error or a
mismatch it warns once, naming the kernel and the error, and that kernel uses the torch path from then on; with the
backend forced to "triton" it raises instead.  Kernels run on CPU tensors (forced backend, Triton interpreter) are
not self-checked, unless the test-only switch ``CPU_AS_DEVICE`` is set: then, under ``TRITON_INTERPRET=1``, CPU
tensors are treated like CUDA ones (the "auto" backend sends them to the kernels, self-checked first).
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from .format import BLOCK, num_blocks
from .torch_path import adam8bit_step_torch, dequantize_blockwise_torch, quantize_blockwise_torch

BACKENDS = ("auto", "torch", "triton")
CPU_AS_DEVICE = False  # test-only: under TRITON_INTERPRET=1, CPU tensors get the CUDA treatment (see above)


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown quant backend {name!r}; expected one of {BACKENDS}")
    return name


_BACKEND = _check_backend(os.environ.get("LOWRANK_OPTIM_BACKEND", "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Select the backend: "auto" (Triton for CUDA tensors when triton imports, torch otherwise), "torch", or
    "triton" (forced; CPU tensors then need ``TRITON_INTERPRET=1`` set before triton is imported)."""
    global _BACKEND
    _BACKEND = _check_backend(name)


def get_backend() -> str:
    return _BACKEND


def kernels_for(t: torch.Tensor) -> bool:
    """Whether the backend sends ``t`` to the Triton kernels (CUDA by default, or forced).  A kernel that failed
    its self-check still falls back to torch: see :func:`try_kernel`."""
    if _BACKEND == "torch" or (_BACKEND == "auto" and not t.is_cuda and not CPU_AS_DEVICE):
        return False  # decided without importing triton
    from lowrank_optim.kernels import interpreter_enabled, triton_available

    if _BACKEND == "auto":
        return triton_available() and (t.is_cuda or interpreter_enabled())
    if not triton_available():
        raise RuntimeError("quant backend 'triton' was forced but triton cannot be imported")
    if not t.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "quant backend 'triton' on CPU tensors needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use backend 'auto'/'torch'"
        )
    return True


# ----------------------------------------------------------------------------- kernels and their self-check keys
def _dtypes(*tensors) -> Tuple:
    return tuple(None if t is None else t.dtype for t in tensors)


def _adam_variant(grad, col_norm_dim):
    """The kernel's norm mode: none, column norms, row norms of narrow / of at least BLOCK-wide rows."""
    if col_norm_dim is None:
        return "none"
    if col_norm_dim == 0:
        return "col"
    return "row_wide" if grad.shape[1] >= BLOCK else "row_narrow"


def _rows_apply_key(W, low, B, idx, side, lr, weight_decay, scale, residual=None, residual_coef=0.0):
    return _dtypes(W, low, B, residual), side


def _dense_apply_key(W, low, P, side, lr, weight_decay, scale, residual=None, residual_coef=0.0):
    return _dtypes(W, low, P, residual), side


# name -> (module in lowrank_optim.kernels, function, args -> (dtypes, variant))
KERNELS: Dict[str, Tuple[str, str, Callable]] = {
    "quantize_blockwise": ("quant8", "quantize_blockwise_triton", lambda x, signed: (_dtypes(x), bool(signed))),
    "dequantize_blockwise": ("quant8", "dequantize_blockwise_triton", lambda c, a, signed: ((), bool(signed))),
    "adam8bit_step": (
        "adam8bit",
        "adam8bit_step_triton",
        lambda g, *state_and_hparams, col_norm_dim=None: (_dtypes(g), _adam_variant(g, col_norm_dim)),
    ),
    "project_rows": ("projection", "project_rows_triton", lambda G, B, idx, side: (_dtypes(G, B), side)),
    "project_back_rows": ("projection", "project_back_rows_triton", lambda low, B, idx, side: (_dtypes(low, B), side)),
    "project_back_apply": ("projection", "project_back_apply_triton", _rows_apply_key),
    "project_back_apply_dense": ("projection", "project_back_apply_dense_triton", _dense_apply_key),
}

_CHECKED: Dict[Tuple, bool] = {}


def kernel_function(name: str) -> Callable:
    """The Triton wrapper of kernel ``name``, looked up at call time."""
    module, function, _ = KERNELS[name]
    return getattr(importlib.import_module(f"lowrank_optim.kernels.{module}"), function)


def _passes_self_check(name: str, device: torch.device, dtypes: Tuple, variant) -> bool:
    if device.type != "cuda" and not CPU_AS_DEVICE:
        return True
    key = (name, device, dtypes, variant)
    ok = _CHECKED.get(key)
    if ok is None:
        from lowrank_optim.kernels import selfcheck

        try:
            selfcheck.run(name, device, dtypes, variant)
            ok = True
        except Exception as e:  # a compile error, a launch failure or a mismatch
            what = f"Triton kernel {name!r} failed its self-check on {device} for dtypes {dtypes}, variant {variant!r}"
            if _BACKEND == "triton":
                raise RuntimeError(f"{what}: {e}") from e
            warnings.warn(f"{what}; using the torch path for it from now on. Error: {e}", RuntimeWarning, stacklevel=3)
            ok = False
        _CHECKED[key] = ok
    return ok


def reset_self_checks() -> None:
    """Forget every self-check result (tests; or after changing kernels at runtime)."""
    _CHECKED.clear()


def try_kernel(name: str, *args, **kwargs):
    """Run kernel ``name`` on ``args`` if the backend sends ``args[0]`` to Triton and the kernel passed its
    self-check for these dtypes; returns its result, or None when the caller must use the torch path."""
    if not kernels_for(args[0]):
        return None
    dtypes, variant = KERNELS[name][2](*args, **kwargs)
    if not _passes_self_check(name, args[0].device, dtypes, variant):
        return None
    return kernel_function(name)(*args, **kwargs)


# ----------------------------------------------------------------------------- public 8-bit API
def quantize_blockwise(x: torch.Tensor, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (uint8 codes shaped like x, fp32 absmax of shape [ceil(numel / 256)])."""
    out = try_kernel("quantize_blockwise", x, signed)
    return out if out is not None else quantize_blockwise_torch(x, signed)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """-> fp32 tensor shaped like codes."""
    out = try_kernel("dequantize_blockwise", codes, absmax, signed)
    return out if out is not None else dequantize_blockwise_torch(codes, absmax, signed)


def _check_state(grad, codes, absmax, name):
    if codes.shape != grad.shape or codes.dtype != torch.uint8 or not codes.is_contiguous():
        raise ValueError(f"{name}_codes must be contiguous uint8 with the grad's shape {tuple(grad.shape)}")
    if absmax.dtype != torch.float32 or absmax.numel() != num_blocks(grad.numel()) or not absmax.is_contiguous():
        raise ValueError(f"{name}_absmax must be contiguous fp32 with {num_blocks(grad.numel())} elements")


def adam8bit_step(
    grad,
    m_codes,
    m_absmax,
    v_codes,
    v_absmax,
    beta1: float,
    beta2: float,
    eps: float,
    col_norm_dim: Optional[int] = None,
):
    """One Adam moment update on 8-bit state, in place.  Returns ``direction = m / (sqrt(v) + eps)`` (fp32, grad's
    shape, no bias correction) and, if ``col_norm_dim`` is 0 or 1 (2-D grads only), also the L2 norms of
    ``direction`` reduced over that dim."""
    _check_state(grad, m_codes, m_absmax, "m")
    _check_state(grad, v_codes, v_absmax, "v")
    if col_norm_dim is not None and (col_norm_dim not in (0, 1) or grad.dim() != 2):
        raise ValueError("col_norm_dim must be None, 0 or 1, and needs a 2-D grad")
    args = (grad, m_codes, m_absmax, v_codes, v_absmax, float(beta1), float(beta2), float(eps))
    out = try_kernel("adam8bit_step", *args, col_norm_dim=col_norm_dim)
    return out if out is not None else adam8bit_step_torch(*args, col_norm_dim=col_norm_dim)


__all__ = [
    "BACKENDS",
    "CPU_AS_DEVICE",
    "KERNELS",
    "set_backend",
    "get_backend",
    "kernels_for",
    "try_kernel",
    "kernel_function",
    "reset_self_checks",
    "quantize_blockwise",
    "dequantize_blockwise",
    "adam8bit_step",
]
