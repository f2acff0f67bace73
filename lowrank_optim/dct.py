"""DCT-AdamW (Modoranu et al., 2025) as a preset (registry row ``dct``): low-rank Adam in a subspace of fixed DCT-II
basis vectors, the r carrying the most gradient energy, re-chosen every step by default (one transform and a top-k,
no SVD). Per weight the state is r integer indices plus the moments; the d x d DCT matrix is shared by every weight
whose projected side has size d (see ``projectors/dct.py``).
"""

from __future__ import annotations

from .optimizer import LowRankOptimizer


class DCTAdamW(LowRankOptimizer):
    """DCT-AdamW. Groups with a ``rank`` key are low-rank; the rest is plain AdamW.

    Args (besides the engine's):
        update_proj_gap: 1 (re-select the DCT vectors every step, as the reference).
        rotate_subspace: False ("keep", the reference's default): moments stay by position. True ("rotate"):
            moments follow their vectors; a vector that stays keeps its moments, a newly chosen one starts at zero.
        dct_norm: "l1" (default) | "l2"; dct_impl: "matmul" (default) | "fft".
        scale: 1.0 (the reference has no GaLore scale). eps: 1e-8 (the reference's), galore-style placement.
    """

    method = "dct"

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        maximize=False,
        update_proj_gap=1,
        rotate_subspace=False,
        dct_norm="l1",
        dct_impl="matmul",
        scale=1.0,
        **kw,
    ):
        if rotate_subspace:
            kw["rotate_subspace"] = rotate_subspace
        # the DCT projector's own options go along when it is selected (or when set away from their defaults)
        if kw.get("projector", "dct") == "dct" or (dct_norm, dct_impl) != ("l1", "matmul"):
            kw.update(dct_norm=dct_norm, dct_impl=dct_impl)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            update_proj_gap=update_proj_gap,
            scale=scale,
            **kw,
        )


__all__ = ["DCTAdamW"]
