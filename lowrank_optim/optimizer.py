"""The engine: one ``torch.optim.Optimizer`` that runs every method's step from declared parts.

A param group selects parts by name (``projector``, ``inner``, ``residual``, ``route``); each part declares its
options (``options.py``), so the engine validates a group by asking the parts it selects and knows no method.
For a low-rank parameter (``route="lowrank"``, a group with ``rank`` or ``density``), viewed as an (m, n) matrix G:

    if refresh due: projector.refresh(G); on subspace change keep / reset / rotate the moments
    R = project(G);  d = inner.step(R);  U = scale * project_back(d)    (a "replace" residual rule swaps U out)
    W = W * (1 - lr * wd) - step * (U + joined residual) - lr * separate residual

Other parameters get the inner rule on the full gradient: Adam through torch's fused AdamW kernel where torch has
one (numerically ``torch.optim.AdamW(fused=True)``), or the same multi-tensor Adam as the projected moments.

A step is all-or-nothing without waiting for the host: one device-side flag (``found``) collects every non-finite
or overflowing gradient and projected gradient, and every update is gated by it, so a bad step leaves weights,
moments and bias-correction counts bit-for-bit unchanged. The host reads the flag only where it reads the device
anyway: at refreshes, with ``nonfinite="raise"``, with an inner rule that needs the host (Adafactor), and on CPU
tensors outside ``torch.compile`` (free there); elsewhere it learns of a skipped step at the next step.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from . import options as O
from .inner import DTYPES, INNER_RULES, Direction, gated, where_keep
from .options import Option, OptionError
from .projectors import PROJECTORS, Projector, ProjectorError, make_projector
from .residual import RESIDUAL_RULES, norm_dim

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SUBSPACE_CHANGES = ("keep", "reset", "rotate")
NONFINITE_POLICIES = ("skip", "raise")
ABSENT = object()  # an option that is not filled into groups unless given (its presence means something)
# |g| at or above this overflows g * g in fp32: such a gradient would write inf into Adam's second moment.
OVERFLOW = math.sqrt(torch.finfo(torch.float32).max)


def _lr_check(x):
    return O.number(0.0, none_ok=True)(x)


ENGINE_OPTIONS: Tuple[Option, ...] = (
    Option("lr", 1e-3, _lr_check, "learning rate (a float or a 0-dim tensor)"),
    Option("weight_decay", 0.0, O.number(0.0), "decoupled weight decay, applied before the update (torch order)"),
    Option("maximize", False, O.boolean, "maximize the objective"),
    Option("rank", ABSENT, O.integer(1), "subspace size r; marks the group low-rank"),
    Option("density", ABSENT, O.number(0.0, 1.0), "subspace size as a fraction of the projected side "
           "(r = round(density * dim)); marks the group low-rank"),
    Option("update_proj_gap", 200, O.integer(1), "steps between basis refreshes"),
    Option("scale", 0.25, O.number(0.0, lo_open=True), "multiplies the projected-back update (GaLore's alpha)"),
    Option("proj_type", "std", O.choice(*PROJ_TYPES), "`std`: project the smaller side (right for m >= n); "
           "`reverse_std`, `left`, `right`, `full` (both sides)"),
    Option("projector", "svd", lambda x: None if x in PROJECTORS else f"valid: {sorted(PROJECTORS)}",
           "the basis: " + ", ".join(f"`{k}`" for k in ("svd", "rsvd", "random", "dct", "columns", "sst"))),
    Option("seed", 0, O.integer(), "seeds random projectors with the parameter's index: every rank and resume agree"),
    Option("subspace_change", "keep", O.choice(*SUBSPACE_CHANGES),
           "moments at a new basis: `keep`, `reset`, or `rotate` into the new basis"),
    Option("inner", "adam", lambda x: None if x in INNER_RULES else f"valid: {sorted(INNER_RULES)}",
           "the moment rule: `adam` or `adafactor`"),
    Option("residual", "none", lambda x: None if x in RESIDUAL_RULES else f"valid: {sorted(RESIDUAL_RULES)}",
           "the rule for the gradient outside the subspace: `none`, `fira`, `frugal`, `apollo`"),
    Option("route", "lowrank", lambda x: None if x in ROUTES else f"valid: {sorted(ROUTES)}",
           "how a targeted matrix is trained: `lowrank` (project, step, project back) or `spectral` (SST)"),
    Option("adaptive_gap", False, O.boolean, "double a parameter's refresh gap (up to `max_proj_gap`) each time "
           "its new basis overlaps the previous one by at least `gap_overlap` (Q-GaLore's rule)"),
    Option("gap_overlap", 0.4, O.number(0.0, 1.0), "basis overlap (1 = the same subspace) that doubles the gap"),
    Option("max_proj_gap", 2000, O.integer(1), "cap of the adaptive gap"),
    Option("state_bits", 32, O.choice(32, 8), "`8`: blockwise 8-bit moments"),
    Option("state_dtype", "float32", O.choice(*[k for k in DTYPES if k != "float64"]),
           "moment dtype when not 8-bit (fp64 parameters keep fp64 moments)"),
    Option("min_8bit_size", 4096, O.integer(1), "with 8-bit states, smaller tensors stay fp32"),
    Option("fused", None, O.choice(None, True, False), "dense Adam through torch's fused AdamW kernel "
           "(None: where torch has one for the device and dtype)"),
    Option("foreach", None, O.choice(None, True, False), "accepted for torch.optim.AdamW compatibility: the "
           "non-fused path is always multi-tensor"),
)

ROUTES: Dict[str, Any] = {}


def register_route(route):
    """Add a route part (see ``LowRankRoute``): how the targeted matrices of a group are trained."""
    ROUTES[route.name] = route
    return route


# ---------------------------------------------------------------------------------------------------- shapes
def side_for(shape: Tuple[int, int], proj_type: str) -> str:
    """Which side to project, from the WEIGHT's shape (never from a projected tensor's shape)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def matrix_shape(p: torch.Tensor) -> Tuple[int, int]:
    """Weights with more than two dims (conv) are treated as (out, prod(rest)); vectors as (1, n)."""
    return (p.shape[0], p.numel() // max(p.shape[0], 1)) if p.dim() >= 2 else (1, p.numel())


def projected_dim(group: Dict, shape: Tuple[int, int]) -> int:
    """Size of the side the subspace is chosen in (density is a fraction of it)."""
    side = side_for(shape, group["proj_type"])
    return {"left": shape[0], "right": shape[1]}.get(side, min(shape))


def density_rank(density: float, dim: int) -> int:
    """r = round(density * dim), at least 1 unless density is exactly 0 (then nothing is in the subspace)."""
    r = round(density * dim)
    return max(1, r) if density > 0 else 0


def is_lowrank(group: Dict, p: torch.Tensor) -> bool:
    """Whether ``p`` takes its group's route (else the inner rule on the full gradient)."""
    return ROUTES[group.get("route", "lowrank")].is_lowrank(group, p)


def _parts_of(group: Dict) -> List[Tuple[str, Any]]:
    return [("inner", INNER_RULES.get(group.get("inner"))), ("residual", RESIDUAL_RULES.get(group.get("residual"))),
            ("route", ROUTES.get(group.get("route"))), ("projector", PROJECTORS.get(group.get("projector")))]


def part_options(part) -> Tuple[Option, ...]:
    opts = getattr(part, "options", ())
    if isinstance(opts, dict):  # projectors: {name: (default, check returning a bool, doc)}
        return tuple(Option(k, default, _bool_check(ok, doc), doc) for k, (default, ok, doc) in opts.items())
    return tuple(opts)


def _bool_check(ok, doc: str):
    def check(x):
        return None if ok(x) else doc

    return check


def all_options() -> Dict[str, str]:
    """Every declared option -> which part owns it (the first that declares it)."""
    known = {o.name: "the engine" for o in ENGINE_OPTIONS}
    for kind, table in (("inner", INNER_RULES), ("residual", RESIDUAL_RULES), ("route", ROUTES),
                        ("projector", PROJECTORS)):
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


# ---------------------------------------------------------------------------------------------------- routes
class LowRankRoute:
    """Project, step the inner rule in the subspace, project back, add the residual rule's term."""

    kind, name, options = "route", "lowrank", ()

    def rank_for(self, group: Dict, p: torch.Tensor) -> int:
        shape = matrix_shape(p)
        if "density" in group:
            return density_rank(group["density"], projected_dim(group, shape))
        return group["rank"]

    def is_lowrank(self, group: Dict, p: torch.Tensor) -> bool:
        if "rank" not in group and "density" not in group:
            return False
        cls = PROJECTORS.get(group.get("projector"))
        if getattr(cls, "any_shape", False):
            return True
        if p.dim() < 2:
            return False
        r = self.rank_for(group, p)
        if "density" in group:
            return r < projected_dim(group, matrix_shape(p))
        return min(matrix_shape(p)) > r

    def refresh_due(self, opt: "LowRankOptimizer", it: "_Item") -> bool:
        opt.projector_for(it.group, it.p)  # notices a change of the group's subspace settings
        return id(it.p) in opt._stale or _default_refresh_due(it)

    def prepare(self, opt: "LowRankOptimizer", items: List["_Item"]) -> None:
        """Compute every due basis (without committing it) and every projected gradient. Mutates no state."""
        for it in items:
            it.proj = opt.projector_for(it.group, it.p)
            it.G = _grad(it.p, it.group, matrix=True)
            if it.proj.rank == 0:  # an empty subspace has no basis: all of G is residual
                continue
            if self.refresh_due(opt, it):
                it.refresh = _try_refresh(it)
            basis = {**it.state, **it.refresh} if it.refresh else it.state
            it.R = it.proj.project(basis, it.G)

    def commit_refresh(self, opt: "LowRankOptimizer", items: List["_Item"]) -> None:
        for it in items:
            if it.refresh is None:
                continue
            state, group = it.state, it.group
            old = {k: v for k, v in state.items() if k.startswith("proj_")}
            stale = id(it.p) in opt._stale
            opt._stale.discard(id(it.p))
            if stale:  # a basis of other settings: neither it nor its moments carry over
                for k in old:
                    if k != "proj_refreshes":
                        state.pop(k)
            state.update(it.refresh)
            state["proj_step"] = state.get("step", 0)
            inner = INNER_RULES[group["inner"]]
            if stale:
                inner.reset(state)
            elif old.get("proj_refreshes", 0):
                if group["adaptive_gap"]:
                    gap = state.get("proj_gap", group["update_proj_gap"])
                    if it.proj.overlap(old, state) >= group["gap_overlap"]:
                        gap = min(2 * gap, group["max_proj_gap"])
                    state["proj_gap"] = gap
                policy = group["subspace_change"]
                if policy == "reset":
                    inner.reset(state)
                elif policy == "rotate":
                    inner.rotate(state, it.proj.rotation(old, state))

    def update(self, opt: "LowRankOptimizer", items: List["_Item"], keep_on) -> None:
        buckets: Dict[tuple, List[_Item]] = {}
        for it in items:
            if it.R is None:  # an empty subspace: no moments, the whole gradient is residual
                INNER_RULES[it.group["inner"]].reset(it.state)
                continue
            style = it.group.get("eps_style") or ("torch" if it.proj.covers(it.state) else "galore")
            buckets.setdefault((it.gi, it.R.device, it.R.dtype, style), []).append(it)
        for (gi, dev, _, style), its in buckets.items():
            group = its[0].group
            rule = RESIDUAL_RULES[group["residual"]]
            col_dim = norm_dim(its[0].proj.side) if getattr(rule, "uses_channel_norms", False) else None
            dirs = INNER_RULES[group["inner"]].step([it.state for it in its], [it.R for it in its], group,
                                                    keep_on(dev), eps_style=style, col_norm_dim=col_dim,
                                                    params=[it.p for it in its])
            for it, d in zip(its, dirs):
                it.d = d
        for it in items:
            self._apply(it, keep_on(it.p.device))
            it.state["step"] = it.state.get("step", 0) + 1

    @staticmethod
    def _apply(it: "_Item", keep: torch.Tensor) -> None:
        group, state, proj, d = it.group, it.state, it.proj, it.d
        rule = RESIDUAL_RULES[group["residual"]]
        extra = rule(it.G, it.R, d, proj, state, group, keep)
        if extra is not None and rule.joins != "separate":
            extra = where_keep(keep, extra)  # a skipped step's residual may hold NaN: it must add nothing
        if d is None:
            U, step, lr = None, None, group["lr"]
        else:
            step, lr = d.step, d.decay_lr
            if rule.joins == "replace":
                U, extra = extra, None
            else:
                U = proj.project_back(state, d.direction)
                if group["scale"] != 1.0:
                    U.mul_(group["scale"])  # scaled before the step, in this order, as galore-torch / fira do
                if rule.joins == "update":
                    U.add_(extra)
                    extra = None
        apply_update(it.p, group, U, step, lr, keep, extra=extra)

    def expected_bytes(self, opt: "LowRankOptimizer", group: Dict, p: torch.Tensor) -> int:
        proj = opt.projector_for(group, p)
        inner = INNER_RULES[group["inner"]]
        low = proj.low_rank_shape() if proj.rank > 0 else None
        moments = inner.expected_bytes(low, group, _compute_dtype(p)) if low and math.prod(low) else 0
        return proj.expected_state_bytes() + moments + RESIDUAL_RULES[group["residual"]].expected_bytes(group)


register_route(LowRankRoute())


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class _Item:
    """One parameter in this step: where it is, what it takes, and the tensors computed for it."""

    __slots__ = ("gi", "group", "p", "state", "lowrank", "proj", "G", "R", "refresh", "d")

    def __init__(self, gi, group, p, state, lowrank):
        self.gi, self.group, self.p, self.state, self.lowrank = gi, group, p, state, lowrank
        self.proj = self.G = self.R = self.refresh = self.d = None


# ---------------------------------------------------------------------------------------------------- engine
class LowRankOptimizer(torch.optim.Optimizer):
    """Engine shared by every method; the named optimizers (GaLoreAdamW, FiraAdamW, ...) are rows of
    ``lowrank_optim.registry`` over it.

    Args:
        params: parameters or param groups; a group with ``rank`` (or ``density``) is trained low-rank.
        nonfinite: ``"skip"`` (default): a step with any non-finite or overflowing gradient (|g| >= 1.8e19, whose
            square overflows fp32) changes nothing and is counted in ``skipped_steps``; ``"raise"`` raises
            ``FloatingPointError`` naming the parameter (reads the device every step).
        **defaults: group defaults: the engine's options (``ENGINE_OPTIONS``) and those of the parts they select.
    """

    method: Optional[str] = None  # a registry name: its parts and defaults are this optimizer's

    def __init__(self, params, nonfinite: str = "skip", **defaults):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"invalid nonfinite policy {nonfinite!r}; valid: {list(NONFINITE_POLICIES)}")
        from .registry import method_defaults

        from .registry import apply_key_aliases

        preset = method_defaults(self.method) if self.method else {}
        defaults = {**preset, **apply_key_aliases(self.method, defaults, "optimizer defaults")}
        merged = defaults_for(defaults)
        defaults = self._check_constructor_keys(defaults, merged)
        merged.update(defaults)
        self.nonfinite = nonfinite
        self._projectors: Dict[int, Tuple[tuple, Projector]] = {}
        self._stale: set = set()  # ids of parameters whose saved basis no longer fits their group's settings
        self._validated: Dict[int, tuple] = {}
        self._pending: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (found, host copy) not yet read
        self._skipped = 0
        super().__init__(params, merged)

    @staticmethod
    def _check_constructor_keys(given: Dict, merged: Dict) -> Dict:
        """``given`` without the options of unselected parts left at their defaults (a preset's signature passes
        them all); any other unknown or misplaced key raises."""
        selected = {o.name for o in selected_options(merged)}
        known = all_options()
        declared = {}
        for table in (INNER_RULES, RESIDUAL_RULES, ROUTES, PROJECTORS):
            for part in table.values():
                for o in part_options(part):
                    declared.setdefault(o.name, []).append(o.default)
        given = {k: v for k, v in given.items()
                 if k in selected or not any(v is d or (type(v) is type(d) and v == d) for d in declared.get(k, []))}
        bad = [k for k in given if k not in selected]
        if bad:
            hints = []
            for k in bad:
                if k in known:
                    hints.append(f"{k!r} belongs to {known[k]}, which these defaults do not select")
                else:
                    close = O.likely_option(k, known)
                    hints.append(f"{k!r}" + (f" (did you mean {close!r}?)" if close else ""))
            raise OptionError(f"unknown optimizer options: {sorted(bad)}: " + "; ".join(hints))
        return given

    # ------------------------------------------------------------------ copies
    def __getstate__(self):
        out = super().__getstate__()
        out.update(nonfinite=self.nonfinite, _skipped=self.skipped_steps, method=self.method)
        return out

    def __setstate__(self, state):
        state = dict(state)
        self.nonfinite = state.pop("nonfinite", getattr(self, "nonfinite", "skip"))
        self._skipped = state.pop("_skipped", getattr(self, "_skipped", 0))
        state.pop("method", None)
        super().__setstate__(state)
        self._projectors, self._validated, self._pending, self._stale = {}, {}, [], set()

    def __deepcopy__(self, memo):
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        index = len(self.param_groups)
        where = f"param group {index}"
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        from .registry import apply_key_aliases

        param_group = apply_key_aliases(self.method, {**param_group, "params": params}, where)
        for p in params:
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise ValueError(f"{where}: complex parameters are not supported (got a {p.dtype} parameter of "
                                 f"shape {tuple(p.shape)})")
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                raise ValueError(f"{where}: only real floating-point parameters can be optimized (got a {p.dtype} "
                                 f"parameter of shape {tuple(p.shape)})")
        for kind, part in _parts_of(param_group):  # a part this group selects instead of the defaults' one
            if part is not None and param_group.get(kind) != self.defaults.get(kind):
                for o in part_options(part):
                    param_group.setdefault(o.name, o.default)
        filled = defaults_for({k: param_group.get(k, self.defaults.get(k)) for k in
                               ("inner", "residual", "route", "projector")})
        filled.update(self.defaults)
        filled.update(param_group)
        O.check_keys(param_group.keys(), {o.name: "" for o in selected_options(filled)}, all_options(), where)
        for k, v in filled.items():  # options of newly selected parts come with their defaults
            param_group.setdefault(k, v)
        self._validate_group(param_group, index)
        super().add_param_group(param_group)
        self._warn_dense(self.param_groups[-1], index)

    def _validate_group(self, g: Dict[str, Any], i: int) -> None:
        where = f"param group {i}"
        O.check_values(g, selected_options(g), where)
        if "rank" in g and "density" in g:
            raise OptionError(f"{where}: give either density or rank, not both")
        for kind, part in _parts_of(g):
            check = getattr(part, "check_group", None)
            why = check(g) if check else None
            if why:
                raise OptionError(f"{where}: invalid {kind} {g[kind]!r} for this group: {why}")

    def _validate_changed(self) -> None:
        """Re-validate only the groups whose values changed since they were last checked (a scheduler, a hand)."""
        for i, g in enumerate(self.param_groups):
            fingerprint = tuple((k, (id(v), v._version) if isinstance(v, torch.Tensor) else v)
                                for k, v in g.items() if k != "params")
            if self._validated.get(i) != fingerprint:
                if not torch.compiler.is_compiling():  # a compiled step checks values; keys are checked eagerly
                    keys = [k for k in g if k != "params" and k not in self.defaults]  # defaults fill every group
                    O.check_keys(keys, {o.name: "" for o in selected_options(g)}, all_options(), f"param group {i}")
                self._validate_group(g, i)
                self._validated[i] = fingerprint

    def _warn_dense(self, group: Dict, index: int) -> None:
        if "rank" not in group:
            return
        small = [tuple(p.shape) for p in group["params"] if not is_lowrank(group, p)]
        if small:
            warnings.warn(f"param group {index}: {len(small)} parameter(s) whose smaller side is <= rank "
                          f"{group['rank']} (or that are not matrices) are trained densely: {small}", stacklevel=3)

    # ------------------------------------------------------------------ projectors
    def rank_for(self, group: Dict, p: torch.Tensor) -> int:
        """The subspace size of ``p`` in ``group``: ``rank``, or round(density x projected side)."""
        return ROUTES[group["route"]].rank_for(group, p)

    def projector_for(self, group: Dict, p: torch.Tensor) -> Projector:
        """The projector object for ``p`` (configuration only; its state lives in ``self.state[p]``)."""
        shape = matrix_shape(p)
        cls = PROJECTORS[group["projector"]]
        opts = {o.name: group[o.name] for o in part_options(cls) if o.name in group}
        rank = self.rank_for(group, p)
        side = side_for(shape, group["proj_type"])
        index, position = self._param_index(p, group)
        if getattr(cls, "wants_position", False):
            opts.update(position=position, density=group.get("density"), group_seed=group["seed"])
        key = (group["projector"], rank, side, shape, group["seed"], tuple(sorted((k, repr(v)) for k, v in
                                                                                   opts.items())))
        cached = self._projectors.get(id(p))
        if cached is None or cached[0] != key:
            seed = group["seed"] * 1_000_003 + index
            proj = make_projector(group["projector"], rank, side, shape, seed=seed, **opts)
            state = self.state.get(p, {})
            if int(state.get("proj_refreshes", 0)) > 0 and (cached is not None or not proj.fits(state)):
                self._stale.add(id(p))  # the group's subspace settings changed: a new basis at the next step
            cached = self._projectors[id(p)] = (key, proj)
        return cached[1]

    def _param_index(self, p: torch.Tensor, group: Dict) -> Tuple[int, Tuple[int, int]]:
        index = 0
        for g in self.param_groups:
            for j, q in enumerate(g["params"]):
                if q is p:
                    return index, (j, len(g["params"]))
                index += 1
        raise KeyError("parameter not in optimizer")

    # ------------------------------------------------------------------ state
    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite or overflowing gradient (reads any flag still on the device)."""
        self._settle(block=True)
        return self._skipped

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (moments, bases, indices, 8-bit codes and absmax, counters)."""
        return sum(_local(v).numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))

    def expected_state_bytes(self) -> int:
        """What ``state_bytes()`` will report once every parameter has stepped, from shapes alone (works on
        meta-device parameters: nothing is allocated). See ``lowrank_optim.memory.estimate_state_bytes``."""
        total = 0
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if is_lowrank(group, p):
                    total += ROUTES[group["route"]].expected_bytes(self, group, p)
                else:
                    total += INNER_RULES[group["inner"]].expected_bytes(tuple(p.shape), group, _compute_dtype(p))
        return total

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As torch's (pre-hooks may replace the dict, post-hooks see the loaded state, missing group keys come
        from the defaults), except that state tensors keep their dtype (torch casts floating state to the
        parameter's dtype): fp32 moments of bf16 weights, 8-bit codes and int64 indices come back exactly."""
        from .checkpoint import check_and_load

        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        check_and_load(self, state_dict)
        self._projectors, self._validated, self._pending, self._stale = {}, {}, [], set()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, params: Optional[Iterable[torch.Tensor]] = None):
        """One optimizer step. ``params``: update only these parameters (layer-wise training: the rest keep
        their gradients and state)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._settle(block=False)
        self._validate_changed()
        items = self._collect(params)
        if not items:
            return loss
        self._run(items)
        return loss

    def _collect(self, only) -> List[_Item]:
        wanted = None if only is None else {id(p) for p in only}
        found = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None or (wanted is not None and id(p) not in wanted):
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"param group {gi}: sparse gradients are not supported "
                                     f"(parameter of shape {tuple(p.shape)})")
                if p.numel() == 0:
                    continue  # nothing to update
                found.append((gi, group, p))
        # a new parameter's state dict joins self.state only once its step went through (see _run)
        return [_Item(gi, group, p, self.state[p] if p in self.state else {}, is_lowrank(group, p))
                for gi, group, p in found]

    def _host_reads(self, items: List[_Item]) -> bool:
        """Whether this step reads the flag on the host (see the module docstring)."""
        if self.nonfinite == "raise" or any(INNER_RULES[it.group["inner"]].needs_host for it in items):
            return True
        if any(it.lowrank and self._refresh_due(it) for it in items):
            return True
        compiling = torch.compiler.is_compiling()
        return not compiling and all(it.p.device.type == "cpu" for it in items)

    def _refresh_due(self, it: _Item) -> bool:
        return ROUTES[it.group["route"]].refresh_due(self, it) if hasattr(ROUTES[it.group["route"]], "refresh_due") \
            else _default_refresh_due(it)

    def _run(self, items: List[_Item]) -> None:
        host = self._host_reads(items)
        found = _grad_flag([it.p.grad for it in items])
        if host and self._skip_on_host(found, items, stage="gradient"):
            return
        low = [it for it in items if it.lowrank]
        routes = list(dict.fromkeys(it.group["route"] for it in low))
        for route_name in routes:
            ROUTES[route_name].prepare(self, [it for it in low if it.group["route"] == route_name])
        flags = [found] + [_tensor_flag(it.R) for it in low if it.R is not None]
        found = torch.stack([f.to(found.device) for f in flags]).amax() if len(flags) > 1 else found
        if host and self._skip_on_host(found, items, stage="projected gradient"):
            return
        for route_name in routes:
            ROUTES[route_name].commit_refresh(self, [it for it in low if it.group["route"] == route_name])
        keeps: Dict[torch.device, torch.Tensor] = {}

        def keep_on(device):
            if device not in keeps:
                keeps[device] = 1.0 - found.to(device=device, dtype=torch.float32)
            return keeps[device]

        for route_name in routes:
            ROUTES[route_name].update(self, [it for it in low if it.group["route"] == route_name], keep_on)
        self._dense_step([it for it in items if not it.lowrank], found, keep_on)
        for it in items:
            if it.p not in self.state:
                self.state[it.p] = it.state
        if not host:
            self._pending.append((found, found.to("cpu", non_blocking=True)))

    def _skip_on_host(self, found: torch.Tensor, items: List[_Item], stage: str) -> bool:
        if not bool(found):
            return False
        if self.nonfinite == "raise":
            for it in items:
                g = it.p.grad
                if not bool((g.abs() < OVERFLOW).all()):
                    raise FloatingPointError(f"param group {it.gi}: non-finite gradient (NaN, inf or |x| >= "
                                             f"{OVERFLOW:.2g}) in a parameter of shape {tuple(it.p.shape)}; no "
                                             "parameter was updated")
            raise FloatingPointError(f"non-finite {stage} (|x| >= {OVERFLOW:.2g}); no parameter was updated")
        self._skipped += 1
        warnings.warn(f"non-finite {stage} (NaN, inf or |x| >= {OVERFLOW:.2g}): step skipped, no state changed "
                      f"({self._skipped} skipped so far)")
        return True

    def _settle(self, block: bool) -> None:
        """Count and report steps the device skipped without the host looking (CUDA, compiled steps)."""
        if not self._pending:
            return
        if torch.compiler.is_compiling():
            return
        left = []
        for found, host_copy in self._pending:
            if not block and found.device.type == "cuda" and not _copy_done(found):
                left.append((found, host_copy))
                continue
            if bool(host_copy if found.device.type == "cuda" else found):
                self._skipped += 1
                warnings.warn(f"non-finite gradient (NaN, inf or |x| >= {OVERFLOW:.2g}): step skipped on the "
                              f"device, no weight, moment or bias correction changed ({self._skipped} skipped so far)")
        self._pending = left

    # ------------------------------------------------------------------ dense parameters
    def _dense_step(self, items: List[_Item], found: torch.Tensor, keep_on) -> None:
        by_group: Dict[int, List[_Item]] = {}
        for it in items:
            by_group.setdefault(it.gi, []).append(it)
        for gi, its in by_group.items():
            group = its[0].group
            inner = INNER_RULES[group["inner"]]
            fused = [it for it in its if _fusable(group, it.p)]
            rest = [it for it in its if not _fusable(group, it.p)]
            if fused:
                _fused_adamw(fused, group, found)
            for dev, dev_items in _by_device(rest).items():
                keep = keep_on(dev)
                grads = [_grad(it.p, group, matrix=False) for it in dev_items]
                dirs = inner.step([it.state for it in dev_items], grads, group, keep,
                                  eps_style=group.get("eps_style") or "torch", counter="step",
                                  params=[it.p for it in dev_items])
                for it, d in zip(dev_items, dirs):
                    apply_update(it.p, group, d.direction, d.step, d.decay_lr, keep)


# ---------------------------------------------------------------------------------------------------- helpers
def _default_refresh_due(it: _Item) -> bool:
    """At steps 0, T, 2T, ... of the parameter's own clock; with an adaptive gap, T steps after the last refresh."""
    state = it.state
    if int(state.get("proj_refreshes", 0)) == 0:
        return True
    step = state.get("step", 0)
    if it.group["adaptive_gap"] and "proj_gap" in state:
        return step - state.get("proj_step", 0) >= state["proj_gap"]
    return step % it.group["update_proj_gap"] == 0


