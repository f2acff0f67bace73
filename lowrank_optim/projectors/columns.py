"""Coordinate subspace (FRUGAL-style blockwise / column selection): r rows or columns of the identity.

Projection is a gather and projection back a scatter, so no basis matrix is ever multiplied or stored."""

from __future__ import annotations

import torch

from .base import Projector, clamp_rank, next_refresh_count, one_of


class ColumnsProjector(Projector):
    """Options: ``select`` "random" (seeded, default) or "norm" (the r largest-L2-norm rows/columns of G)."""

    name = "columns"
    index_based = True
    options = {
        "select": (
            "random",
            one_of("random", "norm"),
            "'random' (seeded) or 'norm' (the r rows/columns of G with the largest L2 norm)",
        ),
    }

    def __init__(self, rank, side, shape, seed=0, select: str = "random", **options):
        super().__init__(rank, side, shape, seed, **options)
        self.select = self.check_option("select", select)

    def refresh(self, state, grad):
        new = next_refresh_count(state)
        gen = self.generator(state, grad.device) if self.select == "random" else None
        for which, size in self.projected_dims():
            r = clamp_rank(self.rank, size)
            if self.select == "random":
                idx = torch.randperm(size, generator=gen, device=grad.device)[:r]
            else:  # left picks rows (norm across dim 1), right picks columns (norm across dim 0)
                idx = torch.topk(grad.norm(dim=1 if which == "left" else 0), r).indices
            new[f"proj_{which}_idx"] = idx.sort().values.to(torch.int64)
        return new

    def indices(self, state, which):
        return state[f"proj_{which}_idx"]

    def basis(self, state, which):
        idx = self.indices(state, which)
        size = self.shape[0] if which == "left" else self.shape[1]
        out = torch.zeros(size, idx.numel(), device=idx.device)
        out[idx, torch.arange(idx.numel(), device=idx.device)] = 1.0
        return out

    def project(self, state, grad):
        out = grad
        for which, _ in self.projected_dims():
            out = out.index_select(0 if which == "left" else 1, self.indices(state, which))
        return out

    def project_back(self, state, low):
        out = low
        for which, size in reversed(self.projected_dims()):
            if which == "left":
                out = out.new_zeros(size, out.shape[1]).index_copy_(0, self.indices(state, which), out)
            else:
                out = out.new_zeros(out.shape[0], size).index_copy_(1, self.indices(state, which), out)
        return out
