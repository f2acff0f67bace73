"""FRUGAL (Zmushko et al., 2025) as a preset (registry row ``frugal``): state-full Adam in a subspace, state-free
signSGD / SGD outside it (``residual="frugal"``).

Targeted parameters are those of a group with ``density`` (rho) or ``rank``; everything else is plain AdamW.
Two kinds of subspace:

* a projector (``projector`` = "columns" default, or svd / rsvd / random / dct / sst): for each matrix,
  r = max(1, round(rho * projected dim)) directions get Adam, the residual gets the state-free rule. rho = 0 makes
  the whole matrix state-free; r >= projected dim makes it plain Adam.
* ``projector="blocks"`` (BAdam-like, ``BlocksProjector`` below): round(rho * number of parameters in the group)
  whole parameters get full Adam, the others the state-free rule; which ones is re-decided every
  ``update_proj_gap`` steps by ``block_order``, and the moments of a deactivated parameter are freed.

Default projector: random ``columns`` (works per matrix on any group). Differences from the reference code, on
purpose: the low-rank path uses galore-style eps (added to sqrt(v) before bias correction, like every low-rank
method here; full-rank Adam uses torch-style eps as the reference does); the state-free step runs at
``lr * inactive_lr_scale`` while the reference also multiplies it by ``proj_params_lr_scale`` (equal at 1).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .optimizer import LowRankOptimizer
from .options import Option, OptionError, choice
from .projectors import register
from .projectors.base import Projector, next_refresh_count

BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")


def active_blocks(group: Dict, k: int) -> List[int]:
    """Indices (into ``group["params"]``) of the parameters trained with Adam during the k-th block period.

    A pure function of (group options, k), so every parameter, every rank and every resume agree on it."""
    n, order, seed = len(group["params"]), group["block_order"], group["seed"]
    a = round(n * group["density"])
    if order == "random":
        gen = torch.Generator().manual_seed((seed * 1_000_003 + k * 7919 + 12345) % (2 ** 63 - 1))
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


@register
class BlocksProjector(Projector):
    """Whole parameters as the subspace: the identity while this parameter's block is active, empty otherwise."""

    name = "blocks"
    index_based = True
    any_shape = True  # vectors and matrices alike: a block is a whole parameter
    wants_position = True
    options = (Option("block_order", "random", choice(*BLOCK_ORDERS),
                      "which parameters are active in each period: `random` (seeded), `ascending`, `descending`, "
                      "`mirror`"),)

    def __init__(self, rank, side, shape, seed=0, position: Tuple[int, int] = (0, 1), density: Optional[float] = None,
                 block_order: str = "random", group_seed: int = 0, **options):
        super().__init__(rank, "left" if side == "full" else side, shape, seed, **options)
        self.position, self.density, self.block_order, self.group_seed = position, density, block_order, group_seed

    @staticmethod
    def check_group(group: Dict) -> Optional[str]:
        if "rank" in group:
            return "projector 'blocks' takes a density (the fraction of the group's parameters), not a rank"
        if "density" in group and group["block_order"] == "mirror" and round(len(group["params"]) * group["density"]) % 2:
            return (f"block_order 'mirror' activates parameters in pairs, but round(density * "
                    f"{len(group['params'])}) is odd")
        return None

    def _active(self, k: int) -> bool:
        j, n = self.position
        group = dict(params=range(n), density=self.density, block_order=self.block_order, seed=self.group_seed)
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

    def expected_state_bytes(self) -> int:
        return 0

    def fits(self, state) -> bool:
        return True

    def overlap(self, old_state, new_state) -> float:
        return float(old_state.get("block_active", 0) == new_state.get("block_active", 0))


class FrugalAdamW(LowRankOptimizer):
    """FRUGAL with AdamW as the state-full part.

    Args (besides the engine's lr, betas, eps, weight_decay, maximize, update_proj_gap, proj_type, seed, ...):
        density: rho in [0, 1] for every group (default None: only groups that carry ``density``, ``rank`` or the
            reference's ``is_proj_params=True`` flag, which gets rho = 0.25, are targeted).
        projector: "columns" (default), any engine projector, or "blocks".
        proj_params_lr_scale: lr multiplier of the state-full update of targeted parameters (engine ``scale``), 1.0.
        reset_statistics: True (default) restarts moments and bias correction at every subspace change
            (engine ``subspace_change="reset"``); False keeps them (``"keep"``).
        inactive_update: "signsgd" (default) | "sgd" | "none"; inactive_lr_scale: 1.0.
        block_order: "random" (default, seeded by ``seed``) | "ascending" | "descending" | "mirror".
        update_proj_gap: 200 (FRUGAL's ``update_gap``).
    """

    method = "frugal"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False,
                 density=None, projector="columns", proj_params_lr_scale=1.0, reset_statistics=True,
                 inactive_update="signsgd", inactive_lr_scale=1.0, block_order="random", update_proj_gap=200,
                 **kw):
        for engine_key, own in (("scale", "proj_params_lr_scale"), ("subspace_change", "reset_statistics")):
            if engine_key in kw:
                raise TypeError(f"FrugalAdamW: pass {own} (FRUGAL's name for the engine's {engine_key})")
        self._density = density
        if projector == "blocks" or block_order != "random":
            kw["block_order"] = block_order
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         projector=projector, proj_params_lr_scale=proj_params_lr_scale,
                         reset_statistics=reset_statistics, inactive_update=inactive_update,
                         inactive_lr_scale=inactive_lr_scale, update_proj_gap=update_proj_gap, **kw)

    def add_param_group(self, param_group: Dict) -> None:
        """Groups without rank or density are targeted at the constructor's density, or at 0.25 with the
        reference's ``is_proj_params=True`` flag; others are plain AdamW."""
        g = dict(param_group)
        targeted = "rank" in g or "rank" in self.defaults
        if not targeted and "density" not in g:
            if getattr(self, "_density", None) is not None:
                g["density"] = self._density
            elif g.get("is_proj_params"):
                g["density"] = 0.25  # the reference's default
        if "rank" in g and "density" in g:
            raise OptionError(f"param group {len(self.param_groups)}: give either density or rank, not both")
        super().add_param_group(g)


__all__ = ["FrugalAdamW", "BlocksProjector", "BLOCK_ORDERS", "active_blocks"]
