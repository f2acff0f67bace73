"""SVD-free subspace from a fixed orthonormal DCT-II basis (DCT-AdamW style): pick the r cosine vectors that carry
the most gradient energy. The state is r indices; the d x d matrix is shared by every weight of that size."""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from .. import quant
from .base import Projector, one_of

_DCT_CACHE: Dict[Tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
_TWIDDLE_CACHE: Dict[Tuple[int, torch.device, torch.dtype], Tuple[torch.Tensor, ...]] = {}


def _canonical_device(device) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one cache entry
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def dct_matrix(d: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (d x d, rows are the basis vectors), cached per (d, device, dtype)."""
    key = (int(d), _canonical_device(device), dtype)
    mat = _DCT_CACHE.get(key)
    if mat is None:
        i = torch.arange(d, dtype=torch.float64).unsqueeze(1)
        j = torch.arange(d, dtype=torch.float64).unsqueeze(0)
        mat = math.sqrt(2.0 / d) * torch.cos(math.pi * i * (2 * j + 1) / (2 * d))
        mat[0] *= math.sqrt(0.5)
        mat = mat.to(device=key[1], dtype=dtype)  # built in fp64 so every dtype gets a correctly rounded copy
        _DCT_CACHE[key] = mat
    return mat


def _twiddles(n: int, device, dtype):
    """cos/sin of pi k / (2n) and the orthonormal scale per coefficient k, cached like the DCT matrix."""
    key = (n, _canonical_device(device), dtype)
    if key not in _TWIDDLE_CACHE:
        k = torch.arange(n, dtype=torch.float64)
        theta = math.pi * k / (2 * n)
        scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
        scale[0] = math.sqrt(1.0 / n)
        _TWIDDLE_CACHE[key] = tuple(t.to(device=key[1], dtype=dtype) for t in (theta.cos(), theta.sin(), scale))
    return _TWIDDLE_CACHE[key]


def dct_fft(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dim via one FFT (Makhoul 1980): equals ``x @ dct_matrix(n).T``."""
    n = x.shape[-1]
    cos, sin, scale = _twiddles(n, x.device, x.dtype)
    # Even samples in order, then odd samples reversed: the DCT becomes a twiddled DFT of this sequence.
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spec = torch.fft.fft(v, dim=-1)
    return (spec.real * cos + spec.imag * sin) * scale  # Re(e^{-i pi k / 2n} V_k)


def idct_fft(y: torch.Tensor) -> torch.Tensor:
    """Inverse of ``dct_fft`` along the last dim (``y @ dct_matrix(n)``), also one FFT."""
    n = y.shape[-1]
    cos, sin, scale = _twiddles(n, y.device, y.dtype)
    y = y / scale
    # V_k = e^{i pi k / 2n} (Y_k - i Y_{n-k}) with Y_n = 0, rebuilt from the real coefficients.
    y_rev = torch.cat([torch.zeros_like(y[..., :1]), y[..., 1:].flip(-1)], dim=-1)
    spec = torch.complex(y * cos + y_rev * sin, y * sin - y_rev * cos)
    v = torch.fft.ifft(spec, dim=-1).real
    half = (n + 1) // 2
    out = torch.empty_like(v)
    out[..., ::2] = v[..., :half]
    out[..., 1::2] = v[..., half:].flip(-1)
    return out


class DCTProjector(Projector):
    """Options: ``dct_norm`` "l1" (default) / "l2" ranks the coefficients; ``dct_impl`` "matmul" (default) / "fft"."""

    name = "dct"
    index_based = True
    options = {
        "dct_norm": ("l1", one_of("l1", "l2"), "norm ranking the DCT coefficients: 'l1' or 'l2'"),
        "dct_impl": (
            "matmul",
            one_of("matmul", "fft"),
            "'matmul' (DCT matrix, gathered rows) or 'fft' (O(d log d) transform per row/column)",
        ),
    }

    def __init__(self, rank, side, shape, seed=0, dct_norm: str = "l1", dct_impl: str = "matmul", **options):
        super().__init__(rank, side, shape, seed, **options)
        self.dct_norm = self.check_option("dct_norm", dct_norm)
        self.dct_impl = self.check_option("dct_impl", dct_impl)
        # a right-side transform acts along each row, so a rank ranks coefficients from its own rows; a left-side
        # one mixes all rows (the gradient is gathered for it)
        self.refreshes_by_rows = side == "right"

    # --- transforms along one dim: "left" acts on dim 0 (D @ G), "right" on dim 1 (G @ D^T) --------------------
    def _coefficients(self, grad, which):
        if self.dct_impl == "fft":
            return dct_fft(grad.t()).t() if which == "left" else dct_fft(grad)
        d = dct_matrix(grad.shape[0 if which == "left" else 1], grad.device, grad.dtype)
        return d.matmul(grad) if which == "left" else grad.matmul(d.t())

    def _forward(self, x, which, idx):
        if self.dct_impl == "matmul" and quant.kernels_for(x):  # gathers D[idx] inside the kernel
            out = quant.try_kernel("project_rows", x, dct_matrix(self._size(which), x.device, x.dtype), idx, which)
            if out is not None:
                return out
        if self.dct_impl == "fft":  # full transform, then keep the chosen coefficients
            return self._coefficients(x, which).index_select(0 if which == "left" else 1, idx)
        rows = dct_matrix(self._size(which), x.device, x.dtype).index_select(0, idx)  # r x d, a temporary
        return rows.matmul(x) if which == "left" else x.matmul(rows.t())

    def _backward(self, low, which, idx):
        d = self._size(which)
        if self.dct_impl == "matmul" and quant.kernels_for(low):
            out = quant.try_kernel("project_back_rows", low, dct_matrix(d, low.device, low.dtype), idx, which)
            if out is not None:
                return out
        if self.dct_impl == "fft":  # zero-fill the unchosen coefficients, then inverse transform
            if which == "left":
                full = low.new_zeros(d, low.shape[1]).index_copy_(0, idx, low)
                return idct_fft(full.t()).t()
            return idct_fft(low.new_zeros(low.shape[0], d).index_copy_(1, idx, low))
        rows = dct_matrix(d, low.device, low.dtype).index_select(0, idx)
        return rows.t().matmul(low) if which == "left" else low.matmul(rows)

    def _size(self, which):
        return self.shape[0] if which == "left" else self.shape[1]

    # --- contract ----------------------------------------------------------------------------------------------
    def refresh(self, state, grad):
        scores = {}
        for which, _ in self.projected_dims():
            coeff = self._coefficients(grad, which)
            dim = 1 if which == "left" else 0  # reduce over the non-projected dim
            scores[which] = coeff.abs().sum(dim) if self.dct_norm == "l1" else coeff.norm(dim=dim)
        return self.top_indices(state, scores)

    def refresh_rows(self, state, grad_rows, spread):
        """Right side from this rank's rows: per coefficient, its part of the sum over rows (of |c| or c^2),
        summed over ranks in one all-reduce of n numbers."""
        coeff = self._coefficients(grad_rows, "right")
        part = coeff.abs().sum(0) if self.dct_norm == "l1" else coeff.square().sum(0)
        _, total = spread.scores(self.shape[0], None, part)
        return self.top_indices(state, {"right": total if self.dct_norm == "l1" else total.sqrt()})

    def fused_apply(self, state, low, W, lr, weight_decay, scale, extra):
        if self.side == "full" or self.dct_impl != "matmul" or not quant.kernels_for(W):
            return False
        basis = dct_matrix(self._size(self.side), W.device, torch.float32)
        done = quant.try_kernel(
            "project_back_apply",
            W,
            low,
            basis,
            self.indices(state, self.side),
            self.side,
            lr,
            weight_decay,
            scale,
            residual=extra,
            residual_coef=1.0,
        )
        return done is not None

    def orthonormal(self, state):
        return True  # rows of the orthonormal DCT-II matrix

    def indices(self, state, which):
        return state[f"proj_{which}_idx"]

    def basis(self, state, which):
        idx = self.indices(state, which)
        return dct_matrix(self._size(which), idx.device).index_select(0, idx).t()

    def project(self, state, grad):
        out = grad
        for which, _ in self.projected_dims():
            out = self._forward(out, which, self.indices(state, which))
        return out

    def project_back(self, state, low):
        out = low
        for which, _ in reversed(self.projected_dims()):
            out = self._backward(out, which, self.indices(state, which))
        return out
