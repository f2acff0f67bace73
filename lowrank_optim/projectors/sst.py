"""SST-style sampled subspace: singular directions drawn at random, favouring large singular values.

Sampling (instead of always the top-r) lets directions with smaller singular values get trained too."""

from __future__ import annotations

from typing import Optional

import torch

from .base import real_in
from .svd import SVDProjector, truncated_svd


def sst_sample(
    sigma: torch.Tensor, r: int, weight: float = 0.5, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Draw ``r`` distinct indices into ``sigma`` with ``p_i = (1 - w)/k + w * sigma_i / sum(sigma)``.

    Draws are sequential without replacement (``torch.multinomial``); the result is sorted ascending, i.e. in
    decreasing-singular-value order when ``sigma`` is sorted like an SVD's. ``generator`` must live on
    ``sigma``'s device."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"sst weight must be in [0, 1], got {weight}")
    sigma = sigma.detach().double().clamp_min(0)
    k = sigma.numel()
    r = max(1, min(int(r), k))
    total = sigma.sum()
    share = sigma / total if total > 0 else torch.full_like(sigma, 1.0 / k)
    p = (1.0 - weight) / k + weight * share
    # w = 1 with many zero singular values would leave too few categories for a draw without replacement.
    p = torch.where(p > 0, p, torch.full_like(p, 1e-300))
    idx = torch.multinomial(p, r, replacement=False, generator=generator)
    return idx.sort().values


class SSTProjector(SVDProjector):
    """Stores the sampled singular vectors like ``svd`` (proj_left m x r, proj_right n x r)."""

    name = "sst"
    options = {
        **SVDProjector.options,
        "sst_weight": (
            0.5,
            real_in(0.0, 1.0),
            "share of the draw probability proportional to sigma (in [0, 1]); the rest is uniform",
        ),
    }

    def __init__(self, rank, side, shape, seed=0, sst_weight: float = 0.5, **options):
        super().__init__(rank, side, shape, seed, **options)
        self.sst_weight = float(self.check_option("sst_weight", sst_weight))

    def refresh(self, state, grad):
        u, s, vh = truncated_svd(grad, min(grad.shape), self.name)
        idx = sst_sample(s, self.rank, self.sst_weight, self.generator(state, s.device))
        return self._store(state, u[:, idx], vh[idx])
