"""Warm-started subspace iteration: track the top-r singular subspace across refreshes at O(m n r).

Gradients change slowly between refreshes, so the previous basis is already close to the new top-r subspace. A
refresh runs ``power_iters`` steps of block subspace iteration from it (for the left side, with A = G):

    Z = orth(A^T P);  Y = A Z        (two products, m n r each, and a thin orthonormalisation)
    P = orth(Y)                      (between iterations)

and ends with a Rayleigh-Ritz step, the thin SVD of Y = U_Y S V_Y^T (via Y = Q R and the SVD of the r x r R):
P = U_Y, and Q = Z V_Y for the other side. The Ritz step orders the vectors by singular value and fixes the
rotation inside the subspace, so a basis that has converged stays put (moments kept across the refresh keep their
meaning) instead of drifting inside its span as plain QR iteration would. Each iteration shrinks the tangent of the
angle to the top-r subspace by (sigma_{r+1} / sigma_r)^2.
With ``oversample`` = p > 0 the start block is the previous basis plus p seeded Gaussian columns (r + p columns
iterated, the top r Ritz vectors kept): directions that entered the gradient since the last refresh, which the old
basis cannot reach, get a chance, for (r + p) / r of the cost. The first refresh, with no previous basis, is a
seeded randomized SVD (``rsvd``'s defaults). The right side runs the
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
        "oversample": (
            0,
            int_at_least(0),
            "seeded random columns added to the previous basis before iterating "
            "(an int >= 0; clamped to min(m, n) - rank)",
        ),
    }

    def __init__(self, rank, side, shape, seed=0, power_iters: int = 1, oversample: int = 0, **options):
        super().__init__(rank, side, shape, seed, **options)
        self.power_iters = self.check_option("power_iters", power_iters)
        self.oversample = self.check_option("oversample", oversample)

    def refresh(self, state, grad):
        a = grad.float()
        anchor = "left" if self.side in ("left", "full") else "right"
        start = self.previous_basis(state, anchor)
        if start is None or start.shape != (self.shape[0 if anchor == "left" else 1], self.basis_width()):
            u, _, vh = randomized_svd(
                a, self.basis_width(), FIRST_OVERSAMPLE, FIRST_POWER_ITERS, self.generator(state, a.device), self.name
            )
            return self._store(state, u, vh)
        start = start.to(a.device)
        width = self.basis_width()
        extra = min(self.oversample, min(self.shape) - width)
        if extra > 0:
            gen = self.generator(state, a.device)
            start = torch.cat([start, torch.randn(start.shape[0], extra, generator=gen, device=a.device)], dim=1)
        # The right side is the left side of G^T: P tracks the anchor side, Q the other one.
        p, q = subspace_iteration(a if anchor == "left" else a.t(), start, self.power_iters, self.name)
        p, q = p[:, :width], q[:, :width]  # Ritz vectors come sorted by singular value
        if anchor == "left":
            return self._store(state, p, q.t())
        return self._store(state, None, p.t())


def orthonormalize(x: torch.Tensor, name: str = "power") -> torch.Tensor:
    """Orthonormal basis of span(x) (tall, full column rank expected): Cholesky QR, repeated once when the first
    pass leaves visible non-orthogonality (CholeskyQR2), with Householder QR as the fallback when the Gram matrix
    is numerically singular. On CPU Householder QR of a 5461 x 512 block runs at a few GFLOP/s, slower than the
    two m n r products together; the Gram matrix (fp64, so squaring the condition number stays exact enough up
    to cond ~1e6) and a triangular solve are matrix products and run ~10x faster."""
    q = x
    for _ in range(2):
        gram = q.t().double().matmul(q.double())
        if torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), atol=1e-5, rtol=0):
            return q
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0 or not bool(torch.isfinite(chol).all()):
            return _qr(x, name)
        q = torch.linalg.solve_triangular(chol.t().to(x.dtype), q, upper=True, left=False)  # q R^-1, R = L^T
    return q


def subspace_iteration(a: torch.Tensor, start: torch.Tensor, iters: int, name: str = "power"):
    """``iters`` block power steps on ``a a^T`` from ``start`` (m x r, any basis of the guess), then Rayleigh-Ritz.
    Returns (P, Q): approximate top-r left (m x r) and right (n x r) singular vectors of ``a``."""
    check_finite(name, a)
    p = start
    for it in range(iters):
        z = orthonormalize(a.t().matmul(p), name)  # on both sides: no sigma^2 dynamic range in fp32
        y = a.matmul(z)
        if it + 1 < iters:
            p = orthonormalize(y, name)
    # Rayleigh-Ritz through the thin factor: y = Q_y R_y and R_y = U_r S V_r^T give y's SVD (Q_y U_r) S V_r^T.
    q_y = orthonormalize(y, name)
    r_y = q_y.t().matmul(y)
    try:
        u_r, _, vh_r = torch.linalg.svd(r_y, full_matrices=False)
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ProjectorError(f"{name}: SVD of the iterate failed to converge ({err})") from err
    p, q = q_y.matmul(u_r), z.matmul(vh_r.t())
    check_finite(name, p, q)
    return p, q


__all__ = ["PowerProjector", "orthonormalize", "subspace_iteration"]
