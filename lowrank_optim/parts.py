"""The parts' registry: the engine's own options, the routes, and what a group selects.

Each part (an inner rule, a residual rule, a route, a projector class) declares its options; a group's options are
the engine's plus those of the parts it selects, and its defaults are theirs (``defaults_for``)."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from . import options as O
from .inner import DTYPES, INNER_RULES
from .options import Option
from .projectors import PROJECTORS
from .residual import RESIDUAL_RULES

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SUBSPACE_CHANGES = ("keep", "reset", "rotate")
ABSENT = object()  # an option that is not filled into groups unless given (its presence means something)


def _lr_check(x):
    return O.number(0.0, none_ok=True)(x)


ENGINE_OPTIONS: Tuple[Option, ...] = (
    Option("lr", 1e-3, _lr_check, "learning rate (a float or a 0-dim tensor)"),
    Option("weight_decay", 0.0, O.number(0.0), "decoupled weight decay, applied before the update (torch order)"),
    Option("maximize", False, O.boolean, "maximize the objective"),
    Option("rank", ABSENT, O.integer(1), "subspace size r; marks the group low-rank"),
    Option(
        "density",
        ABSENT,
        O.number(0.0, 1.0),
        "subspace size as a fraction of the projected side (r = round(density * dim)); marks the group low-rank",
    ),
    Option("update_proj_gap", 200, O.integer(1), "steps between basis refreshes"),
    Option("scale", 0.25, O.number(0.0, lo_open=True), "multiplies the projected-back update (GaLore's alpha)"),
    Option(
        "proj_type",
        "std",
        O.choice(*PROJ_TYPES),
        "`std`: project the smaller side (right for m >= n); `reverse_std`, `left`, `right`, `full` (both sides)",
    ),
    Option(
        "projector",
        "svd",
        lambda x: None if x in PROJECTORS else f"valid: {sorted(PROJECTORS)}",
        "the basis: " + ", ".join(f"`{k}`" for k in ("svd", "rsvd", "random", "dct", "columns", "sst")),
    ),
    Option("seed", 0, O.integer(), "seeds random projectors with the parameter's index: every rank and resume agree"),
    Option(
        "subspace_change",
        "keep",
        O.choice(*SUBSPACE_CHANGES),
        "moments at a new basis: `keep`, `reset`, or `rotate` into the new basis",
    ),
    Option(
        "inner",
        "adam",
        lambda x: None if x in INNER_RULES else f"valid: {sorted(INNER_RULES)}",
        "the moment rule: `adam` or `adafactor`",
    ),
    Option(
        "residual",
        "none",
        lambda x: None if x in RESIDUAL_RULES else f"valid: {sorted(RESIDUAL_RULES)}",
        "the rule for the gradient outside the subspace: `none`, `fira`, `frugal`, `apollo`",
    ),
    Option(
        "route",
        "lowrank",
        lambda x: None if x in ROUTES else f"valid: {sorted(ROUTES)}",
        "how a targeted matrix is trained: `lowrank` (project, step, project back) or `spectral` (SST)",
    ),
    Option(
        "adaptive_gap",
        False,
        O.boolean,
        "double a parameter's refresh gap (up to `max_proj_gap`) each time "
        "its new basis overlaps the previous one by at least `gap_overlap` (Q-GaLore's rule)",
    ),
    Option("gap_overlap", 0.4, O.number(0.0, 1.0), "basis overlap (1 = the same subspace) that doubles the gap"),
    Option("max_proj_gap", 2000, O.integer(1), "cap of the adaptive gap"),
    Option("state_bits", 32, O.choice(32, 8), "`8`: blockwise 8-bit moments"),
    Option(
        "state_dtype",
        "float32",
        O.choice(*[k for k in DTYPES if k != "float64"]),
        "moment dtype when not 8-bit (fp64 parameters keep fp64 moments)",
    ),
    Option("min_8bit_size", 4096, O.integer(1), "with 8-bit states, smaller tensors stay fp32"),
    Option(
        "fused",
        None,
        O.choice(None, True, False),
        "dense Adam through torch's fused AdamW kernel (None: where torch has one for the device and dtype)",
    ),
    Option(
        "foreach",
        None,
        O.choice(None, True, False),
        "accepted for torch.optim.AdamW compatibility: the non-fused path is always multi-tensor",
    ),
)

ROUTES: Dict[str, Any] = {}


def register_route(route):
    """Add a route part (see ``LowRankRoute``): how the targeted matrices of a group are trained."""
    ROUTES[route.name] = route
    return route


def is_lowrank(group: Dict, p: torch.Tensor) -> bool:
    """Whether ``p`` takes its group's route (else the inner rule on the full gradient)."""
    return ROUTES[group.get("route", "lowrank")].is_lowrank(group, p)


def _parts_of(group: Dict) -> List[Tuple[str, Any]]:
    return [
        ("inner", INNER_RULES.get(group.get("inner"))),
        ("residual", RESIDUAL_RULES.get(group.get("residual"))),
        ("route", ROUTES.get(group.get("route"))),
        ("projector", PROJECTORS.get(group.get("projector"))),
    ]


_PROJECTOR_OPTIONS: Dict[Any, Tuple[Option, ...]] = {}  # built once per projector class, read every step


def part_options(part) -> Tuple[Option, ...]:
    opts = getattr(part, "options", ())
    if isinstance(opts, dict):  # projectors: {name: (default, check returning a bool, doc)}
        if part not in _PROJECTOR_OPTIONS:
            _PROJECTOR_OPTIONS[part] = tuple(
                Option(k, default, _bool_check(ok, doc), doc) for k, (default, ok, doc) in opts.items()
            )
        return _PROJECTOR_OPTIONS[part]
    return tuple(opts)


def _bool_check(ok, doc: str):
    def check(x):
        return None if ok(x) else doc

    return check


def all_options() -> Dict[str, str]:
    """Every declared option -> which part owns it (the first that declares it)."""
    known = {o.name: "the engine" for o in ENGINE_OPTIONS}
    for kind, table in (
        ("inner", INNER_RULES),
        ("residual", RESIDUAL_RULES),
        ("route", ROUTES),
        ("projector", PROJECTORS),
    ):
        for name, part in table.items():
            for o in part_options(part):
                known.setdefault(o.name, f"{kind} {name!r}")
    return known


def selected_options(group: Dict) -> List[Option]:
    out = list(ENGINE_OPTIONS)
    for _, part in _parts_of(group):
        if part is not None:
            out.extend(part_options(part))
    return out


def defaults_for(parts: Dict[str, Any]) -> Dict[str, Any]:
    """Engine defaults plus the defaults of the parts ``parts`` selects (values given in ``parts`` win)."""
    merged = {o.name: o.default for o in ENGINE_OPTIONS if o.default is not ABSENT}
    merged.update({k: v for k, v in parts.items() if k in ("inner", "residual", "route", "projector")})
    for _, part in _parts_of(merged):
        if part is not None:
            for o in part_options(part):
                merged.setdefault(o.name, o.default)
    return merged


__all__ = [
    "ENGINE_OPTIONS",
    "ROUTES",
    "ABSENT",
    "PROJ_TYPES",
    "SUBSPACE_CHANGES",
    "register_route",
    "is_lowrank",
    "part_options",
    "all_options",
    "selected_options",
    "defaults_for",
]
