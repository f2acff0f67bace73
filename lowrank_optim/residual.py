"""Residual rules: what happens to the part of the gradient outside the low-rank subspace.

A rule's ``__call__(G, R, d, proj, state, group, keep)`` returns a full-size tensor ``T`` (or None). How ``T`` joins
the update is declared by the rule:

* ``joins = "update"`` (Fira): ``T`` is added to the scaled low-rank update and takes the same bias-corrected step;
* ``joins = "replace"`` (APOLLO): ``T`` is the whole update (no projected-back term), same bias-corrected step;
* ``joins = "separate"`` (FRUGAL): ``W -= lr * T``, a state-free step of its own.

``none`` is GaLore (the residual is dropped). A rule's state entries must be gated by ``keep`` (see ``inner.py``).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .inner import Direction, where_keep
from .options import Option, boolean, choice, number
from .projectors import Projector
from .state_layout import state_tensor


def outside(
    G: torch.Tensor,
    R: Optional[torch.Tensor],
    proj: Optional[Projector],
    state: Dict,
    coef: float = 1.0,
    into: bool = False,
) -> torch.Tensor:
    """``G - coef * P P^T G``: the gradient minus (a multiple of) its part inside the subspace (all of G at rank 0).
    ``into``: projected back straight into a copy of G (one GEMM, equal up to rounding); otherwise in the reference
    packages' order (project back, scale, subtract), for bitwise parity."""
    if R is None:
        return G.clone()
    if into:
        out = G.clone()
        proj.add_back(state, R, out, alpha=-coef)
        return out
    back = proj.project_back(state, R)
    return G - back if coef == 1.0 else G - coef * back


def norm_dim(side: str) -> Optional[int]:
    """Dim of the low-rank tensor reduced for per-channel norms (the projected one), from the weight's side."""
    return {"right": 1, "left": 0}.get(side)


def total_norm(x: torch.Tensor, proj, low: bool = False) -> torch.Tensor:
    """``||x||`` of a gradient-shaped tensor (or, ``low=True``, a projected one) over every rank that holds rows
    of it: a sharded parameter's step sees only its rows (``sharding.RowsProjection``); otherwise ``x.norm()``."""
    spread = getattr(proj, "spread", None)
    if spread is None or (low and not proj.low_sharded):
        return x.norm()
    return spread.norm(x)


def channel_ratio(d: Direction, R: torch.Tensor, proj) -> torch.Tensor:
    """``||N_j|| / (||R_j|| + 1e-8)`` per channel along the non-projected dim (one ratio for ``full``). The
    per-channel norms run along a whole dim of R, which every rank holds (a right-side R is split by rows)."""
    dim = norm_dim(proj.side)
    if dim is None:
        return total_norm(d.direction, proj, low=True) / (total_norm(R, proj, low=True) + 1e-8)
    n_norm = d.col_norms if d.col_norms is not None else d.direction.norm(dim=dim)
    return (n_norm / (R.norm(dim=dim) + 1e-8)).unsqueeze(dim)


