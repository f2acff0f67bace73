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

from typing import Dict, Optional, Tuple

import torch

SIDES = ("left", "right", "full")


class ProjectorError(RuntimeError):
    """A basis refresh failed (e.g. the SVD did not converge); the engine decides what to do."""


class Projector:
    """Base class. Subclasses implement ``refresh`` and either ``basis`` or the index-based fast paths."""

    name = "base"
    # True when the projector's state is r integer indices into a fixed orthonormal basis (DCT, columns).
    index_based = False

    def __init__(self, rank: int, side: str, shape: Tuple[int, int], seed: int = 0, **options):
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.rank = int(rank)
        self.side = side
        self.shape = (int(shape[0]), int(shape[1]))
        self.seed = int(seed)
        self.options = options

    # --- to implement -------------------------------------------------------------------------------------------
    def refresh(self, state: Dict, grad: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Compute a new basis from ``grad`` (fp32, 2-D). Returns the new ``proj_*`` entries WITHOUT mutating
        ``state`` (the engine commits them only once every parameter's refresh succeeded). May raise
        ``ProjectorError``."""
        raise NotImplementedError

    def basis(self, state: Dict, which: str) -> torch.Tensor:
        """The explicit orthonormal basis for ``which`` in {"left", "right"}: P (m x r) or Q (n x r)."""
        raise NotImplementedError

    # --- shared behaviour ---------------------------------------------------------------------------------------
    def covers(self, state: Dict) -> bool:
        """Whether the subspace is the whole space (the update is then full-rank, e.g. an active FRUGAL block)."""
        return False

    def project(self, state: Dict, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """The projected gradient, or None for an empty subspace (rank 0: all of G is residual)."""
        if self.rank == 0:
            return None
        out = grad
        if self.side in ("left", "full"):
            out = self.basis(state, "left").t().matmul(out)
        if self.side in ("right", "full"):
            out = out.matmul(self.basis(state, "right"))
        return out

    def project_back(self, state: Dict, low: torch.Tensor) -> torch.Tensor:
        out = low
        if self.side in ("left", "full"):
            out = self.basis(state, "left").matmul(out)
        if self.side in ("right", "full"):
            out = out.matmul(self.basis(state, "right").t())
        return out

    def fused_apply(self, state: Dict, low: torch.Tensor, W: torch.Tensor, lr: float, weight_decay: float,
                    scale: float, extra: Optional[torch.Tensor]) -> bool:
        """``W <- W (1 - lr wd) - lr (scale * project_back(low) + extra)`` in one Triton pass that reads and writes
        W once, when the kernels handle W (CUDA, or a forced backend) and passed their self-check. Returns False
        when it did nothing (the caller then takes the torch path)."""
        from .. import quant

        if self.side == "full" or not quant.kernels_for(W):
            return False
        done = quant.try_kernel("project_back_apply_dense", W, low, self.basis(state, self.side), self.side, lr,
                                weight_decay, scale, residual=extra, residual_coef=1.0)
        return done is not None

    def fits(self, state: Dict) -> bool:
        """Whether a saved basis in ``state`` has this projector's shape (rank, side, matrix): a change of the
        group's settings, or a checkpoint of other settings, makes the engine compute a new basis."""
        try:
            return all(tuple(self.basis(state, which).shape) == (size, min(self.rank, *self.shape))
                       for which, size in self.projected_dims())
        except (KeyError, RuntimeError, IndexError):
            return False

    def overlap(self, old_state: Dict, new_state: Dict) -> float:
        """How much of the old subspace the new one keeps, in [0, 1]: mean of ||P_old^T P_new||_F^2 / r."""
        scores = []
        for which, _ in self.projected_dims():
            a, b = self.basis(old_state, which).float(), self.basis(new_state, which).float()
            scores.append(float((a.t() @ b).pow(2).sum()) / max(1, min(a.shape[1], b.shape[1])))
        return sum(scores) / max(1, len(scores))

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

    def expected_state_bytes(self) -> int:
        """Bytes ``refresh`` stores, from the configuration alone (for the estimator before training):
        int64 indices for index-based projectors, fp32 basis matrices otherwise (random overrides: none)."""
        if self.index_based:
            return sum(min(self.rank, size) * 8 for _, size in self.projected_dims())
        return sum(min(self.rank, *self.shape) * size * 4 for _, size in self.projected_dims())

    def state_bytes(self, state: Dict) -> int:
        return sum(v.numel() * v.element_size() for k, v in state.items()
                   if k.startswith("proj_") and isinstance(v, torch.Tensor))

    # --- helpers for subclasses ---------------------------------------------------------------------------------
    def generator(self, state: Dict, device: torch.device) -> torch.Generator:
        """A generator seeded from (seed, refresh count): every DDP rank and every resume draws the same numbers."""
        count = int(state.get("proj_refreshes", 0))
        gen = torch.Generator(device=device)
        gen.manual_seed((self.seed * 1_000_003 + count * 7919 + 12345) % (2 ** 63 - 1))
        return gen

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


__all__ = ["Projector", "ProjectorError", "SIDES", "check_finite", "orthonormal_columns", "clamp_rank",
           "next_refresh_count"]
