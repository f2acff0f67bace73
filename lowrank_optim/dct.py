"""DCT-AdamW (Modoranu et al., 2025) as a preset: low-rank Adam in a subspace of fixed DCT-II basis vectors.

The subspace is the r DCT vectors carrying the most gradient energy, re-chosen every step by default (cheap: one
transform and a top-k, no SVD). Per weight the state is r integer indices plus the moments; the d x d DCT matrix is
shared by every weight whose projected side has size d (see ``projectors/dct.py``).
"""
from __future__ import annotations

from typing import Dict

from .optimizer import LowRankOptimizer


def _alias_rotate(options: Dict, where: str) -> Dict:
    """The reference's ``rotate_subspace`` flag is the engine's ``subspace_change="rotate"``."""
    if "rotate_subspace" not in options:
        return options
    options = dict(options)
    rotate = options.pop("rotate_subspace")
    wanted = "rotate" if rotate else "keep"
    if options.get("subspace_change", wanted) != wanted:
        raise ValueError(f"{where}: rotate_subspace={rotate!r} contradicts "
                         f"subspace_change={options['subspace_change']!r}")
    options["subspace_change"] = wanted
    return options


class DCTAdamW(LowRankOptimizer):
    """DCT-AdamW. Groups with a ``rank`` key are low-rank; the rest is plain AdamW.

    Args (besides the engine's):
        update_proj_gap: 1 (re-select the DCT vectors every step, as the reference).
        rotate_subspace: False ("keep", the reference's default): moments stay by position, so after a
            re-selection slot i's moments belong to whatever vector is now i-th. True ("rotate"): moments follow
            their vectors; for an index subspace the rotation is a 0/1 selection matrix, so a vector that stays
            keeps its moments and a newly chosen one starts from zero.
        dct_norm: "l1" (default, the reference's ell_norm=1) | "l2" ranks the coefficients.
        dct_impl: "matmul" (default) | "fft" (Makhoul: no d x d matrix multiply).
        scale: 1.0 (the reference has no GaLore scale). eps: 1e-8 (the reference's), galore-style placement.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False,
                 update_proj_gap=1, rotate_subspace=False, dct_norm="l1", dct_impl="matmul", scale=1.0, **kw):
        kw = _alias_rotate(dict(kw, rotate_subspace=rotate_subspace), "DCTAdamW")
        kw.setdefault("inner", "adam")
        kw.setdefault("residual", "none")
        kw.setdefault("projector", "dct")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         update_proj_gap=update_proj_gap, dct_norm=dct_norm, dct_impl=dct_impl, scale=scale, **kw)

    def add_param_group(self, param_group: Dict) -> None:
        super().add_param_group(_alias_rotate(param_group, f"param group {len(self.param_groups)}"))


__all__ = ["DCTAdamW"]
