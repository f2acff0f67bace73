"""Randomized SVD (Halko, Martinsson & Tropp 2011): an approximate top-r subspace at O(mnk) instead of a full SVD."""

from __future__ import annotations

import torch

from .base import ProjectorError, check_finite, int_at_least
from .svd import SVDProjector


def _qr(x: torch.Tensor, name: str) -> torch.Tensor:
    try:
        return torch.linalg.qr(x).Q
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ProjectorError(f"{name}: QR failed ({err})") from err


def randomized_svd(
    grad: torch.Tensor,
    rank: int,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator = None,
    name: str = "rsvd",
    spread=None,
    rows: int = 0,
):
    """Approximate top-``rank`` (U, S, Vh) of ``grad``; power iterations sharpen a slowly decaying spectrum.

    With ``spread`` (a ``sharding.Spread``), ``grad`` is this rank's rows of a ``rows``-row matrix and the same
    operations run with the sums over rows split by rank: each ``A^T X`` and ``X^T A`` (n x k) is this rank's part,
    summed in one all-reduce; each m x k sketch ``A X`` is gathered (one all-gather) so that every rank takes the
    same QR of the same whole sketch. The gradient itself never travels; every rank returns the same factors."""
    a = grad.float()
    n = a.shape[1]
    m = a.shape[0] if spread is None else rows
    whole = (lambda x: x) if spread is None else (lambda x: spread.gather(x, m))
    mine = (lambda x: x) if spread is None else spread.mine
    total = (lambda x: x) if spread is None else spread.sum_
    rank = min(int(rank), m, n)
    k = min(rank + int(oversample), m, n)
    omega = torch.randn(n, k, generator=generator, device=a.device, dtype=a.dtype)
    q = _qr(whole(a.matmul(omega)), name)
    for _ in range(int(power_iters)):
        # Re-orthonormalise on both sides: plain (A A^T)^q A Omega loses the small directions to round-off.
        z = _qr(total(a.t().matmul(mine(q))), name)
        q = _qr(whole(a.matmul(z)), name)
    try:
        ub, s, vh = torch.linalg.svd(total(mine(q).t().matmul(a)), full_matrices=False)
    except RuntimeError as err:
        raise ProjectorError(f"{name}: SVD failed to converge ({err})") from err
    u = q.matmul(ub[:, :rank])
    s, vh = s[:rank], vh[:rank]
    check_finite(name, u, vh)
    return u, s, vh


class RSVDProjector(SVDProjector):
    """Same stored layout as ``svd`` (proj_left m x r, proj_right n x r); only the factorisation differs."""

    name = "rsvd"
    options = {
        **SVDProjector.options,
        "oversample": (10, int_at_least(0), "extra random directions sampled beyond the rank (an int >= 0)"),
        "power_iters": (2, int_at_least(0), "power iterations sharpening the sampled range (an int >= 0)"),
    }

    def __init__(self, rank, side, shape, seed=0, oversample: int = 10, power_iters: int = 2, **options):
        super().__init__(rank, side, shape, seed, **options)
        self.oversample = self.check_option("oversample", oversample)
        self.power_iters = self.check_option("power_iters", power_iters)

    # the range finder needs only sums over rows of n x k products and m x k sketches (see ``randomized_svd``)
    refreshes_by_rows = True

    def refresh(self, state, grad):
        gen = self.generator(state, grad.device)
        u, _, vh = randomized_svd(grad, self.rank, self.oversample, self.power_iters, gen, self.name)
        return self._store(state, u, vh)

    def refresh_rows(self, state, grad_rows, spread):
        gen = self.generator(state, grad_rows.device)  # seeded by (parameter, refresh count): the same on every rank
        u, _, vh = randomized_svd(
            grad_rows, self.rank, self.oversample, self.power_iters, gen, self.name, spread, self.shape[0]
        )
        return self._store(state, u, vh)
