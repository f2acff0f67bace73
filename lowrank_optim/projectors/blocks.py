"""Whole parameters as the subspace (BAdam-like blocks, FRUGAL's ``blocks``): in each period of
``update_proj_gap`` steps, round(density x number of parameters in the group) parameters are "active" (the projector
is the identity: full Adam) and the others "inactive" (the subspace is empty: everything is residual). Which ones is
a pure function of (group options, period), so every parameter, rank and resume agrees."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .base import Projector, next_refresh_count, one_of

BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")


def active_blocks(group: Dict, k: int) -> List[int]:
    """Indices (into ``group["params"]``) of the parameters trained with Adam during the k-th block period.

    A pure function of (group options, k), so every parameter, every rank and every resume agree on it."""
    n, order, seed = len(group["params"]), group["block_order"], group["seed"]
    a = round(n * group["density"])
    if order == "random":
        gen = torch.Generator().manual_seed((seed * 1_000_003 + k * 7919 + 12345) % (2**63 - 1))
        return torch.randperm(n, generator=gen)[:a].tolist()
    if order == "ascending":  # consecutive windows, wrapping around
        return [(k * a + i) % n for i in range(a)]
    if order == "descending":
        return [(n - 1 - k * a - i) % n for i in range(a)]
    # mirror: pairs (i, n-1-i) walking inwards from both ends (a is even, checked at validation)
    half, pairs = n // 2, a // 2
    if half == 0 or pairs == 0:
        return []
    first = [(k * pairs + i) % half for i in range(pairs)]
    return first + [n - 1 - i for i in first]


class BlocksProjector(Projector):
    """Whole parameters as the subspace: the identity while this parameter's block is active, empty otherwise."""

    name = "blocks"
    index_based = True
    any_shape = True  # vectors and matrices alike: a block is a whole parameter
    wants_position = True
    elementwise = True  # project and project back act entry by entry: a rank's rows project on their own
    uses_gradient = False  # which blocks are active follows from (seed, refresh count) alone
    options = {
        "block_order": (
            "random",
            one_of(*BLOCK_ORDERS),
            "which parameters are active in each period: `random` (seeded), `ascending`, `descending`, `mirror`",
        )
    }

    def __init__(self, rank, side, shape, seed=0, block_order: str = "random", **context):
        super().__init__(rank, "left" if side == "full" else side, shape, seed, **context)
        self.block_order = self.check_option("block_order", block_order)
        # where this parameter sits, given by the engine: its index among the group's n parameters, the group's
        # density (the fraction of parameters active) and the group's seed (the same draw for every parameter)
        self.position: Tuple[int, int] = context.get("position", (0, 1))
        self.density: Optional[float] = context.get("density")
        self.group_seed: int = context.get("group_seed", 0)

    @staticmethod
    def check_group(group: Dict) -> Optional[str]:
        if "rank" in group:
            return "projector 'blocks' takes a density (the fraction of the group's parameters), not a rank"
        if (
            "density" in group
            and group["block_order"] == "mirror"
            and round(len(group["params"]) * group["density"]) % 2
        ):
            return (
                f"block_order 'mirror' activates parameters in pairs, but round(density * "
                f"{len(group['params'])}) is odd"
            )
        return None

    def _active(self, k: int) -> bool:
        j, n = self.position
        group = dict(params=range(n), density=self.density or 0.0, block_order=self.block_order, seed=self.group_seed)
        return j in active_blocks(group, k)

    def refresh(self, state, grad):
        new = next_refresh_count(state)
        new["block_active"] = int(self._active(int(state.get("proj_refreshes", 0))))
        return new

    def covers(self, state) -> bool:
        return bool(state.get("block_active", 0))

    def project(self, state, grad):
        return grad if self.covers(state) else None

    def project_back(self, state, low):
        return low

    def basis(self, state, which):
        size = self.shape[0] if which == "left" else self.shape[1]
        return torch.eye(size) if self.covers(state) else torch.zeros(size, 0)

    def low_rank_shape(self):
        return self.shape if self._active(0) else (self.shape[0], 0)

    def state_layout(self):
        return []

    def fits(self, state) -> bool:
        return True

    def overlap(self, old_state, new_state) -> float:
        return float(old_state.get("block_active", 0) == new_state.get("block_active", 0))
