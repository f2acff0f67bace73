"""The ``lowrank`` route: project, step the inner rule in the subspace, project back, add the residual rule's term,
apply with decoupled decay, every update gated by the step's device-side flag (see ``optimizer.py``)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional

import torch

from .inner import INNER_RULES, Direction, gated, where_keep
from .parts import register_route
from .projectors import PROJECTORS, ProjectorError
from .residual import RESIDUAL_RULES, norm_dim
from .shapes import density_rank, matrix_shape, projected_dim
from .sharding import RowsProjection, broadcast_result
from .state_layout import StateTensor


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class _Item:
    """One parameter in this step: where it is, what it takes, and the tensors computed for it.

    ``p`` is the parameter (the key of its state); ``w`` and ``g`` are the weight and gradient the step computes
    on: ``p`` and ``p.grad`` themselves, or for a sharded parameter this rank's rows (``view == "local"``) or the
    gathered whole (``view == "gather"``), with ``state`` the matching view of its state (see ``sharding.py``)."""

    __slots__ = (
        "gi", "group", "p", "state", "lowrank", "proj", "G", "R", "refresh", "d", "w", "g", "spread", "view",
        "base", "low_rows",
    )  # fmt: skip

    def __init__(self, gi, group, p, state, lowrank, w=None, g=None, spread=None, view=None):
        self.gi, self.group, self.p, self.state, self.lowrank = gi, group, p, state, lowrank
        self.w = p if w is None else w
        self.g = p.grad if g is None else g
        self.spread, self.view = spread, view
        self.proj = self.G = self.R = self.refresh = self.d = self.base = None
        self.low_rows = None  # global rows of the tensor the inner rule steps (a sharded local view)


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

    def refresh_due(self, opt, it: "_Item") -> bool:
        opt.projector_for(it.group, it.p)  # notices a change of the group's subspace settings
        return id(it.p) in opt._stale or _default_refresh_due(it)

    def prepare(self, opt, items: List["_Item"]) -> None:
        """Compute every due basis (without committing it) and every projected gradient. Mutates no state."""
        due = []
        for it in items:
            it.proj = it.base = opt.projector_for(it.group, it.p)
            it.G = _grad(it.g, it.group, matrix=True)
            if it.proj.rank > 0 and self.refresh_due(opt, it):  # an empty subspace has no basis
                due.append(it)
        refresh_all(opt, due)
        for it in items:
            if it.proj.rank == 0:  # all of G is residual
                continue
            basis = {**it.state, **it.refresh} if it.refresh else it.state
            if it.view == "local":
                it.proj = RowsProjection(it.base, basis, it.spread)
            it.R = it.proj.project(basis, it.G)

    def commit_refresh(self, opt, items: List["_Item"]) -> None:
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
            if group["adaptive_gap"]:
                # held from the first refresh on: a state made by one step (the template torch.distributed.checkpoint
                # loads into) then has every key a later one has, so a loaded gap is never silently dropped
                state.setdefault("proj_gap", group["update_proj_gap"])
            inner = INNER_RULES[group["inner"]]
            if stale:
                inner.reset(state)
            elif old.get("proj_refreshes", 0):
                if group["adaptive_gap"]:
                    gap = state.get("proj_gap", group["update_proj_gap"])
                    if it.base.overlap(old, state) >= group["gap_overlap"]:
                        gap = min(2 * gap, group["max_proj_gap"])
                    state["proj_gap"] = gap
                policy = group["subspace_change"]
                if policy == "reset":
                    inner.reset(state)
                elif policy == "rotate":
                    rotate_moments(it, inner, it.base.rotation(old, state))

    def update(self, opt, items: List["_Item"], keep_on) -> None:
        buckets: Dict[tuple, List[_Item]] = {}
        for it in items:
            if it.R is None:  # an empty subspace: no moments, the whole gradient is residual
                INNER_RULES[it.group["inner"]].reset(it.state)
                continue
            style = it.group.get("eps_style") or ("torch" if it.proj.covers(it.state) else "galore")
            buckets.setdefault((it.gi, it.R.device, it.R.dtype, style), []).append(it)
        workspace: Dict = {}  # scratch the inner rule may reuse from one chunk to the next, freed with the step
        for (_, dev, _, style), bucket in buckets.items():
            group = bucket[0].group
            rule = RESIDUAL_RULES[group["residual"]]
            for its in _chunks(bucket):  # each chunk's directions are applied before the next chunk's are made
                dims = [norm_dim(it.proj.side) for it in its] if getattr(rule, "uses_channel_norms", False) else None
                dirs = INNER_RULES[group["inner"]].step(
                    [it.state for it in its],
                    [_rows_to_step(it) for it in its],
                    group,
                    None if opt._host_step else keep_on(dev),  # a host-checked step needs no gating
                    eps_style=style,
                    col_norm_dims=dims,
                    params=[it.w for it in its],
                    workspace=workspace,
                )
                for it, d in zip(its, dirs):
                    it.d = _whole_direction(it, d)
                    self._apply(it, keep_on(it.w.device), opt._host_step)
                    it.d = None
        for it in items:
            if it.R is None:
                self._apply(it, keep_on(it.w.device), opt._host_step)
            it.state["step"] = it.state.get("step", 0) + 1

    @staticmethod
    def _apply(it: "_Item", keep: torch.Tensor, host: bool) -> None:
        group, state, proj, d = it.group, it.state, it.proj, it.d
        rule = RESIDUAL_RULES[group["residual"]]
        if host and d is not None and rule.joins == "update" and _into_ok(it) and hasattr(rule, "factored"):
            factored = rule.factored(it.G, it.R, d, proj, state, group, keep)
            if factored is not None:  # the residual joins W as a per-channel multiple of G plus a low-rank term
                _apply_into(it, d, None, rule.joins, keep, host, factored)
                return
        extra = rule(it.G, it.R, d, proj, state, group, keep)
        if extra is not None and rule.joins != "separate" and not host:
            extra = where_keep(keep, extra)  # a skipped step's residual may hold NaN: it must add nothing
        if d is not None and rule.joins != "replace":
            if _fused_apply(it, d, extra, rule.joins, keep, host) or _apply_into(it, d, extra, rule.joins, keep, host):
                return
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
        apply_update(it.w, group, U, step, lr, keep, extra=extra)

    def state_layout(self, opt, group: Dict, p: torch.Tensor) -> List[StateTensor]:
        """Basis (or indices), the moments of the projected gradient, the residual rule's scalars. Sharded, the
        moments of a left or full projection (r x n, r x r) are split by rows of r, those of a right one (m x r)
        by rows of m (see ``sharding.py``): either way ``Shard(0)`` of this single-process shape."""
        proj = opt.projector_for(group, p)
        low = proj.low_rank_shape() if proj.rank > 0 else None
        inner = INNER_RULES[group["inner"]]
        moments = inner.state_layout(low, group, _compute_dtype(p)) if low and math.prod(low) else []
        return proj.state_layout() + moments + RESIDUAL_RULES[group["residual"]].state_layout(group)


register_route(LowRankRoute())


# Parameters whose moments step together before their directions join W: the directions of one chunk live in a
# scratch the next chunk reuses (already paged in and warm in cache), instead of new memory for every parameter.
CHUNK_ELEMENTS = 1 << 22


def _chunks(items: List[_Item]):
    """Consecutive runs of ``items`` of at most ``CHUNK_ELEMENTS`` weight elements (one item at least), counted on
    the whole parameter so that every rank of a sharded model cuts the same chunks."""
    run, size = [], 0
    for it in items:
        n = it.p.numel()
        if run and size + n > CHUNK_ELEMENTS:
            yield run
            run, size = [], 0
        run.append(it)
        size += n
    if run:
        yield run


def _default_refresh_due(it: _Item) -> bool:
    """At steps 0, T, 2T, ... of the parameter's own clock; with an adaptive gap, T steps after the last refresh."""
    state = it.state
    if int(state.get("proj_refreshes", 0)) == 0:
        return True
    step = state.get("step", 0)
    if it.group["adaptive_gap"] and "proj_gap" in state:
        return step - state.get("proj_step", 0) >= state["proj_gap"]
    return step % it.group["update_proj_gap"] == 0


