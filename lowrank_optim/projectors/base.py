"""The projector contract shared by every low-rank method.

A projector object holds configuration only (rank, side, options). Everything that changes during training lives in
a per-parameter ``state`` dict of tensors and numbers (the optimizer's state), under keys starting with ``proj_``, so
checkpoints load with ``torch.load(weights_only=True)`` and resume exactly.

Sides, for a 2-D gradient ``G`` of shape (m, n):
  * ``left``:  basis P (m x r), ``project(G) = P^T G`` (r x n), ``project_back(L) = P L``
  * ``right``: basis Q (n x r), ``project(G) = G Q`` (m x r),   ``project_back(L) = L Q^T``
  * ``full``:  both,             ``project(G) = P^T G Q`` (r x r)
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..state_layout import StateTensor, rank_bytes, state_tensor

SIDES = ("left", "right", "full")
# |<old_i, new_i>| at or above this means new vector i continues old vector i, so its sign follows the old one;
# below it the two are unrelated (chance level is ~1/sqrt(d)) and a fixed convention decides instead.
SIGN_ALIGN_MIN = 0.1


def one_of(*values) -> Callable[[object], bool]:
    """Check for an option taking one of ``values`` (exact type: True is not 1, 8.0 is not 8)."""
    return lambda v: any(type(v) is type(x) and v == x for x in values)


def int_at_least(low: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def real_in(low: float, high: float) -> Callable[[object], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high


class ProjectorError(RuntimeError):
    """A basis refresh failed (e.g. the SVD did not converge); the engine decides what to do."""


class Projector:
    """Base class. Subclasses implement ``refresh`` and either ``basis`` or the index-based fast paths."""

    name = "base"
    # True when the projector's state is r integer indices into a fixed orthonormal basis (DCT, columns).
    index_based = False
    # False when ``refresh`` needs no gradient (a seeded draw): a sharded parameter's ranks then draw it alone.
    uses_gradient = True
    # True when ``refresh_rows`` computes the new basis from one rank's rows of a row-sharded gradient with
    # collectives smaller than the gradient; else a sharded parameter's gradient is gathered for ``refresh``.
    refreshes_by_rows = False
    # Constructor options this projector reads from a param group: name -> (default, check, doc). ``check(value)``
    # returns whether the value is valid; the constructor raises ValueError (naming key, value and doc) otherwise.
    options: Dict[str, Tuple[object, Callable[[object], bool], str]] = {}

    def __init__(self, rank: int, side: str, shape: Tuple[int, int], seed: int = 0, **options):
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.rank = int(rank)
        self.side = side
        self.shape = (int(shape[0]), int(shape[1]))
        self.seed = int(seed)
        self.extra_options = options  # undeclared keys are tolerated (a group's options reach every projector)

    def check_option(self, key: str, value):
        """``value`` if valid for the declared option ``key``, else ValueError naming the key, value and doc."""
        _, ok, doc = type(self).options[key]
        if not ok(value):
            raise ValueError(f"{self.name} projector: invalid {key} {value!r} ({doc})")
        return value

    # --- to implement -------------------------------------------------------------------------------------------
    def refresh(self, state: Dict, grad: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Compute a new basis from ``grad`` (fp32, 2-D). Returns the new ``proj_*`` entries WITHOUT mutating
        ``state`` (the engine commits them only once every parameter's refresh succeeded). May raise
        ``ProjectorError``."""
        raise NotImplementedError

    def refresh_rows(self, state: Dict, grad_rows: torch.Tensor, spread) -> Dict[str, torch.Tensor]:
        """``refresh`` for a gradient whose rows are spread over ranks (``grad_rows``: this rank's rows of the
        (m, n) gradient, ``spread``: a ``sharding.Spread``), offered where ``refreshes_by_rows`` is True. Every rank
        calls the same collectives in the same order and returns the same whole entries (what ``refresh`` returns
        for the whole gradient, up to rounding). Must not mutate ``state``."""
        raise NotImplementedError

    def basis(self, state: Dict, which: str) -> torch.Tensor:
        """The explicit orthonormal basis for ``which`` in {"left", "right"}: P (m x r) or Q (n x r)."""
        raise NotImplementedError

    # --- shared behaviour ---------------------------------------------------------------------------------------
    def orthonormal(self, state: Dict) -> bool:
        """Whether the basis in ``state`` has orthonormal columns to working precision (``P^T P = I``), so that
        norms outside the subspace follow from norms inside it. False unless a projector knows it."""
        return False

    def covers(self, state: Dict) -> bool:
        """Whether the subspace is the whole space (the update is then full-rank, e.g. an active FRUGAL block)."""
        return False

    def project(self, state: Dict, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """The projected gradient, or None for an empty subspace (rank 0: all of G is residual)."""
        if self.rank == 0:
            return None
        out = grad
        if self.side in ("left", "full"):
            out = self.basis(state, "left").to(out.dtype).t().matmul(out)
        if self.side in ("right", "full"):
            out = out.matmul(self.basis(state, "right").to(out.dtype))
        return out

    def project_back(self, state: Dict, low: torch.Tensor) -> torch.Tensor:
        out = low
        if self.side in ("left", "full"):
            out = self.basis(state, "left").to(out.dtype).matmul(out)
        if self.side in ("right", "full"):
            out = out.matmul(self.basis(state, "right").to(out.dtype).t())
        return out

    def add_back(self, state: Dict, low: torch.Tensor, out: torch.Tensor, alpha: float = 1.0) -> None:
        """``out += alpha * project_back(low)`` in place: a one-sided basis projects back straight into ``out`` (one
        GEMM, no full-size temporary); index-based projectors use their own projection back."""
        if self.side != "full" and not self.index_based:
            basis = self.basis(state, self.side).to(device=low.device, dtype=low.dtype)
            if self.side == "left":
                out.addmm_(basis, low, alpha=alpha)
            else:
                out.addmm_(low, basis.t(), alpha=alpha)
            return
        out.add_(self.project_back(state, low), alpha=alpha)

    def fused_apply(
        self,
        state: Dict,
        low: torch.Tensor,
        W: torch.Tensor,
        lr: float,
        weight_decay: float,
        scale: float,
        extra: Optional[torch.Tensor],
    ) -> bool:
        """``W <- W (1 - lr wd) - lr (scale * project_back(low) + extra)`` in one Triton pass that reads and writes
        W once, when the kernels handle W (CUDA, or a forced backend) and passed their self-check. Returns False
        when it did nothing (the caller then takes the torch path)."""
        from .. import quant

        if self.side == "full" or not quant.kernels_for(W):
            return False
        done = quant.try_kernel(
            "project_back_apply_dense",
            W,
            low,
            self.basis(state, self.side),
            self.side,
            lr,
            weight_decay,
            scale,
            residual=extra,
            residual_coef=1.0,
        )
        return done is not None

    def fits(self, state: Dict) -> bool:
        """Whether a saved basis in ``state`` has this projector's shape (rank, side, matrix): a change of the
        group's settings, or a checkpoint of other settings, makes the engine compute a new basis."""
        try:
            return all(
                tuple(self.basis(state, which).shape) == (size, min(self.rank, *self.shape))
                for which, size in self.projected_dims()
            )
        except (KeyError, RuntimeError, IndexError):
            return False

    def low_rank_shape(self) -> Tuple[int, int]:
        m, n = self.shape
        r = self.rank
        return {"left": (r, n), "right": (m, r), "full": (r, r)}[self.side]

    def rotation(self, old_state: Dict, new_state: Dict) -> Dict[str, torch.Tensor]:
        """Change-of-basis matrices ``new^T old`` (r x r) per projected side, to carry moments into a new subspace."""
        out = {}
        for which in ("left", "right"):
            if self.side in (which, "full"):
                out[which] = self.basis(new_state, which).t().matmul(self.basis(old_state, which))
        return out

    def overlap(self, old_state: Dict, new_state: Dict) -> float:
        """How much of the new subspace the old one already spans, in [0, 1]: ``||P_old^T P_new||_F^2 / r`` per
        projected side (r the larger basis width), averaged over sides. 1 for the same subspace whatever the basis
        inside it, 0 for orthogonal ones. Index-based projectors: the fraction of shared indices (the same value,
        since their basis vectors are rows of one orthonormal matrix)."""
        values = []
        for which, _ in self.projected_dims():
            if self.index_based:
                old, new = self.indices(old_state, which), self.indices(new_state, which)
                values.append(int(torch.isin(new, old).sum()) / max(old.numel(), new.numel()))
            else:
                old, new = self.basis(old_state, which), self.basis(new_state, which)
                width = max(old.shape[1], new.shape[1])
                values.append(float(old.t().matmul(new).square().sum()) / width)
        return min(1.0, max(0.0, sum(values) / len(values)))  # clamped: quantized bases are orthonormal to ~1e-2

    def state_layout(self) -> List[StateTensor]:
        """The tensors ``refresh`` stores, from the configuration alone (for the estimator before training):
        int64 indices for index-based projectors, fp32 basis matrices otherwise (random, blocks: none)."""
        if self.index_based:
            return [state_tensor((min(self.rank, size),), torch.int64) for _, size in self.projected_dims()]
        return [state_tensor((size, min(self.rank, *self.shape)), torch.float32) for _, size in self.projected_dims()]

    def expected_state_bytes(self) -> int:
        """Bytes ``refresh`` stores (one process)."""
        return rank_bytes(self.state_layout())

    def state_bytes(self, state: Dict) -> int:
        return sum(
            v.numel() * v.element_size()
            for k, v in state.items()
            if k.startswith("proj_") and isinstance(v, torch.Tensor)
        )

    # --- helpers for subclasses ---------------------------------------------------------------------------------
    def generator(self, state: Dict, device: torch.device) -> torch.Generator:
        """A generator seeded from (seed, refresh count): every DDP rank and every resume draws the same numbers."""
        count = int(state.get("proj_refreshes", 0))
        gen = torch.Generator(device=device)
        gen.manual_seed((self.seed * 1_000_003 + count * 7919 + 12345) % (2**63 - 1))
        return gen

    def top_indices(self, state: Dict, scores: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """New entries of an index-based projector: per projected side, the indices of the r largest ``scores``
        (sorted, int64)."""
        new = next_refresh_count(state)
        for which, size in self.projected_dims():
            idx = torch.topk(scores[which], clamp_rank(self.rank, size)).indices
            new[f"proj_{which}_idx"] = idx.sort().values.to(torch.int64)
        return new

    def projected_dims(self):
        """(which, size) for each projected side: left projects dim m, right projects dim n."""
        m, n = self.shape
        dims = []
        if self.side in ("left", "full"):
            dims.append(("left", m))
        if self.side in ("right", "full"):
            dims.append(("right", n))
        return dims


def next_refresh_count(state: Dict) -> Dict[str, int]:
    return {"proj_refreshes": int(state.get("proj_refreshes", 0)) + 1}


def check_finite(name: str, *tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ProjectorError(f"{name} projector produced non-finite values")


def orthonormal_columns(x: torch.Tensor) -> torch.Tensor:
    """Q factor with a deterministic sign (diag(R) >= 0), so equal inputs give equal bases."""
    q, r = torch.linalg.qr(x)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


def clamp_rank(rank: int, size: int) -> int:
    return max(1, min(int(rank), int(size)))


def canonical_signs(new: torch.Tensor, old: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``new`` with each column's sign fixed: the sign of ``<old_i, new_i>`` where that overlap is at least
    ``SIGN_ALIGN_MIN`` (the vector continues the old one, so moments kept across the refresh keep their meaning),
    otherwise the sign that makes the column's largest-magnitude entry (first one on ties) positive. A column's
    sign is otherwise arbitrary: a rounding-level change of the gradient can flip what the SVD returns."""
    peak = new.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(new.gather(0, peak)).squeeze(0)
    if old is not None and old.shape == new.shape:
        dots = (old * new).sum(dim=0)
        signs = torch.where(dots.abs() >= SIGN_ALIGN_MIN, torch.sign(dots), signs)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return new * signs  # exact: only sign bits change


__all__ = [
    "Projector",
    "ProjectorError",
    "SIDES",
    "SIGN_ALIGN_MIN",
    "canonical_signs",
    "check_finite",
    "orthonormal_columns",
    "clamp_rank",
    "next_refresh_count",
    "one_of",
    "int_at_least",
    "real_in",
]
