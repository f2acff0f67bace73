"""FRUGAL (Zmushko et al., 2025) as a preset: state-full Adam in a subspace, state-free signSGD / SGD outside it.

Targeted parameters are those of a group with ``density`` (rho) or ``rank``; everything else is plain AdamW
(numerically ``torch.optim.AdamW``). Two kinds of subspace:

* a projector (``projector`` = "columns" default, or svd / rsvd / random / dct / sst): for each matrix,
  r = max(1, round(rho * projected dim)) directions get Adam, the residual gets the state-free rule (engine's
  ``frugal`` residual). rho = 0 makes the whole matrix state-free; r >= projected dim makes it plain Adam.
* ``projector="blocks"`` (BAdam-like): round(rho * number of parameters in the group) whole parameters get full
  Adam, the others the state-free rule; which ones is re-decided every ``update_proj_gap`` steps by
  ``block_order``, and the moments of a deactivated parameter are freed.

Default projector: the reference's ``frugal`` alias is blockwise for pre-training and random columns
("coord_adamw") for fine-tuning; we default to random ``columns`` because it works per matrix on any group. The
reference's Galore-style variant defaults to ``svd``.

Differences from the reference code, on purpose: the low-rank path uses galore-style eps (added to sqrt(v) before
bias correction, like every low-rank method here; whole-matrix Adam uses torch-style eps as the reference does); the
state-free step runs at ``lr * inactive_lr_scale`` while the reference also multiplies it by
``proj_params_lr_scale`` (identical at the default proj_params_lr_scale = 1).
"""
from __future__ import annotations

import numbers
from typing import Dict, List

import torch

from .inner import INNER_RULES
from .optimizer import LowRankOptimizer, matrix_shape, side_for
from .residual import state_free_direction

BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")


def projected_dim(group: Dict, p: torch.Tensor) -> int:
    """Size of the dimension the subspace is chosen in (rho is a fraction of it)."""
    m, n = matrix_shape(p)
    side = side_for((m, n), group["proj_type"])
    return {"left": m, "right": n}.get(side, min(m, n))


def density_rank(density: float, dim: int) -> int:
    """r = round(rho * dim), at least 1 unless rho is exactly 0 (then nothing is state-full)."""
    r = round(density * dim)
    return max(1, r) if density > 0 else 0