def _try_refresh(it: _Item) -> Optional[Dict[str, Any]]:
    """New basis entries, or None to keep the previous basis after a failed refresh (a failed first one raises)."""
    has_basis = int(it.state.get("proj_refreshes", 0)) > 0
    try:
        return it.proj.refresh(it.state, it.G)
    except ProjectorError as err:
        if has_basis:  # keep the previous basis: training continues in the last good subspace
            warnings.warn(f"param group {it.gi}: basis refresh failed for a parameter of shape "
                          f"{tuple(it.p.shape)} ({err}); keeping the previous basis")
            return None
        raise RuntimeError(f"param group {it.gi}: the first basis of a parameter of shape {tuple(it.p.shape)} "
                           f"could not be computed ({err}); no parameter was updated") from err


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _copy_done(found: torch.Tensor) -> bool:
    return torch.cuda.current_stream(found.device).query()


def _grad_flag(grads: List[torch.Tensor]) -> torch.Tensor:
    """1.0 (on the first gradient's device) if any entry is NaN, inf or |g| >= OVERFLOW; one read pass each."""
    by_dev: Dict[torch.device, List[torch.Tensor]] = {}
    for g in grads:
        by_dev.setdefault(g.device, []).append(g)
    flags = []
    for gs in by_dev.values():
        norms = torch._foreach_norm(gs, float("inf"))
        flags.append((~(torch.stack([n.float() for n in norms]) < OVERFLOW)).any().float())
    first = grads[0].device
    return flags[0] if len(flags) == 1 else torch.stack([f.to(first) for f in flags]).amax()


