"""Warm-started subspace iteration: track the top-r singular subspace across refreshes at O(m n r).

Gradients change slowly between refreshes, so the previous basis is already close to the new top-r subspace. A
refresh runs ``power_iters`` steps of block subspace iteration from it (for the left side, with A = G):

    Z = orth(A^T P);  Y = A Z        (two products, m n r each, and a thin QR)
    P = orth(Y)                      (between iterations)

and ends with a Rayleigh-Ritz step, the thin SVD of Y = U_Y S V_Y^T (m r^2): P = U_Y, and Q = Z V_Y for the other
side. The Ritz step orders the vectors by singular value and fixes the rotation inside the subspace, so a basis
that has converged stays put (moments kept across the refresh keep their meaning) instead of drifting inside its
span as plain QR iteration would. Each iteration shrinks the angle to the top-r subspace by (sigma_{r+1}/sigma_r)^2.
The first refresh, with no previous basis, is a seeded randomized SVD (``rsvd``'s defaults). The right side runs the
same iteration on G^T. No full SVD is ever taken: O(m n r) instead of O(m n min(m, n)).
"""
from __future__ import annotations

import torch

from .base import ProjectorError, check_finite, int_at_least
from .rsvd import _qr, randomized_svd
from .svd import SVDProjector

FIRST_OVERSAMPLE = 10
FIRST_POWER_ITERS = 2


class PowerProjector(SVDProjector):
    """Stored layout as ``svd`` (proj_left m x r, proj_right n x r): the state holds the basis only."""

    name = "power"
    options = {
        **SVDProjector.options,
        "power_iters": (1, int_at_least(1), "subspace iterations per refresh from the previous basis (an int >= 1)"),
    }

    def __init__(self, rank, side, shape, seed=0, power_iters: int = 1, **options):
        super().__init__(rank, side, shape, seed, **options)
        self.power_iters = self.check_option("power_iters", power_iters)

    def refresh(self, state, grad):
        a = grad.float()
        anchor = "left" if self.side in ("left", "full") else "right"
        start = self.previous_basis(state, anchor)
        if start is None or start.shape != (self.shape[0 if anchor == "left" else 1], self.basis_width()):
            u, _, vh = randomized_svd(a, self.basis_width(), FIRST_OVERSAMPLE, FIRST_POWER_ITERS,
                                      self.generator(state, a.device), self.name)
            return self._store(state, u, vh)
        # The right side is the left side of G^T: P tracks the anchor side, Q the other one.
        p, q = subspace_iteration(a if anchor == "left" else a.t(), start.to(a.device), self.power_iters, self.name)
        if anchor == "left":
            return self._store(state, p, q.t())
        return self._store(state, None, p.t())


def subspace_iteration(a: torch.Tensor, start: torch.Tensor, iters: int, name: str = "power"):
    """``iters`` block power steps on ``a a^T`` from ``start`` (m x r, any basis of the guess), then Rayleigh-Ritz.
    Returns (P, Q): approximate top-r left (m x r) and right (n x r) singular vectors of ``a``."""
    check_finite(name, a)
    p = start
    for it in range(iters):
        z = _qr(a.t().matmul(p), name)  # re-orthonormalised on both sides: no sigma^2 dynamic range in fp32
        y = a.matmul(z)
        if it + 1 < iters:
            p = _qr(y, name)
    try:
        u_y, _, vh_y = torch.linalg.svd(y, full_matrices=False)
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ProjectorError(f"{name}: SVD of the iterate failed to converge ({err})") from err
    p, q = u_y, z.matmul(vh_y.t())
    check_finite(name, p, q)
    return p, q


__all__ = ["PowerProjector", "subspace_iteration"]
