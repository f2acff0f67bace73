"""Residual rules: what happens to the part of the gradient outside the low-rank subspace.

A rule returns a full-size tensor ``T`` (or None). A rule marked ``joins_update`` (Fira) has ``T`` added to the
scaled low-rank update before the bias-corrected step, as its reference does; otherwise the engine applies
``W -= lr * T`` as a separate state-free step (FRUGAL). ``none`` is GaLore (the residual is dropped), ``fira`` scales it by the low-rank update's per-column norm
ratio and limits its growth, ``frugal`` applies a state-free signSGD / SGD step to it.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .inner import Direction
from .projectors import Projector


def _outside(G: torch.Tensor, R: torch.Tensor, proj: Projector, state: Dict, coef: float = 1.0) -> torch.Tensor:
    """``G - coef * P P^T G``: the gradient minus (a multiple of) its part inside the subspace."""
    back = proj.project_back(state, R)
    return G - back if coef == 1.0 else G - coef * back


def fira_norm_dim(side: str) -> Optional[int]:
    """Dim of the low-rank tensor reduced for Fira's per-column norms (the projected one), from the weight's side."""
    return {"right": 1, "left": 0}.get(side)


def none_rule(G, R, d: Direction, proj, state, group) -> Optional[torch.Tensor]:
    return None


def fira_rule(G, R, d: Direction, proj, state, group) -> torch.Tensor:
    """Fira: ``S = phi * residual`` with ``phi = ||N[:, j]|| / (||R[:, j]|| + 1e-8)`` along the non-projected dim,
    then the norm-growth limiter ``||S_t|| <= gamma ||S_{t-1}||``. All tensor ops: no host sync."""
    dim = fira_norm_dim(proj.side)
    if dim is None:  # "full": both sides projected, one ratio for the whole matrix
        phi = d.direction.norm() / (R.norm() + 1e-8)
    else:
        n_norm = d.col_norms if d.col_norms is not None else d.direction.norm(dim=dim)
        phi = (n_norm / (R.norm(dim=dim) + 1e-8)).unsqueeze(dim)
    if group["fira_residual"] == "paper":  # scale * phi * (I - P P^T) G
        S = _outside(G, R, proj, state).mul_(phi).mul_(group["scale"])
    else:  # reference code: phi * (G - scale * P P^T G)
        S = _outside(G, R, proj, state, coef=group["scale"]).mul_(phi)
    norm = S.norm()
    prev = state.get("fira_prev_norm")
    if prev is not None:
        if group["fira_floor"] > 0:  # a residual whose first norm was ~0 could otherwise stay locked at ~0
            prev = prev.clamp(min=group["fira_floor"])
        gamma = group["fira_gamma"]
        limiter = (norm / (prev + 1e-8)).clamp(min=gamma) / gamma
        S.div_(limiter)
        norm = norm / limiter
    state["fira_prev_norm"] = norm.detach().reshape(())
    return S


fira_rule.joins_update = True  # S takes the same bias-corrected step as the low-rank update


def state_free_direction(x: torch.Tensor, kind: str) -> Optional[torch.Tensor]:
    """FRUGAL's state-free rule: sign(x) for "signsgd", x itself for "sgd", None for "none". Never modifies x."""
    if kind == "none":
        return None
    return x.sign() if kind == "signsgd" else x


def frugal_rule(G, R, d: Direction, proj, state, group) -> Optional[torch.Tensor]:
    """FRUGAL: a state-free step on the residual, at ``inactive_lr_scale`` times the learning rate."""
    if group["inactive_update"] == "none":
        return None
    rest = state_free_direction(_outside(G, R, proj, state), group["inactive_update"])  # a fresh tensor
    return rest.mul_(group["inactive_lr_scale"])


RESIDUAL_RULES: Dict[str, Callable] = {"none": none_rule, "fira": fira_rule, "frugal": frugal_rule}