def _tensor_flag(x: torch.Tensor) -> torch.Tensor:
    return (~(x.abs().amax() < OVERFLOW)).float() if x.numel() else torch.zeros((), device=x.device)


def _by_device(items: List[_Item]) -> Dict[torch.device, List[_Item]]:
    out: Dict[torch.device, List[_Item]] = {}
    for it in items:
        out.setdefault(it.p.device, []).append(it)
    return out


def _grad(p: torch.Tensor, group: Dict, matrix: bool) -> torch.Tensor:
    """The gradient in the compute dtype (as a matrix for low-rank parameters). Read-only: for fp32 parameters it
    is ``.grad`` itself, so no rule may modify it in place."""
    g = p.grad
    if matrix:
        g = g.reshape(matrix_shape(p))
    want = _compute_dtype(p)
    if g.dtype != want:
        g = g.to(want)
    return -g if group["maximize"] else g


def _fusable(group: Dict, p: torch.Tensor) -> bool:
    """torch's fused AdamW computes exactly this group's dense update for ``p``."""
    if group["inner"] != "adam" or group["fused"] is False or (group.get("eps_style") or "torch") != "torch":
        return False
    if not group["correct_bias"] or p.dtype not in (torch.float32, torch.float64):
        return False
    if group["state_bits"] == 8 and p.numel() >= group["min_8bit_size"]:
        return False
    if group["state_dtype"] != "float32" and p.dtype == torch.float32:
        return False
    if isinstance(group["lr"], torch.Tensor) and group["lr"].device != p.device and p.device.type != "cpu":
        return False
    return p.device.type in ("cpu", "cuda") and not hasattr(p, "to_local")


