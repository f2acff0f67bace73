"""Fira (Chen et al., 2024) as a preset: low-rank Adam plus the norm-scaled, growth-limited residual.

Drop-in for ``fira.FiraAdamW``: same group keys (``rank``, ``update_proj_gap``, ``alpha``, ``proj_type``) and the
same eps default, so a Fira user changes only the import. ``alpha`` is accepted as an alias of the engine's ``scale``
in the constructor and in every param group.
"""
from __future__ import annotations

from typing import Dict

from .optimizer import LowRankOptimizer


def _alias_alpha(options: Dict, where: str) -> Dict:
    """Fira calls the low-rank scale ``alpha``; store it as ``scale`` (a conflicting pair is an error)."""
    if "alpha" not in options:
        return options
    options = dict(options)
    alpha = options.pop("alpha")
    if "scale" in options and options["scale"] != alpha:
        raise ValueError(f"{where}: got both alpha={alpha!r} and scale={options['scale']!r}; they are the same "
                         "option (Fira's name and the engine's), pass one")
    options["scale"] = alpha
    return options


class FiraAdamW(LowRankOptimizer):
    """Fira with AdamW moments.

    For a low-rank weight with gradient G, basis P and Adam direction N on R = P^T G (shapes per ``proj_type``):

        S = phi * (G - scale P P^T G)            ("reference", the released code; default)
        S = scale * phi * (I - P P^T) G          ("paper", Eq. of the paper)
        phi_j = ||N_j|| / (||R_j|| + 1e-8)       per row/column along the non-projected dim
        ||S_t|| <= fira_gamma ||S_{t-1}||        norm-growth limiter (stored norm is the post-limit one)
        W -= lr * bias_corr * (scale * P N + S)

    Args (besides the engine's):
        eps: 1e-6, Fira's default (galore-style: added to sqrt(v) before bias correction, as in Fira).
        alpha / scale: low-rank scale (engine default 0.25; Fira requires it in the group).
        fira_gamma: limiter growth bound, 1.01. fira_residual: "reference" | "paper".
        fira_floor: lower bound for the previous residual norm in the limiter (0 = off, as in Fira); a residual
            whose first norm was ~0 would otherwise stay locked near zero, growing only 1% a step.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, maximize=False,
                 fira_gamma=1.01, fira_residual="reference", fira_floor=0.0, **kw):
        kw = _alias_alpha(kw, "FiraAdamW")
        kw.setdefault("inner", "adam")
        kw.setdefault("residual", "fira")
        kw.setdefault("subspace_change", "keep")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         fira_gamma=fira_gamma, fira_residual=fira_residual, fira_floor=fira_floor, **kw)

    def add_param_group(self, param_group: Dict) -> None:
        super().add_param_group(_alias_alpha(param_group, f"param group {len(self.param_groups)}"))


__all__ = ["FiraAdamW"]