def _into_ok(it: _Item) -> bool:
    W = it.w
    return it.group["fused"] is not False and W.dtype in (torch.float32, torch.float64) and W.is_contiguous()


def _apply_into(it: _Item, d: Direction, extra, joins, keep: torch.Tensor, host: bool, factored=None) -> bool:
    """The low-rank update projected back straight into W: the bias-corrected step, the scale and the skip gate
    ride on the small direction, so W takes one GEMM (``addmm_``) instead of a full-size U to build, scale and add.
    Equal to the reference order (project back, scale, step) up to rounding; ``fused=False`` keeps that order.
    ``factored`` = ``(T, t, L)``: a residual ``t * T + P L`` (``t`` broadcast over ``T``) that takes the same step
    (``FiraResidual.factored``), its low-rank part riding on the same GEMM (host-checked steps only: G is finite)."""
    if not _into_ok(it):
        return False
    W, group = it.w, it.group
    flat = W.view(it.G.shape)
    decay(flat, group, d.decay_lr, keep)
    coef = d.step.to(flat.dtype) * keep.to(flat.dtype)
    low = d.direction.mul_(coef * -group["scale"]) if d.scratch else d.direction * (coef * -group["scale"])
    if factored is not None:
        T, t, L = factored
        low.addcmul_(L, -coef)
    it.proj.add_back(it.state, low, flat)
    if factored is not None:
        flat.addcmul_(T, t.to(flat.dtype) * -coef)
    elif extra is not None and joins == "update":  # Fira's residual takes the same step (gated by the caller)
        flat.addcmul_(extra, -coef)
    elif extra is not None:  # FRUGAL's takes its own plain lr; a skipped step's residual may hold NaN
        lr = _lr64(d.decay_lr, keep.device).to(flat.dtype) * keep.to(flat.dtype)
        flat.addcmul_(extra if host else where_keep(keep, extra), -lr)
    return True


