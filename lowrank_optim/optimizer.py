"""The engine: one ``torch.optim.Optimizer`` that runs every method's step.

For a low-rank parameter (its group has ``rank``), viewed as a 2-D (m, n) matrix G:

    if refresh due: projector.refresh(G); on subspace change keep / reset / rotate the moments
    R = project(G);  d = inner.update(R);  U = scale * project_back(d)
    W = W * (1 - lr * wd) - step_size * U - lr * residual_rule(G, R, d)

Other parameters get the inner rule on the full gradient (``adam``: numerically ``torch.optim.AdamW``).

A step is all-or-nothing: inputs are validated, gradients checked and every due basis computed before any state or
parameter changes, so a bad gradient or a failed SVD never leaves half the model updated.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import quant
from .inner import DTYPES, INNER_RULES
from .projectors import PROJECTORS, Projector, ProjectorError, make_projector
from .residual import RESIDUAL_RULES, fira_norm_dim

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SUBSPACE_CHANGES = ("keep", "reset", "rotate")
NONFINITE_POLICIES = ("skip", "raise")
# Options forwarded to the projector constructor when present in a group.
PROJECTOR_OPTIONS = ("oversample", "power_iters", "dct_norm", "dct_impl", "select", "sst_weight")

DEFAULTS: Dict[str, Any] = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False, correct_bias=True,
    # where Adam's eps goes: "torch" (torch.optim.AdamW: eps added to the bias-corrected sqrt(v)) or "galore"
    # (galore-torch / fira / HF: eps added to sqrt(v), then bias correction); None = torch for dense groups and
    # galore for low-rank ones, so both match their references. "galore" everywhere reproduces galore-torch runs.
    eps_style=None,
    # low-rank groups (those with a ``rank`` key)
    update_proj_gap=200, scale=0.25, proj_type="std", projector="svd", seed=0, subspace_change="keep",
    # parts
    inner="adam", residual="none", state_bits=32, state_dtype="float32", min_8bit_size=4096,
    # Fira
    fira_gamma=1.01, fira_residual="reference", fira_floor=0.0,
    # FRUGAL
    inactive_update="signsgd", inactive_lr_scale=1.0,
)

# Adafactor's keys (galore-torch / HF meaning); added by the Adafactor preset.
ADAFACTOR_DEFAULTS: Dict[str, Any] = dict(
    eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None, scale_parameter=True,
    relative_step=True, warmup_init=False,
)


def side_for(shape: Tuple[int, int], proj_type: str) -> str:
    """Which side to project, from the WEIGHT's shape (never from a projected tensor's shape)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def matrix_shape(p: torch.Tensor) -> Tuple[int, int]:
    """Weights with more than two dims (conv) are treated as (out, prod(rest))."""
    return (p.shape[0], p.numel() // p.shape[0]) if p.dim() >= 2 else (1, p.numel())


def is_lowrank(group: Dict, p: torch.Tensor) -> bool:
    return "rank" in group and p.dim() >= 2 and min(matrix_shape(p)) > group["rank"]


class LowRankOptimizer(torch.optim.Optimizer):
    """Engine shared by every method; the named optimizers (GaLoreAdamW, FiraAdamW, ...) are presets of it.

    Args:
        params: parameters or param groups; a group with a ``rank`` key is trained low-rank.
        nonfinite: ``"skip"`` (default) skips the whole step when any gradient has inf/NaN (no state changes,
            counted in ``skipped_steps``); ``"raise"`` raises ``FloatingPointError`` naming the parameter.
        **defaults: group defaults; see ``DEFAULTS``.
    """

    def __init__(self, params, nonfinite: str = "skip", **defaults):
        merged = dict(DEFAULTS)
        if defaults.get("inner") == "adafactor":
            merged.update(ADAFACTOR_DEFAULTS)
            merged["lr"] = None
        unknown = set(defaults) - set(merged) - {"rank", *PROJECTOR_OPTIONS}
        if unknown:
            raise TypeError(f"unknown optimizer options: {sorted(unknown)}")
        merged.update(defaults)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"invalid nonfinite policy {nonfinite!r}; valid: {list(NONFINITE_POLICIES)}")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._projectors: Dict[torch.Tensor, Tuple[tuple, Projector]] = {}
        super().__init__(params, merged)

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        index = len(self.param_groups)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}  # a generator must survive our look at it
        for p in params:
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise ValueError(f"param group {index}: complex parameters are not supported "
                                 f"(got a {p.dtype} parameter of shape {tuple(p.shape)})")
        filled = dict(self.defaults)
        filled.update(param_group)
        filled["params"] = params
        self._validate_group(filled, index)
        super().add_param_group(param_group)
        self._warn_dense(self.param_groups[-1], index)

    def _validate_group(self, g: Dict[str, Any], i: int) -> None:
        def bad(key, why):
            valid = f"; valid: {why}" if isinstance(why, (list, tuple)) else f" ({why})"
            raise ValueError(f"param group {i}: invalid {key} {g.get(key)!r}{valid}")

        def real(x):
            return isinstance(x, numbers.Real) and not isinstance(x, bool)

        lr = g["lr"]
        if lr is None:
            if not (g["inner"] == "adafactor" and g.get("relative_step")):
                bad("lr", "must be a number >= 0 (None only with Adafactor's relative_step)")
        elif isinstance(lr, torch.Tensor):
            if lr.numel() != 1 or float(lr) < 0:
                bad("lr", "must be a scalar >= 0")
        elif not real(lr) or lr < 0:
            bad("lr", "must be a number >= 0")
        if g["inner"] not in INNER_RULES:
            bad("inner", sorted(INNER_RULES))
        if g["inner"] == "adafactor":
            eps = g["eps"]
            if not (isinstance(eps, (tuple, list)) and len(eps) == 2 and all(real(e) and e >= 0 for e in eps)):
                bad("eps", "Adafactor takes a pair (eps1, eps2) of numbers >= 0")
            if g.get("beta1") is not None and not (real(g["beta1"]) and 0 <= g["beta1"] < 1):
                bad("beta1", "must be None or in [0, 1)")
        else:
            if not real(g["eps"]) or g["eps"] < 0:
                bad("eps", "must be a number >= 0")
            betas = g["betas"]
            if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                    and all(real(b) and 0 <= b < 1 for b in betas)):
                bad("betas", "must be a pair of numbers in [0, 1)")
        if not real(g["weight_decay"]) or g["weight_decay"] < 0:
            bad("weight_decay", "must be a number >= 0")
        if g["eps_style"] not in (None, "torch", "galore"):
            bad("eps_style", [None, "torch", "galore"])
        if g["residual"] not in RESIDUAL_RULES:
            bad("residual", sorted(RESIDUAL_RULES))
        if g["state_bits"] not in (8, 32):
            bad("state_bits", [8, 32])
        m8 = g["min_8bit_size"]
        if not isinstance(m8, int) or isinstance(m8, bool) or m8 < 1:
            bad("min_8bit_size", "must be an int >= 1")
        if g["state_dtype"] not in DTYPES:
            bad("state_dtype", sorted(DTYPES))
        if g["subspace_change"] not in SUBSPACE_CHANGES:
            bad("subspace_change", list(SUBSPACE_CHANGES))
        if g["inactive_update"] not in ("signsgd", "sgd", "none"):
            bad("inactive_update", ["signsgd", "sgd", "none"])
        if g["fira_residual"] not in ("reference", "paper"):
            bad("fira_residual", ["reference", "paper"])
        if not real(g["fira_gamma"]) or g["fira_gamma"] < 1:
            bad("fira_gamma", "must be a number >= 1")
        if not real(g["fira_floor"]) or g["fira_floor"] < 0:
            bad("fira_floor", "must be a number >= 0")
        if not real(g["inactive_lr_scale"]) or g["inactive_lr_scale"] < 0:
            bad("inactive_lr_scale", "must be a number >= 0")
        if "rank" in g:
            r = g["rank"]
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                bad("rank", "must be an int > 0")
            gap = g["update_proj_gap"]
            if not isinstance(gap, int) or isinstance(gap, bool) or gap <= 0:
                bad("update_proj_gap", "must be an int > 0")
            if not real(g["scale"]) or g["scale"] <= 0:
                bad("scale", "must be a number > 0")
            if g["proj_type"] not in PROJ_TYPES:
                bad("proj_type", list(PROJ_TYPES))
            if g["projector"] not in PROJECTORS:
                bad("projector", sorted(PROJECTORS))
            if not isinstance(g["seed"], int):
                bad("seed", "must be an int")

    def _warn_dense(self, group: Dict, index: int) -> None:
        if "rank" not in group:
            return
        small = [tuple(p.shape) for p in group["params"] if not is_lowrank(group, p)]
        if small:
            warnings.warn(f"param group {index}: {len(small)} parameter(s) whose smaller side is <= rank "
                          f"{group['rank']} (or that are not matrices) are trained densely: {small}", stacklevel=3)

    # ------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As torch's, except that state tensors keep their dtype (torch casts floating state to the parameter's
        dtype and even integer index tensors to float): fp32 moments of bf16 weights, 8-bit codes, fp32 absmax and
        projector indices come back exactly as saved; only the device follows the parameter."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # checks the groups, loads their hyper-parameters
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid in saved:
                self.state[p] = {k: v.to(device=p.device, copy=True) if isinstance(v, torch.Tensor) else v
                                 for k, v in saved[pid].items()}

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (moments, bases, indices, 8-bit codes and absmax)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))

    def expected_state_bytes(self) -> int:
        """What ``state_bytes()`` will report once every parameter has stepped, from shapes alone (works on
        meta-device parameters: nothing is allocated). See ``lowrank_optim.memory.estimate_state_bytes``."""
        return sum(self._expected_param_bytes(group, p) for group in self.param_groups for p in group["params"]
                   if p.requires_grad)

    def _expected_param_bytes(self, group: Dict, p: torch.Tensor) -> int:
        rule = INNER_RULES[group["inner"]]
        if not self._is_lowrank(group, p):
            return rule.expected_bytes(tuple(p.shape), group)
        proj = self.projector_for(group, p)
        fira = 4 if group["residual"] == "fira" else 0  # the limiter's previous norm, an fp32 scalar
        return proj.expected_state_bytes() + rule.expected_bytes(proj.low_rank_shape(), group) + fira

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            self._validate_group(group, i)
        items = self._collect()
        if not items or not self._grads_finite(items):
            return loss
        self._step_items(items)
        return loss

    def _collect(self) -> List[Tuple[int, Dict, torch.Tensor]]:
        items = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"param group {gi}: sparse gradients are not supported "
                                     f"(parameter of shape {tuple(p.shape)})")
                items.append((gi, group, p))
        return items

    def _grads_finite(self, items) -> bool:
        # One read pass per gradient (max |g| is finite iff every entry is; NaN propagates) and one host sync.
        grads = [p.grad for _, _, p in items]
        ok = torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads, float("inf"))])).all()
        if bool(ok):
            return True
        if self.nonfinite == "raise":
            for gi, _, p in items:
                if not bool(torch.isfinite(p.grad).all()):
                    raise FloatingPointError(f"param group {gi}: non-finite gradient in parameter of shape "
                                             f"{tuple(p.shape)}; no parameter was updated")
        self.skipped_steps += 1
        warnings.warn(f"non-finite gradient: step skipped, no state changed ({self.skipped_steps} skipped so far)")
        return False

    def _step_items(self, items) -> None:
        """Refresh every due basis first (may raise, nothing changed yet), then update every parameter."""
        refreshes = {p: self._refresh(gi, group, p) for gi, group, p in items if self._is_lowrank(group, p)}
        for gi, group, p in items:
            if p in refreshes:
                self._step_lowrank(group, p, refreshes[p])
            else:
                self._step_dense(group, p)

    # ------------------------------------------------------------------ parts
    def _grad(self, p: torch.Tensor, group: Dict, matrix: bool) -> torch.Tensor:
        """The fp32 gradient (as a matrix for low-rank parameters). Read-only: for fp32 parameters it is ``.grad``
        itself, so no rule may modify it in place."""
        g = p.grad.reshape(matrix_shape(p)) if matrix else p.grad
        if g.dtype != torch.float32:
            g = g.float()
        return -g if group["maximize"] else g

    def _is_lowrank(self, group: Dict, p: torch.Tensor) -> bool:
        """Hook: whether ``p`` takes the low-rank path (a preset may decide per parameter, e.g. FRUGAL)."""
        return is_lowrank(group, p)

    def rank_for(self, group: Dict, p: torch.Tensor) -> int:
        """Hook: the subspace size for ``p`` (a preset may size it per parameter, e.g. FRUGAL's density)."""
        return group["rank"]

    def projector_for(self, group: Dict, p: torch.Tensor) -> Projector:
        shape = matrix_shape(p)
        options = {k: group[k] for k in PROJECTOR_OPTIONS if k in group}
        rank = self.rank_for(group, p)
        key = (group["projector"], rank, side_for(shape, group["proj_type"]), shape, group["seed"],
               tuple(sorted(options.items())))
        cached = self._projectors.get(p)
        if cached is None or cached[0] != key:
            seed = group["seed"] * 1_000_003 + self._param_index(p)
            proj = make_projector(group["projector"], rank, key[2], shape, seed=seed, **options)
            cached = self._projectors[p] = (key, proj)
        return cached[1]

    def _param_index(self, p: torch.Tensor) -> int:
        index = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return index
                index += 1
        raise KeyError("parameter not in optimizer")

    def _refresh(self, gi: int, group: Dict, p: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """New basis entries if a refresh is due, else None. Never mutates (nor creates) state."""
        state = self.state.get(p, {})
        has_basis = int(state.get("proj_refreshes", 0)) > 0
        if has_basis and state.get("step", 0) % group["update_proj_gap"] != 0:
            return None
        proj = self.projector_for(group, p)
        try:
            return proj.refresh(state, self._grad(p, group, matrix=True))
        except ProjectorError as err:
            if has_basis:  # keep the previous basis: training continues in the last good subspace
                warnings.warn(f"param group {gi}: basis refresh failed for a parameter of shape "
                              f"{tuple(p.shape)} ({err}); keeping the previous basis")
                return None
            raise RuntimeError(f"param group {gi}: the first basis of a parameter of shape {tuple(p.shape)} "
                               f"could not be computed ({err}); no parameter was updated") from err

    def _on_subspace_change(self, group: Dict, state: Dict, proj: Projector, old: Dict) -> None:
        policy = group["subspace_change"]
        rule = INNER_RULES[group["inner"]]
        if policy == "reset":
            rule.reset(state)
        elif policy == "rotate":
            rule.rotate(state, proj.rotation(old, state))

    def _step_lowrank(self, group: Dict, p: torch.Tensor, refresh: Optional[Dict]) -> None:
        state = self.state[p]
        proj = self.projector_for(group, p)
        G = self._grad(p, group, matrix=True)
        if refresh is not None:
            old = {k: v for k, v in state.items() if k.startswith("proj_")}
            state.update(refresh)
            if old.get("proj_refreshes", 0):
                self._on_subspace_change(group, state, proj, old)
        R = proj.project(state, G)
        norm_dim = fira_norm_dim(proj.side) if group["residual"] == "fira" else None
        d = INNER_RULES[group["inner"]].update(state, R, group, p, eps_style=group["eps_style"] or "galore",
                                               col_norm_dim=norm_dim)
        rule = RESIDUAL_RULES[group["residual"]]
        extra = rule(G, R, d, proj, state, group)
        joins = extra is not None and getattr(rule, "joins_update", False)
        state["step"] = state.get("step", 0) + 1
        lr, scale = d.decay_lr, group["scale"]
        if quant.kernels_for(p) and p.is_contiguous() and lr > 0:
            # one Triton pass: project back, decay, update; the kernel takes the residual in units of lr
            term = extra * (d.step_size / lr) if joins else extra
            if proj.fused_apply(state, d.direction, p.view(G.shape), lr, group["weight_decay"],
                                d.step_size * scale / lr, term):
                return
        U = proj.project_back(state, d.direction)
        if scale != 1.0:
            U.mul_(scale)  # scaled before the step, in this order, as galore-torch / fira do (bitwise parity)
        if joins:  # Fira: one update tensor, one bias-corrected step
            U.add_(extra)
            extra = None
        self._apply(p, group, U, d.step_size, lr, extra)

    def _step_dense(self, group: Dict, p: torch.Tensor, scale: float = 1.0) -> None:
        state = self.state[p]
        d = INNER_RULES[group["inner"]].update(state, self._grad(p, group, matrix=False), group, p,
                                               eps_style=group["eps_style"] or "torch")
        state["step"] = state.get("step", 0) + 1
        self._apply(p, group, d.direction, d.step_size * scale, d.decay_lr, None)

    @staticmethod
    def _apply(p: torch.Tensor, group: Dict, update: torch.Tensor, step_size: float, lr: float,
               extra: Optional[torch.Tensor]) -> None:
        """W <- W (1 - lr wd) - step_size * update - lr * extra, in fp32, rounded once to p's dtype."""
        target = p if p.dtype == torch.float32 else p.float()
        flat = target.view(update.shape)
        if group["weight_decay"]:
            flat.mul_(1 - lr * group["weight_decay"])
        flat.add_(update, alpha=-step_size)
        if extra is not None:
            flat.add_(extra, alpha=-lr)
        if target is not p:
            p.copy_(target)


__all__ = ["LowRankOptimizer", "DEFAULTS", "ADAFACTOR_DEFAULTS", "PROJ_TYPES", "side_for", "matrix_shape",
           "is_lowrank"]
