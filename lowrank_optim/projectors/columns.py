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
        # a seeded choice needs no gradient (a sharded parameter's ranks draw it alone); norms come from rows
        self.uses_gradient = self.refreshes_by_rows = self.select == "norm"

    def refresh(self, state, grad):
        if self.select == "norm":  # left picks rows (norm across dim 1), right picks columns (norm across dim 0)
            scores = {which: grad.norm(dim=1 if which == "left" else 0) for which, _ in self.projected_dims()}
            return self.top_indices(state, scores)
        new = next_refresh_count(state)
        gen = self.generator(state, grad.device)
        for which, size in self.projected_dims():
            idx = torch.randperm(size, generator=gen, device=grad.device)[: clamp_rank(self.rank, size)]
            new[f"proj_{which}_idx"] = idx.sort().values.to(torch.int64)
        return new

    def refresh_rows(self, state, grad_rows, spread):
        """select="norm" from this rank's rows: a row's norm is local, a column's is the root of a sum of squares
        over ranks; both sides' scores in one all-reduce (m + n numbers at most)."""
        sides = dict(self.projected_dims())
        row_norms = grad_rows.norm(dim=1) if "left" in sides else None
        squares = grad_rows.square().sum(dim=0) if "right" in sides else None
        rows, columns = spread.scores(self.shape[0], row_norms, squares)
        return self.top_indices(state, {"left": rows, "right": None if columns is None else columns.sqrt()})

    def orthonormal(self, state):
        return True  # distinct columns of the identity

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