def _fused_apply(it: _Item, d: Direction, extra, joins, keep: torch.Tensor, host: bool) -> bool:
    """Project back, decay and update in one Triton pass over W (CUDA, or a forced backend). The kernel takes the
    learning rate as a number: the bias factor and the skip gate ride on the small low-rank direction instead, so
    no host read is needed, except for weight decay (a number too), which takes the kernel only when the host has
    read this step's flag anyway."""
    from . import quant

    p, group = it.w, it.group
    lr, wd = d.decay_lr, group["weight_decay"]
    if not (quant.kernels_for(p) and p.is_contiguous() and p.dtype == torch.float32) or isinstance(lr, torch.Tensor):
        return False
    if lr <= 0 or (wd and not host):
        return False
    factor = (d.step / lr) * keep  # Adam's bias factor, 0 on a skipped step
    low = d.direction * factor
    term = None
    if extra is not None:
        # Fira's residual takes the same bias-corrected step; FRUGAL's its own plain lr (gated here)
        term = extra * factor if joins == "update" else where_keep(keep, extra)
    return it.proj.fused_apply(it.state, low, p.view(it.G.shape), float(lr), wd, group["scale"], term)


def refresh_all(opt, due: List[_Item]) -> None:
    """``it.refresh`` for every item in ``due``. A sharded parameter's basis comes from the whole gradient (gathered
    once) on its owner rank, which broadcasts it; owners compute before anyone broadcasts, so ranks work in
    parallel. A basis that needs no gradient (random, blocks) is drawn on every rank; one that the projector can
    compute from each rank's rows (``refreshes_by_rows``) is, in the local view, computed on every rank with the
    projector's own small collectives instead. Same order on every rank."""
    pending = []
    for it in due:
        if it.spread is None or not getattr(it.base, "uses_gradient", True):
            it.refresh = _try_refresh(it, lambda it=it: it.base.refresh(it.state, it.G))
            continue
        if it.view == "local" and getattr(it.base, "refreshes_by_rows", False):
            it.refresh = _try_refresh(it, lambda it=it: it.base.refresh_rows(it.state, it.G, it.spread))
            continue
        G = it.G if it.view == "gather" else it.spread.gather(it.G, it.base.shape[0])
        owner = it.spread.owner(opt._param_index(it.p, it.group)[0])
        result = error = None
        if it.spread.rank == owner:
            try:
                result = it.base.refresh(it.state, G)
            except Exception as err:  # every rank must hear of it, or the others wait forever
                error = f"{type(err).__name__}: {err}" if not isinstance(err, ProjectorError) else str(err)
        pending.append((it, owner, result, error))
        del G
    for it, owner, result, error in pending:
        result, error = broadcast_result(it.spread, owner, result, error, it.G.device)
        it.refresh = _try_refresh(it, lambda result=result, error=error: _raise_or(result, error))


def _raise_or(result, error):
    if error is not None:
        raise ProjectorError(error)
    return result


def _rows_to_step(it: _Item) -> torch.Tensor:
    """The projected gradient the inner rule steps here: a left or full projection is whole on every rank in the
    local view, so each rank steps its rows of it (moments sharded like everything else)."""
    if it.view == "local" and not it.proj.low_sharded:
        it.low_rows = it.R.shape[0]
        return it.spread.mine(it.R)
    it.low_rows = it.p.shape[0] if it.view == "local" else None
    return it.R


def _whole_direction(it: _Item, d: Direction) -> Direction:
    """The direction for projecting back: every rank's rows gathered, where each rank stepped only its rows of a
    whole projected gradient (one all-gather of r x n)."""
    if it.view != "local" or it.proj.low_sharded:
        return d
    return d._replace(direction=it.spread.gather(d.direction, it.R.shape[0]), col_norms=None)