def _squared_norms(x: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """Squared norms along ``dim`` (kept; all of x for None). Across rows (dim 0) squaring first is several times
    faster than torch's strided norm; along a row the norm reads x once."""
    if dim is None:
        return x.square().sum().reshape([1] * x.dim())
    if dim == 0:
        return x.square().sum(0, keepdim=True)
    return torch.linalg.vector_norm(x, dim=dim, keepdim=True).square()


def limit_growth(
    S: torch.Tensor, state: Dict, key: str, gamma: float, floor: float, keep: torch.Tensor, proj=None
) -> None:
    """Norm-growth limiter ``||S_t|| <= gamma ||S_{t-1}||`` (in place). The stored norm is the post-limit one, -1
    before the first kept step, and unchanged by a skipped step. All tensor ops: no host sync."""
    limiter = growth_limiter(total_norm(S, proj), state, key, gamma, floor, keep)
    S.div_(limiter)


def growth_limiter(
    norm: torch.Tensor, state: Dict, key: str, gamma: float, floor: float, keep: torch.Tensor
) -> torch.Tensor:
    """The divisor that brings a residual of norm ``norm`` within ``gamma`` times the previous one (see
    ``limit_growth``), storing the limited norm under ``key`` when the step is kept."""
    prev = state.get(key)
    if prev is None:
        prev = torch.full((), -1.0, dtype=norm.dtype, device=norm.device)
    base = prev.clamp(min=floor) if floor > 0 else prev  # a ~0 first norm could otherwise lock the residual at ~0
    limiter = torch.where(prev >= 0, (norm / (base + 1e-8)).clamp(min=gamma), gamma) / gamma
    state[key] = torch.where(keep.bool(), (norm / limiter).detach().reshape(()), prev)
    return limiter


class NoResidual:
    kind, name, joins, options = "residual", "none", None, ()

    def __call__(self, G, R, d, proj, state, group, keep):
        return None

    def state_layout(self, group) -> list:
        return []


class FiraResidual:
    """Fira: ``S = phi * residual`` with ``phi`` the per-channel norm ratio of the Adam direction to the projected
    gradient, then the norm-growth limiter."""

    kind, name, joins = "residual", "fira", "update"
    uses_channel_norms = True  # the 8-bit kernel can return the direction's per-channel norms with the update
    options = (
        Option("fira_gamma", 1.01, number(1.0), "Fira's limiter: the residual's norm grows at most this factor a step"),
        Option(
            "fira_residual",
            "reference",
            choice("reference", "paper"),
            "`reference` phi(G - scale PPᵀG) (released code) or `paper` scale·phi(I - PPᵀ)G",
        ),
        Option("fira_floor", 0.0, number(0.0), "lower bound of the limiter's previous norm (0 = off, as Fira)"),
    )

    def __call__(self, G, R, d, proj, state, group, keep):
        phi = channel_ratio(d, R, proj)
        fast = group["fused"] is not False  # fused=False keeps fira's order of operations, bit for bit
        if group["fira_residual"] == "paper":  # scale * phi * (I - P P^T) G
            S = outside(G, R, proj, state, into=fast).mul_(phi).mul_(group["scale"])
        else:  # reference code: phi * (G - scale * P P^T G)
            S = outside(G, R, proj, state, coef=group["scale"], into=fast).mul_(phi)
        limit_growth(S, state, "fira_prev_norm", group["fira_gamma"], group["fira_floor"], keep, proj)
        return S

    def factored(self, G, R, d, proj, state, group, keep):
        """The same limited ``S`` as ``(T, t, L)`` with ``S = t * T + P L`` (``T`` full-size: G, or ``phi * G``;
        ``t`` a factor broadcast over it; ``L`` low-rank), so the caller adds it to W without projecting back a
        residual; or None where that cannot be had exactly. Its norm comes from channel norms, since
        ``||G_j - c P R_j||^2 = ||G_j||^2 - (2c - c^2) ||R_j||^2`` for an orthonormal basis and ``R = P^T G``. Only
        for the reference residual at ``0 < c <= 0.5``, where every channel keeps at least a quarter of
        ``||G_j||^2`` (no cancellation), and for a whole gradient."""
        c = group["scale"]
        if group["fira_residual"] != "reference" or not 0 < c <= 0.5 or getattr(proj, "spread", None) is not None:
            return None
        if not proj.orthonormal(state):
            return None
        dim = norm_dim(proj.side)
        r2 = _squared_norms(R, dim)
        if d.col_norms is not None and dim is not None:
            n = d.col_norms.unsqueeze(dim)
        else:
            n = _squared_norms(d.direction, dim).sqrt()
        phi = n / (r2.sqrt() + 1e-8)  # channel_ratio, from the squared norms it needs here anyway
        if dim == 1:  # per row: G's row norms read G once, and W takes phi * G from G itself
            T, inside2 = G, (phi.square() * _squared_norms(G, 1)).sum()
        else:  # per column (or one ratio): forming phi * G is cheaper than G's strided column norms
            T = G * phi
            inside2 = torch.linalg.vector_norm(T).square()
        outside2 = inside2 - (2 * c - c * c) * (phi.square() * r2).sum()
        limiter = growth_limiter(
            outside2.clamp_min(0).sqrt(), state, "fira_prev_norm", group["fira_gamma"], group["fira_floor"], keep
        )
        t = (phi if dim == 1 else 1) / limiter
        return T, t, R * (phi * (-c / limiter))

    def state_layout(self, group) -> list:
        return [state_tensor((), torch.float32)]  # the limiter's previous norm, a 0-dim fp32 tensor


def state_free_direction(x: torch.Tensor, kind: str) -> Optional[torch.Tensor]:
    """FRUGAL's state-free rule: sign(x) for "signsgd", x itself for "sgd", None for "none". Never modifies x."""
    if kind == "none":
        return None
    return x.sign() if kind == "signsgd" else x


class FrugalResidual:
    """FRUGAL: a state-free step on the residual, at ``inactive_lr_scale`` times the learning rate."""

    kind, name, joins = "residual", "frugal", "separate"
    options = (
        Option(
            "inactive_update",
            "signsgd",
            choice("signsgd", "sgd", "none"),
            "state-free rule outside the subspace: `signsgd`, `sgd` or `none`",
        ),
        Option("inactive_lr_scale", 1.0, number(0.0), "lr multiplier of the state-free step"),
    )

    def __call__(self, G, R, d, proj, state, group, keep):
        if group["inactive_update"] == "none":
            return None
        rest = outside(G, R, proj, state, into=group["fused"] is not False)
        rest = state_free_direction(rest, group["inactive_update"])
        return rest.mul_(group["inactive_lr_scale"])

    def state_layout(self, group) -> list:
        return []


class ApolloResidual:
    """APOLLO: the Adam moments of the projected gradient only measure how much Adam would scale each channel; the
    whole gradient is scaled by that ratio (``channel``: per row or column, along the weight's longer side;
    ``tensor``: one number), limited in norm growth like Fira, times sqrt(scale), and replaces the projected-back
    update (apollo-torch's order of operations, so its runs are reproduced to the bit)."""

    kind, name, joins = "residual", "apollo", "replace"
    uses_channel_norms = True
    options = (
        Option(
            "scale_type",
            "channel",
            choice("channel", "tensor"),
            "APOLLO's scaling: per channel, or one factor for the tensor (APOLLO-Mini)",
        ),
        Option(
            "scale_front",
            False,
            boolean,
            "multiply by sqrt(scale) before the limiter (apollo-torch's scale_front) instead of after it",
        ),
        Option("disable_nl", False, boolean, "turn off the norm-growth limiter (apollo-torch's disable_nl)"),
    )

    def __call__(self, G, R, d, proj, state, group, keep):
        if group["scale_type"] == "tensor":
            phi = total_norm(d.direction, proj, low=True) / (total_norm(R, proj, low=True) + 1e-8)
        else:
            phi = channel_ratio(d, R, proj)
        S = G * phi
        root = math.sqrt(group["scale"])
        if group["scale_front"]:
            S.mul_(root)
        if not group["disable_nl"]:
            limit_growth(S, state, "apollo_prev_norm", 1.01, 0.0, keep, proj)
        if not group["scale_front"]:
            S.mul_(root)
        return S

    def state_layout(self, group) -> list:
        return [] if group["disable_nl"] else [state_tensor((), torch.float32)]


RESIDUAL_RULES = {r.name: r for r in (NoResidual(), FiraResidual(), FrugalResidual(), ApolloResidual())}

__all__ = [
    "RESIDUAL_RULES",
    "outside",
    "norm_dim",
    "channel_ratio",
    "limit_growth",
    "total_norm",
    "state_free_direction",
    "where_keep",
]