def _fused_adamw(items: List[_Item], group: Dict, found: torch.Tensor) -> None:
    """torch.optim.AdamW(fused=True)'s update, state and all, gated by ``found`` like torch's GradScaler path."""
    beta1, beta2 = group["betas"]
    for dev, its in _by_device(items).items():
        by_dtype: Dict[torch.dtype, List[_Item]] = {}
        for it in its:
            by_dtype.setdefault(it.p.dtype, []).append(it)
        f = found.to(device=dev, dtype=torch.float32)
        for _, dit in by_dtype.items():
            for it in dit:
                st = it.state
                if "exp_avg" not in st or "exp_avg_codes" in st:
                    for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
                        st.pop(k, None)
                    st["exp_avg"] = torch.zeros_like(it.p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(it.p, memory_format=torch.preserve_format)
                if not isinstance(st.get("step"), torch.Tensor) or st["step"].device != dev:
                    st["step"] = torch.tensor(float(st.get("step", 0)), dtype=torch.float32, device=dev)
            ps = [it.p for it in dit]
            steps = [it.state["step"] for it in dit]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(ps, [it.p.grad for it in dit], [it.state["exp_avg"] for it in dit],
                                [it.state["exp_avg_sq"] for it in dit], [], steps, amsgrad=False, lr=group["lr"],
                                beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                maximize=group["maximize"], grad_scale=None, found_inf=f)
            torch._foreach_sub_(steps, [f] * len(steps))


def apply_update(p: torch.Tensor, group: Dict, update: torch.Tensor, step: torch.Tensor, lr, keep: torch.Tensor,
                 extra: Optional[torch.Tensor] = None, extra_scale: float = 1.0) -> None:
    """W <- W (1 - lr wd) - step * update - lr * extra_scale * extra, in the compute dtype, rounded once to p's
    dtype, and nothing at all when ``keep`` is 0 (``update`` must then be finite; ``extra`` may hold anything)."""
    target = p if p.dtype in (torch.float32, torch.float64) else p.float()
    shape = (update if update is not None else extra).shape
    contiguous = target.is_contiguous()  # else (channels_last) work on a row-major copy and write it back
    flat = target.view(shape) if contiguous else target.reshape(shape)
    if group["weight_decay"]:
        decay = 1 - _as_float(lr) * group["weight_decay"] if not isinstance(lr, torch.Tensor) else \
            (1 - lr.detach().double() * group["weight_decay"])
        flat.mul_(gated(keep, decay, flat.dtype) if not isinstance(decay, torch.Tensor) else
                  torch.where(keep.bool(), decay.to(keep.device, flat.dtype), torch.ones((), dtype=flat.dtype,
                                                                                       device=keep.device)))
    if update is not None:
        flat.addcmul_(update, -step.to(flat.dtype) * keep.to(flat.dtype))
    if extra is not None:
        scale = (-(_lr64(lr, keep.device) * extra_scale)).to(flat.dtype) * keep.to(flat.dtype)
        flat.addcmul_(where_keep(keep, extra), scale)
    if not contiguous:
        target.copy_(flat.view(target.shape))
    if target is not p:
        p.copy_(target)


def _as_float(x) -> float:
    return float(x)


def _lr64(lr, device) -> torch.Tensor:
    if isinstance(lr, torch.Tensor):
        return lr.detach().to(device=device, dtype=torch.float64)
    return torch.tensor(float(lr), dtype=torch.float64, device=device)


__all__ = ["LowRankOptimizer", "LowRankRoute", "ENGINE_OPTIONS", "ROUTES", "register_route", "PROJ_TYPES",
           "side_for", "matrix_shape", "is_lowrank", "projected_dim", "density_rank", "apply_update",
           "defaults_for", "all_options", "selected_options", "part_options", "OVERFLOW", "Direction"]