def rotate_moments(it: _Item, inner, rot) -> None:
    """Carry the moments into the new basis. In the local view the moments of a whole (left / full) projection
    are split by rows: they are gathered for the rotation and each rank keeps its rows."""
    if it.view != "local" or it.proj.low_sharded:
        inner.rotate(it.state, rot)
        return
    keys = [k for k, v in it.state.items() if isinstance(v, torch.Tensor) and v.dim() and not k.startswith("proj_")]
    whole = {**it.state, **{k: it.spread.gather(it.state[k], it.R.shape[0]) for k in keys}}
    inner.rotate(whole, rot)  # rotates in place, or drops the moments (a new size)
    for k in keys:
        if k in whole:
            it.state[k].copy_(it.spread.mine(whole[k]))
        else:
            del it.state[k]
    for k in [k for k in it.state if k not in whole]:
        del it.state[k]


def _try_refresh(it: _Item, compute) -> Optional[Dict[str, Any]]:
    """New basis entries, or None to keep the previous basis after a failed refresh (a failed first one raises)."""
    has_basis = int(it.state.get("proj_refreshes", 0)) > 0
    try:
        return compute()
    except ProjectorError as err:
        if has_basis:  # keep the previous basis: training continues in the last good subspace
            warnings.warn(
                f"param group {it.gi}: basis refresh failed for a parameter of shape "
                f"{tuple(it.p.shape)} ({err}); keeping the previous basis",
                stacklevel=2,
            )
            return None
        raise RuntimeError(
            f"param group {it.gi}: the first basis of a parameter of shape {tuple(it.p.shape)} "
            f"could not be computed ({err}); no parameter was updated"
        ) from err


def _grad(g: torch.Tensor, group: Dict, matrix: bool) -> torch.Tensor:
    """The gradient in the compute dtype (as a matrix for low-rank parameters: rows by the rest, or a row for a
    vector). Read-only: for fp32 parameters it is ``.grad`` itself, so no rule may modify it in place."""
    if matrix:
        # columns spelled out: a rank may hold no rows of a sharded parameter (a (0, -1) reshape is ambiguous)
        g = g.reshape(g.shape[0], math.prod(g.shape[1:])) if g.dim() >= 2 else g.reshape(1, g.numel())
    want = _compute_dtype(g)
    if g.dtype != want:
        g = g.to(want)
    return -g if group["maximize"] else g


def apply_update(
    p: torch.Tensor,
    group: Dict,
    update: torch.Tensor,
    step: torch.Tensor,
    lr,
    keep: torch.Tensor,
    extra: Optional[torch.Tensor] = None,
    extra_scale: float = 1.0,
) -> None:
    """W <- W (1 - lr wd) - step * update - lr * extra_scale * extra, in the compute dtype, rounded once to p's
    dtype, and nothing at all when ``keep`` is 0 (``update`` must then be finite; ``extra`` may hold anything)."""
    target = p if p.dtype in (torch.float32, torch.float64) else p.float()
    shape = (update if update is not None else extra).shape
    contiguous = target.is_contiguous()  # else (channels_last) work on a row-major copy and write it back
    flat = target.view(shape) if contiguous else target.reshape(shape)
    decay(flat, group, lr, keep)
    if update is not None:
        flat.addcmul_(update, -step.to(flat.dtype) * keep.to(flat.dtype))
    if extra is not None:
        scale = (-(_lr64(lr, keep.device) * extra_scale)).to(flat.dtype) * keep.to(flat.dtype)
        flat.addcmul_(where_keep(keep, extra), scale)
    if not contiguous:
        target.copy_(flat.view(target.shape))
    if target is not p:
        p.copy_(target)


def decay(flat: torch.Tensor, group: Dict, lr, keep: torch.Tensor) -> None:
    """Decoupled weight decay ``W *= 1 - lr * wd`` (exactly 1 on a skipped step)."""
    if not group["weight_decay"]:
        return
    if not isinstance(lr, torch.Tensor):
        flat.mul_(gated(keep, 1 - float(lr) * group["weight_decay"], flat.dtype))
        return
    factor = (1 - lr.detach().double() * group["weight_decay"]).to(keep.device, flat.dtype)
    flat.mul_(torch.where(keep.bool(), factor, torch.ones((), dtype=flat.dtype, device=keep.device)))


def _lr64(lr, device) -> torch.Tensor:
    if isinstance(lr, torch.Tensor):
        return lr.detach().to(device=device, dtype=torch.float64)
    return torch.tensor(float(lr), dtype=torch.float64, device=device)


__all__ = ["LowRankRoute", "apply_update"]
