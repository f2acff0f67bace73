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

from typing import Dict

from .optimizer import LowRankOptimizer
from .options import OptionError
from .projectors.blocks import BLOCK_ORDERS, BlocksProjector, active_blocks


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

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        maximize=False,
        density=None,
        projector="columns",
        proj_params_lr_scale=1.0,
        reset_statistics=True,
        inactive_update="signsgd",
        inactive_lr_scale=1.0,
        block_order="random",
        update_proj_gap=200,
        **kw,
    ):
        for engine_key, own in (("scale", "proj_params_lr_scale"), ("subspace_change", "reset_statistics")):
            if engine_key in kw:
                raise TypeError(f"FrugalAdamW: pass {own} (FRUGAL's name for the engine's {engine_key})")
        self._density = density
        if projector == "blocks" or block_order != "random":
            kw["block_order"] = block_order
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            projector=projector,
            proj_params_lr_scale=proj_params_lr_scale,
            reset_statistics=reset_statistics,
            inactive_update=inactive_update,
            inactive_lr_scale=inactive_lr_scale,
            update_proj_gap=update_proj_gap,
            **kw,
        )

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