def active_blocks(group: Dict, k: int) -> List[int]:
    """Indices (into group["params"]) of the parameters trained with Adam during the k-th block period.

    A pure function of (group options, k), so every parameter, every rank and every resume agree on it."""
    n = len(group["params"])
    a = round(n * group["density"])
    order = group["block_order"]
    if order == "random":
        gen = torch.Generator().manual_seed((group["seed"] * 1_000_003 + k * 7919 + 12345) % (2 ** 63 - 1))
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

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False,
                 density=None, projector="columns", proj_params_lr_scale=1.0, reset_statistics=True,
                 inactive_update="signsgd", inactive_lr_scale=1.0, block_order="random", update_proj_gap=200,
                 **kw):
        if "scale" in kw:
            raise TypeError("FrugalAdamW: pass proj_params_lr_scale (FRUGAL's name for the engine's scale)")
        if "subspace_change" in kw:
            raise TypeError("FrugalAdamW: pass reset_statistics (True -> 'reset', False -> 'keep')")
        self._frugal_defaults = dict(block_order=block_order)
        self._density = density
        kw.setdefault("inner", "adam")
        kw.setdefault("residual", "frugal")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         projector=projector, scale=proj_params_lr_scale,
                         subspace_change="reset" if reset_statistics else "keep",
                         inactive_update=inactive_update, inactive_lr_scale=inactive_lr_scale,
                         update_proj_gap=update_proj_gap, **kw)
        self.defaults.update(self._frugal_defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Dict) -> None:
        g = dict(param_group)
        # FRUGAL's own names for engine keys, accepted in groups as in the constructor
        if "proj_params_lr_scale" in g:
            g["scale"] = g.pop("proj_params_lr_scale")
        if "reset_statistics" in g:
            g["subspace_change"] = "reset" if g.pop("reset_statistics") else "keep"
        targeted = "rank" in g or "rank" in self.defaults
        if not targeted and "density" not in g:
            if self._density is not None:
                g["density"] = self._density
            elif g.get("is_proj_params"):
                g["density"] = 0.25  # the reference's default
        for key, value in self._frugal_defaults.items():
            g.setdefault(key, value)
        super().add_param_group(g)

    def _validate_group(self, g: Dict, i: int) -> None:
        blocks = g["projector"] == "blocks"
        if "density" not in g:
            if blocks and "rank" in g:
                raise ValueError(f"param group {i}: projector 'blocks' takes a density, not a rank")
            super()._validate_group(g, i)
            return
        d = g["density"]
        if not isinstance(d, numbers.Real) or isinstance(d, bool) or not 0 <= d <= 1:
            raise ValueError(f"param group {i}: invalid density {d!r} (must be a number in [0, 1])")
        if "rank" in g:
            raise ValueError(f"param group {i}: give either density or rank, not both")
        # The engine validates low-rank keys only for groups with a rank; a density group is one too.
        check = dict(g, rank=1)
        if blocks:  # "blocks" is FRUGAL's own subspace, not an engine projector
            check["projector"] = "columns"
            if g.get("block_order") not in BLOCK_ORDERS:
                raise ValueError(f"param group {i}: invalid block_order {g.get('block_order')!r}; "
                                 f"valid: {list(BLOCK_ORDERS)}")
            if g["block_order"] == "mirror" and round(len(g["params"]) * d) % 2:
                raise ValueError(f"param group {i}: block_order 'mirror' activates parameters in pairs, but "
                                 f"round(density * {len(g['params'])}) is odd")
        super()._validate_group(check, i)

    # ------------------------------------------------------------------ per-parameter mode
    def rank_for(self, group: Dict, p: torch.Tensor) -> int:
        if "density" in group:
            return density_rank(group["density"], projected_dim(group, p))
        return group["rank"]

    def _is_lowrank(self, group: Dict, p: torch.Tensor) -> bool:
        if "density" not in group:
            return super()._is_lowrank(group, p)
        if group["projector"] == "blocks" or p.dim() < 2:
            return False
        return 0 < self.rank_for(group, p) < projected_dim(group, p)

    def _mode(self, group: Dict, p: torch.Tensor) -> str:
        """For a parameter off the low-rank path: "plain" (engine AdamW), "active" (full Adam at the targeted
        lr scale) or "inactive" (state-free rule on the whole gradient)."""
        if "density" not in group:
            return "plain"
        if group["projector"] == "blocks":
            return "active" if self.state[p].get("block_active", 0) else "inactive"
        if p.dim() < 2:
            return "plain"
        return "inactive" if self.rank_for(group, p) == 0 else "active"

    def _sync_block(self, group: Dict, p: torch.Tensor) -> None:
        """At the start of each block period (by this parameter's own step count, so a parameter without a
        gradient at the boundary simply catches up at its next step) set whether it is active."""
        state = self.state[p]
        step = state.get("step", 0)
        if step % group["update_proj_gap"]:
            return
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        now = index in active_blocks(group, step // group["update_proj_gap"])
        was = bool(state.get("block_active", 0))
        if not now or (was and group["subspace_change"] == "reset"):
            INNER_RULES[group["inner"]].reset(state)  # frees the moments
        state["block_active"] = int(now)

    # ------------------------------------------------------------------ step
    def _step_dense(self, group: Dict, p: torch.Tensor) -> None:
        if group["projector"] == "blocks" and "density" in group:
            self._sync_block(group, p)
        mode = self._mode(group, p)
        if mode == "plain":
            super()._step_dense(group, p)
            return
        if mode == "active":  # full Adam at the targeted parameters' lr scale
            super()._step_dense(group, p, scale=group["scale"])
            return
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        G = self._grad(p, group, matrix=False)
        update = state_free_direction(G, group["inactive_update"])
        if update is None:
            update = torch.zeros_like(G)  # weight decay only
        self._apply(p, group, update, group["lr"] * group["inactive_lr_scale"], group["lr"], None)


__all__ = ["FrugalAdamW", "BLOCK_ORDERS", "active_blocks", "density_rank", "projected_dim"]
