"""Fira (Chen et al., 2024) as a preset (registry row ``fira``): low-rank Adam plus the norm-scaled,
growth-limited residual (``residual="fira"``, see ``residual.py``).

Drop-in for ``fira.FiraAdamW``: same group keys (``rank``, ``update_proj_gap``, ``alpha``, ``proj_type``) and the
same eps default, so a Fira user changes only the import. ``alpha`` is Fira's name for the engine's ``scale``, in the
constructor and in every param group.

    S = phi * (G - scale P P^T G)            ("reference", the released code; default)
    S = scale * phi * (I - P P^T) G          ("paper")
    phi_j = ||N_j|| / (||R_j|| + 1e-8)       per row/column along the non-projected dim
    ||S_t|| <= fira_gamma ||S_{t-1}||        norm-growth limiter (stored norm is the post-limit one)
    W -= lr * bias_corr * (scale * P N + S)
"""

from __future__ import annotations

from .optimizer import LowRankOptimizer


class FiraAdamW(LowRankOptimizer):
    """Fira with AdamW moments (eps 1e-6, Fira's; galore-style placement in the subspace, as Fira)."""

    method = "fira"

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.0,
        maximize=False,
        fira_gamma=1.01,
        fira_residual="reference",
        fira_floor=0.0,
        **kw,
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            fira_gamma=fira_gamma,
            fira_residual=fira_residual,
            fira_floor=fira_floor,
            **kw,
        )


__all__ = ["FiraAdamW"]
