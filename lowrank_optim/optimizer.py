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
from . import sharding
from .inner import INNER_RULES, Direction
from .options import OptionError
from .parts import (
    ABSENT,
    ENGINE_OPTIONS,
    PROJ_TYPES,
    ROUTES,
    _parts_of,
    all_options,
    defaults_for,
    is_lowrank,
    part_options,
    register_route,
    selected_options,
)
from .projectors import PROJECTORS, Projector, make_projector
from .residual import RESIDUAL_RULES
from .route import LowRankRoute, _compute_dtype, _default_refresh_due, _grad, _Item, apply_update
from .shapes import density_rank, matrix_shape, projected_dim, side_for
from .state_layout import StateTensor, check_world, rank_bytes

NONFINITE_POLICIES = ("skip", "raise", "off")
# |g| at or above this overflows g * g in fp32: such a gradient would write inf into Adam's second moment.
OVERFLOW = math.sqrt(torch.finfo(torch.float32).max)


# ---------------------------------------------------------------------------------------------------- engine
class LowRankOptimizer(torch.optim.Optimizer):
    """Engine shared by every method; the named optimizers (GaLoreAdamW, FiraAdamW, ...) are rows of
    ``lowrank_optim.registry`` over it.

    Args:
        params: parameters or param groups; a group with ``rank`` (or ``density``) is trained low-rank.
        nonfinite: ``"skip"`` (default): a step with any non-finite or overflowing gradient (|g| >= 1.8e19, whose
            square overflows fp32) changes nothing and is counted in ``skipped_steps``; ``"raise"`` raises
            ``FloatingPointError`` naming the parameter (reads the device every step); ``"off"``: no check, as in
            ``torch.optim`` (a non-finite gradient reaches the weights and the state), for loops that check already
            (``torch.amp.GradScaler`` skips such steps itself) and do not want the check's read of every gradient.
        **defaults: group defaults: the engine's options (``ENGINE_OPTIONS``) and those of the parts they select.
    """

    method: Optional[str] = None  # a registry name: its parts and defaults are this optimizer's

    def __init__(self, params, nonfinite: str = "skip", **defaults):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"invalid nonfinite policy {nonfinite!r}; valid: {list(NONFINITE_POLICIES)}")
        from .registry import apply_key_aliases, method_defaults

        preset = method_defaults(self.method) if self.method else {}
        given = apply_key_aliases(self.method, defaults, "optimizer defaults")
        merged = defaults_for({**preset, **given})
        selected = {o.name for o in selected_options(merged)}
        # the method's own defaults for parts the user swapped out (random_style under projector="svd") drop out
        user = self._check_constructor_keys(given, merged)
        defaults = {**{k: v for k, v in preset.items() if k in selected}, **user}
        merged.update(defaults)
        self.nonfinite = nonfinite
        self._projectors: Dict[int, Tuple[tuple, Projector]] = {}
        self._stale: set = set()  # ids of parameters whose saved basis no longer fits their group's settings
        self._validated: Dict[int, tuple] = {}
        self._pending: List[tuple] = []  # (flag, host copy, copy event) of steps the host has not looked at
        self._skipped = 0
        self._host_step = True
        self._given = frozenset(user)  # options the caller set (not the method's or the parts' defaults)
        super().__init__(params, merged)
        declared = {o.name: o.default for o in selected_options(merged)}
        for k in user:  # an option set (away from its default) for a part that no group selects
            if user[k] == declared.get(k, ABSENT):
                continue
            if not any(k in {o.name for o in selected_options(g)} for g in self.param_groups):
                raise OptionError(
                    f"unknown optimizer options: [{k!r}]: {k!r} belongs to {all_options()[k]}, which "
                    "no param group uses"
                )

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
        given = {
            k: v
            for k, v in given.items()
            if k in selected or not any(v is d or (type(v) is type(d) and v == d) for d in declared.get(k, []))
        }
        # an option of another part may serve groups that select that part: checked once the groups are in
        bad = [k for k in given if k not in selected and k not in declared]
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
        out.update(nonfinite=self.nonfinite, _skipped=self.skipped_steps, method=self.method, _given=self._given)
        return out

    def __setstate__(self, state):
        state = dict(state)
        self.nonfinite = state.pop("nonfinite", getattr(self, "nonfinite", "skip"))
        self._skipped = state.pop("_skipped", getattr(self, "_skipped", 0))
        self._given = state.pop("_given", getattr(self, "_given", frozenset()))
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
                raise ValueError(
                    f"{where}: complex parameters are not supported (got a {p.dtype} parameter of "
                    f"shape {tuple(p.shape)})"
                )
            if isinstance(p, torch.Tensor):
                sharding.check_param(p, where)
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                raise ValueError(
                    f"{where}: only real floating-point parameters can be optimized (got a {p.dtype} "
                    f"parameter of shape {tuple(p.shape)})"
                )
        for kind, part in _parts_of(param_group):  # a part this group selects instead of the defaults' one
            if part is not None and param_group.get(kind) != self.defaults.get(kind):
                for o in part_options(part):  # its defaults, unless the constructor was given the option
                    param_group.setdefault(o.name, self.defaults[o.name] if o.name in self._given else o.default)
        filled = defaults_for(
            {k: param_group.get(k, self.defaults.get(k)) for k in ("inner", "residual", "route", "projector")}
        )
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
            fingerprint = tuple(
                (k, (id(v), v._version) if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"
            )
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
            warnings.warn(
                f"param group {index}: {len(small)} parameter(s) whose smaller side is <= rank "
                f"{group['rank']} (or that are not matrices) are trained densely: {small}",
                stacklevel=3,
            )

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
        key = (
            group["projector"],
            rank,
            side,
            shape,
            group["seed"],
            tuple(sorted((k, repr(v)) for k, v in opts.items())),
        )
        cached = self._projectors.get(id(p))
        if cached is None or cached[0] != key:
            seed = group["seed"] * 1_000_003 + index
            proj = make_projector(group["projector"], rank, side, shape, seed=seed, **opts)
            state = self.state.get(p, {})
            # a sharded basis is checked through stand-ins of its global shape: index bases (columns, dct) cannot
            # index a plain tensor with a DTensor, and gathering here would need every rank to call in step
            shapes = sharding.global_stand_ins(state, lambda k: k.startswith("proj_"))
            if int(state.get("proj_refreshes", 0)) > 0 and (cached is not None or not proj.fits(shapes)):
                self._stale.add(id(p))  # the group's subspace settings changed: a new basis at the next step
            cached = self._projectors[id(p)] = (key, proj)
        return cached[1]

    def _param_index(self, p: torch.Tensor, group: Dict) -> Tuple[int, Tuple[int, int]]:
        """(index among all parameters, (position in its group, group size)); a map rebuilt whenever the groups
        no longer hold ``p`` where it says (a group added, a list edited), instead of a scan per call."""
        sizes = tuple(len(g["params"]) for g in self.param_groups)
        cached_sizes, where = getattr(self, "_index_map", ((), {}))
        hit = where.get(id(p)) if cached_sizes == sizes else None
        if hit is None or self.param_groups[hit[0]]["params"][hit[2][0]] is not p:
            where, index = {}, 0
            for gi, g in enumerate(self.param_groups):
                for j, q in enumerate(g["params"]):
                    where[id(q)] = (gi, index, (j, len(g["params"])))
                    index += 1
            self._index_map = (sizes, where)
            hit = where.get(id(p))
            if hit is None or self.param_groups[hit[0]]["params"][hit[2][0]] is not p:
                raise KeyError("parameter not in optimizer")
        return hit[1], hit[2]

    # ------------------------------------------------------------------ state
    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite or overflowing gradient (reads any flag still on the device)."""
        self._settle(block=True)
        return self._skipped

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (moments, bases, indices, 8-bit codes and absmax, counters)."""
        return sum(
            sharding.local(v).numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )

    def expected_state_bytes(self, world_size: int = 1, rank: int = 0) -> int:
        """What ``state_bytes()`` will report once every parameter has stepped, from shapes alone (works on
        meta-device parameters: nothing is allocated). ``world_size`` > 1: what process ``rank`` reports when every
        parameter is sharded ``Shard(0)`` over ``world_size`` ranks (FSDP2 ``fully_shard``); shapes are the
        parameters' global ones. See ``lowrank_optim.memory.estimate_state_bytes``."""
        check_world(world_size, rank)
        return sum(rank_bytes(layout, world_size, rank) for layout in self.state_layouts())

    def state_layouts(self) -> List[List[StateTensor]]:
        """Per parameter that will take a step, the state tensors it will hold (see ``state_layout.py``)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if is_lowrank(group, p):
                    out.append(ROUTES[group["route"]].state_layout(self, group, p))
                else:
                    out.append(INNER_RULES[group["inner"]].state_layout(tuple(p.shape), group, _compute_dtype(p)))
        return out

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
                    raise ValueError(
                        f"param group {gi}: sparse gradients are not supported (parameter of shape {tuple(p.shape)})"
                    )
                if p.numel() == 0:
                    continue  # nothing to update
                found.append((gi, group, p))
        # a new parameter's state dict joins self.state only once its step went through (see _run)
        items = []
        for gi, group, p in found:
            state = self.state[p] if p in self.state else {}
            lowrank = is_lowrank(group, p)
            if not sharding.is_sharded(p):
                items.append(_Item(gi, group, p, state, lowrank))
                continue
            spread, view = sharding.Spread(p), _view_of(group, lowrank)
            if view == "gather":
                w, g = p.full_tensor(), p.grad.full_tensor()
            else:
                w, g = p.to_local(), p.grad.to_local()
            it = _Item(gi, group, p, sharding.state_view(state, spread, _full_keys(view)), lowrank, w, g, spread, view)
            it.low_rows = p.shape[0] if view == "local" else None  # the low-rank route may change it
            items.append(it)
        return items

    def _store_sharded(self, items: List[_Item]) -> None:
        """Write the views of sharded parameters back: their state as shards, a gathered weight's rows."""
        for it in items:
            if it.spread is None:
                continue
            state = self.state[it.p] if it.p in self.state else {}
            rows = {} if it.low_rows is None else {k: it.low_rows for k in it.state if not k.startswith("proj_")}
            sharding.store_view(state, it.state, it.spread, _full_keys(it.view), rows)
            it.state = state
            if it.view == "gather":
                it.p.to_local().copy_(it.spread.mine(it.w))

    def _host_reads(self, items: List[_Item]) -> bool:
        """Whether this step reads the flag on the host (see the module docstring)."""
        host_rules = [it.group["inner"] for it in items if INNER_RULES[it.group["inner"]].needs_host]
        if host_rules and torch.compiler.is_compiling():
            # Adafactor reads the parameter's RMS on the host: a graph break per parameter, and torch 2.13's
            # compiled frames then reuse one parameter's cached state lookup for another (wrong step counts)
            raise RuntimeError(
                f"inner rule {host_rules[0]!r} reads the device every step and cannot run inside "
                "torch.compile; compile the model, not optimizer.step, or use inner='adam'"
            )
        if self.nonfinite == "raise" or host_rules:
            return True
        if any(it.lowrank and self._refresh_due(it) for it in items):
            return True
        compiling = torch.compiler.is_compiling()
        return not compiling and all(it.p.device.type == "cpu" for it in items)

    def _refresh_due(self, it: _Item) -> bool:
        return (
            ROUTES[it.group["route"]].refresh_due(self, it)
            if hasattr(ROUTES[it.group["route"]], "refresh_due")
            else _default_refresh_due(it)
        )

    def _run(self, items: List[_Item]) -> None:
        host = self._host_step = self._host_reads(items)
        check = self.nonfinite != "off"
        ranks = sharding.flag_groups([it.spread for it in items if it.spread is not None]) if check else []
        found = _grad_flag([it.g for it in items] if check else [], items[0].w.device)
        if host and ranks:
            sharding.max_over(found, ranks)  # every rank skips together
        if host and self._skip_on_host(found, items, stage="gradient"):
            return
        low = [it for it in items if it.lowrank]
        routes = list(dict.fromkeys(it.group["route"] for it in low))
        for route_name in routes:
            ROUTES[route_name].prepare(self, [it for it in low if it.group["route"] == route_name])
        projected = [it.R for it in low if it.R is not None and check]
        if projected:
            found = torch.maximum(found, _grad_flag(projected, found.device))
        if ranks:
            found = sharding.max_over(found.clone(), ranks)
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
        self._store_sharded(items)
        for it in items:
            if it.p not in self.state:
                self.state[it.p] = it.state
        if not host and check:
            self._pending.append(_host_copy(found))

    def _skip_on_host(self, found: torch.Tensor, items: List[_Item], stage: str) -> bool:
        if not bool(found):
            return False
        if self.nonfinite == "raise":
            for it in items:
                g = it.g
                if not bool((g.abs() < OVERFLOW).all()):
                    raise FloatingPointError(
                        f"param group {it.gi}: non-finite gradient (NaN, inf or |x| >= "
                        f"{OVERFLOW:.2g}) in a parameter of shape {tuple(it.p.shape)}; no "
                        "parameter was updated"
                    )
            raise FloatingPointError(f"non-finite {stage} (|x| >= {OVERFLOW:.2g}); no parameter was updated")
        self._skipped += 1
        warnings.warn(
            f"non-finite {stage} (NaN, inf or |x| >= {OVERFLOW:.2g}): step skipped, no state changed "
            f"({self._skipped} skipped so far)",
            stacklevel=2,
        )
        return True

    def _settle(self, block: bool) -> None:
        """Count and report steps the device skipped without the host looking (CUDA, compiled steps)."""
        if not self._pending:
            return
        if torch.compiler.is_compiling():
            return
        left = []
        for found, host_copy, done in self._pending:
            if done is not None and not done.query():  # the copy has not landed yet: look again next step
                if not block:
                    left.append((found, host_copy, done))
                    continue
                done.synchronize()
            if bool(host_copy):
                self._skipped += 1
                warnings.warn(
                    f"non-finite gradient (NaN, inf or |x| >= {OVERFLOW:.2g}): step skipped on the "
                    f"device, no weight, moment or bias correction changed ({self._skipped} skipped so far)",
                    stacklevel=2,
                )
        self._pending = left

    # ------------------------------------------------------------------ dense parameters
    def _dense_step(self, items: List[_Item], found: torch.Tensor, keep_on) -> None:
        by_group: Dict[int, List[_Item]] = {}
        for it in items:
            by_group.setdefault(it.gi, []).append(it)
        for its in by_group.values():
            group = its[0].group
            inner = INNER_RULES[group["inner"]]
            fused = [it for it in its if _fusable(group, it.w, self._host_step)]
            rest = [it for it in its if not _fusable(group, it.w, self._host_step)]
            if fused:
                _fused_adamw(fused, group, found)
            for dev, dev_items in _by_device(rest).items():
                keep = keep_on(dev)
                grads = [_grad(it.g, group, matrix=False) for it in dev_items]
                dirs = inner.step(
                    [it.state for it in dev_items],
                    grads,
                    group,
                    None if self._host_step else keep,  # a host-checked step needs no gating
                    eps_style=group.get("eps_style") or "torch",
                    counter="step",
                    params=[it.w for it in dev_items],
                )
                for it, d in zip(dev_items, dirs):
                    apply_update(it.w, group, d.direction, d.step, d.decay_lr, keep)


# ---------------------------------------------------------------------------------------------------- helpers
def _view_of(group: Dict, lowrank: bool) -> str:
    """How a sharded parameter steps (see ``sharding.py``): on its own rows where the parts allow it (Adam moments,
    the low-rank route), else on the gathered whole (8-bit block layouts, Adafactor's factored statistics, the
    spectral route)."""
    if group["inner"] != "adam" or group["state_bits"] == 8:
        return "gather"
    return "local" if not lowrank or group["route"] == "lowrank" else "gather"


def _full_keys(view: str):
    """State keys held whole in a step's view: the basis in the local view (gathered for use), all in gather."""
    return (lambda k: k.startswith("proj_")) if view == "local" else (lambda k: True)


def _host_copy(found: torch.Tensor):
    """(flag, its copy in host memory, an event marking the copy) without waiting: a CUDA flag is copied
    asynchronously into pinned memory and read once its event has completed; a CPU flag is its own copy."""
    if found.device.type != "cuda":
        return found, found, None
    host = torch.empty((), dtype=found.dtype, pin_memory=True)
    host.copy_(found, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return found, host, done


def _grad_flag(grads: List[torch.Tensor], first: torch.device) -> torch.Tensor:
    """1.0 (on ``first``) if any entry is NaN, inf or |g| >= OVERFLOW, one read pass each: on CPU per-tensor
    min / max (torch's CPU inf-norm is several times slower than an AdamW step), elsewhere one multi-tensor
    inf-norm. Empty tensors (a rank's share of a small sharded parameter) have nothing to check."""
    by_dev: Dict[torch.device, List[torch.Tensor]] = {}
    for g in grads:
        if g.numel():
            by_dev.setdefault(g.device, []).append(g)
    if not by_dev:
        return torch.zeros((), device=first)
    flags = []
    for dev, gs in by_dev.items():
        if dev.type == "cpu":
            peaks = torch.stack([end.float() for g in gs for end in torch.aminmax(g)]).abs()
        else:
            peaks = torch.stack([n.float() for n in torch._foreach_norm(gs, float("inf"))])
        flags.append((~(peaks < OVERFLOW)).any().float())  # NaN compares False: flagged
    return flags[0] if len(flags) == 1 else torch.stack([f.to(first) for f in flags]).amax()


def _by_device(items: List[_Item]) -> Dict[torch.device, List[_Item]]:
    out: Dict[torch.device, List[_Item]] = {}
    for it in items:
        out.setdefault(it.p.device, []).append(it)
    return out


def _fusable(group: Dict, p: torch.Tensor, host: bool) -> bool:
    """torch's fused AdamW computes this group's dense update for ``p``: exactly for torch's eps placement; for
    galore-style eps (added before bias correction) with eps / sqrt(1 - beta2^t) in its place, equal up to rounding,
    which needs t on the host (so only on steps the host reads anyway; ``fused=False`` keeps the bitwise path)."""
    if group["inner"] != "adam" or group["fused"] is False:
        return False
    if (group.get("eps_style") or "torch") != "torch" and not host:
        return False
    if not group["correct_bias"] or p.dtype not in (torch.float32, torch.float64):
        return False
    if group["state_bits"] == 8 and p.numel() >= group["min_8bit_size"]:
        return False
    if group["state_dtype"] != "float32" and p.dtype == torch.float32:
        return False
    if isinstance(group["lr"], torch.Tensor) and group["lr"].device != p.device and p.device.type != "cpu":
        return False
    return p.device.type in ("cpu", "cuda")


def _fused_adamw(items: List[_Item], group: Dict, found: torch.Tensor) -> None:
    """torch.optim.AdamW(fused=True)'s update, state and all, gated by ``found`` like torch's GradScaler path."""
    beta1, beta2 = group["betas"]
    for dev, its in _by_device(items).items():
        by_dtype: Dict[torch.dtype, List[_Item]] = {}
        for it in its:
            by_dtype.setdefault(it.w.dtype, []).append(it)
        f = found.to(device=dev, dtype=torch.float32)
        for _, dit in by_dtype.items():
            for it in dit:
                st = it.state
                if "exp_avg" not in st or "exp_avg_codes" in st:
                    for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
                        st.pop(k, None)
                    st["exp_avg"] = torch.zeros_like(it.w, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(it.w, memory_format=torch.preserve_format)
                if not isinstance(st.get("step"), torch.Tensor) or st["step"].device != dev:
                    st["step"] = torch.tensor(float(st.get("step", 0)), dtype=torch.float32, device=dev)
            galore = (group.get("eps_style") or "torch") == "galore"
            by_t: Dict[int, List[_Item]] = {}
            for it in dit:  # galore-style eps depends on each parameter's step count: one call per count
                by_t.setdefault(int(it.state["step"]) if galore else 0, []).append(it)
            for t, tit in by_t.items():
                eps = group["eps"] / math.sqrt(1 - beta2 ** (t + 1)) if galore else group["eps"]
                steps = [it.state["step"] for it in tit]
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(
                    [it.w for it in tit],
                    [it.g for it in tit],
                    [it.state["exp_avg"] for it in tit],
                    [it.state["exp_avg_sq"] for it in tit],
                    [],
                    steps,
                    amsgrad=False,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    eps=eps,
                    maximize=group["maximize"],
                    grad_scale=None,
                    found_inf=f,
                )
                torch._foreach_sub_(steps, [f] * len(steps))


__all__ = [
    "LowRankOptimizer",
    "LowRankRoute",
    "ENGINE_OPTIONS",
    "ROUTES",
    "register_route",
    "PROJ_TYPES",
    "side_for",
    "matrix_shape",
    "is_lowrank",
    "projected_dim",
    "density_rank",
    "apply_update",
    "defaults_for",
    "all_options",
    "selected_options",
    "part_options",
    "OVERFLOW",
    "Direction",
]
