"""Optimizer checkpoints from other packages, converted to this package's state-dict format.

Sources (see ``detect_source``):
  * ``galore-torch`` 1.0: ``GaLoreAdamW`` and ``GaLoreAdafactor`` (and HF-style dense AdamW / Adafactor groups).
    Each low-rank parameter's state holds a pickled ``GaLoreProjector`` whose ``ortho_matrix`` is the basis.
  * ``fira`` 1.0.2: ``FiraAdamW``; the projector is a ``GradientProjector`` and ``scaling_grad`` is the
    limiter's previous residual norm.
  * ``torch``: ``torch.optim.AdamW`` (and ``Adam`` without weight decay), trained densely.

Their checkpoints hold Python objects, so they load only with ``torch.load(..., weights_only=False)`` (and only
where galore-torch / fira are importable); the converted dict holds tensors and numbers only.

    sd = torch.load("galore_ckpt.pt", weights_only=False)["optimizer"]
    opt = GaLoreAdamW(groups, lr=1e-2)
    opt.load_state_dict(lowrank_optim.convert_state_dict(sd, optimizer=opt))

Values the checkpoint defines win (as in torch's ``load_state_dict``: the loaded groups replace the optimizer's);
``optimizer`` supplies the engine options the checkpoint cannot define (``state_bits``, ``state_dtype``, ...),
and its parameters are checked against the checkpoint's shapes. ``eps_style`` becomes the source's eps
placement ("galore" for galore-torch / fira, "torch" for torch.optim), so a resumed run continues as the source
would have; galore-torch's decoupled weight decay comes after the update, ours before (a difference O(lr^2 wd)).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from . import quant
from .inner import DTYPES
from .parts import defaults_for
from .shapes import matrix_shape, side_for

SOURCES = ("galore-torch", "fira", "lowrank_optim", "torch")

# Per-parameter state keys only this package writes.
_OWN_STATE_KEYS = ("moment_step", "proj_refreshes", "fira_prev_norm")
# Group keys of torch.optim.Adam / AdamW that carry no meaning here (or are checked separately).
_TORCH_GROUP_KEYS = ("amsgrad", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")
# bitsandbytes' Optimizer2State group keys (galore-torch's GaLoreAdamW8bit).
_BNB_GROUP_KEYS = ("t_alpha", "t_beta3")
_HF_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "correct_bias")
_LOWRANK_KEYS = ("rank", "update_proj_gap", "proj_type")

_CALL = "lowrank_optim.convert_state_dict(sd)"


# ---------------------------------------------------------------------------------------------------- detection
def _is_projector_object(x: Any) -> bool:
    return hasattr(x, "ortho_matrix") and hasattr(x, "proj_type")


def _states(state_dict: Dict) -> List[Dict]:
    state = state_dict.get("state")
    return [s for s in state.values() if isinstance(s, dict)] if isinstance(state, dict) else []


def _groups(state_dict: Dict) -> List[Dict]:
    groups = state_dict.get("param_groups")
    return [g for g in groups if isinstance(g, dict)] if isinstance(groups, (list, tuple)) else []


def detect_source(state_dict: Any) -> Optional[str]:
    """Which optimizer wrote ``state_dict``: "galore-torch", "fira", "lowrank_optim", "torch", or None.

    Per-parameter state decides first (pickled projectors, Fira's ``scaling_grad``, our own counters); a dict
    saved before any step is told apart by its group keys."""
    if not _is_optimizer_state_dict(state_dict) or not state_dict["param_groups"]:
        return None
    states, groups = _states(state_dict), _groups(state_dict)
    for st in states:
        if any(k in st for k in _OWN_STATE_KEYS) or any(k.startswith("proj_") for k in st if isinstance(k, str)):
            return "lowrank_optim"
        proj = st.get("projector")
        if "scaling_grad" in st or (_is_projector_object(proj) and hasattr(proj, "alpha")):
            return "fira"
        if _is_projector_object(proj) or "RMS" in st:
            return "galore-torch"
    if all("inner" in g and "residual" in g for g in groups):
        return "lowrank_optim"
    if any(k in g for g in groups for k in _BNB_GROUP_KEYS):
        return "galore-torch" if any("rank" in g for g in groups) else None
    if any("rank" in g and "alpha" in g for g in groups):
        return "fira"
    if all("amsgrad" in g and "betas" in g for g in groups):
        return "torch"
    if all(set(_HF_ADAM_KEYS) <= set(g) or "decay_rate" in g for g in groups):
        return "galore-torch"
    return None


def foreign_state_message(state_dict: Any) -> Optional[str]:
    """None for this package's own format; otherwise one sentence naming what the dict is and how to convert it."""
    source = detect_source(state_dict)
    if source == "lowrank_optim":
        return None
    if source is None:
        return (
            "this is not a lowrank_optim optimizer state dict, nor one of a format that "
            f"{_CALL} converts (galore-torch 1.0, fira 1.0.2, torch.optim.AdamW)"
        )
    if _is_8bit(state_dict):
        return (
            "this is a galore-torch GaLoreAdamW8bit state dict, whose bitsandbytes 8-bit states cannot be "
            "converted exactly to lowrank_optim's format: resume that run with galore-torch"
        )
    what = {
        "galore-torch": "a galore-torch (or HF-style AdamW / Adafactor) optimizer state dict",
        "fira": "a fira optimizer state dict",
        "torch": "a torch.optim.Adam/AdamW state dict",
    }[source]
    return f"this is {what}, not in lowrank_optim's format: convert it first with {_CALL}"


# ---------------------------------------------------------------------------------------------------- conversion
def convert_state_dict(state_dict: Dict, source: Optional[str] = None, optimizer=None) -> Dict:
    """``state_dict`` (galore-torch, fira or torch.optim) in this package's format, ready for ``load_state_dict``.

    Args:
        source: one of ``SOURCES``; detected when None. Our own format is returned unchanged (a copy).
        optimizer: optional target optimizer: supplies the engine options the checkpoint does not define and is
            checked against it (same groups, same parameter counts and shapes, same ranks).
    Raises ValueError for a dict that is not recognised or cannot be converted exactly."""
    if source is not None and source not in SOURCES:
        raise ValueError(f"invalid source {source!r}; valid: {list(SOURCES)}")
    detected = detect_source(state_dict)
    if detected is None and (source is None or not _is_optimizer_state_dict(state_dict)):
        raise ValueError(_unrecognised(state_dict))
    source = source or detected
    if "lowrank_optim" in (source, detected):
        if source != detected:  # converting our own dict again would drop its bases
            raise ValueError(f"source={source!r}, but the dict is in {detected or 'an unrecognised'} format")
        return {
            **state_dict,
            "state": dict(state_dict["state"]),
            "param_groups": [dict(g) for g in state_dict["param_groups"]],
        }
    groups = _groups(state_dict)
    targets = _target_groups(optimizer, groups)
    new_groups, owner = [], {}
    for gi, (group, target) in enumerate(zip(groups, targets)):
        new_groups.append(_convert_group(group, gi, source, target))
        owner.update({pid: gi for pid in group["params"]})
    params = _params_by_id(optimizer, groups)
    new_state = {}
    for pid, st in state_dict["state"].items():
        if pid not in owner:
            raise ValueError(f"state for parameter id {pid!r} belongs to no param group")
        gi = owner[pid]
        where = f"param group {gi}, parameter id {pid!r}"
        new_state[pid] = _convert_param_state(st, new_groups[gi], source, where, params.get(pid))
    return {"state": new_state, "param_groups": new_groups}


def _is_8bit(state_dict: Dict) -> bool:
    return any(k in g for g in _groups(state_dict) for k in _BNB_GROUP_KEYS) or any(
        "state1" in st for st in _states(state_dict)
    )


def _is_optimizer_state_dict(state_dict: Any) -> bool:
    return (
        isinstance(state_dict, dict)
        and isinstance(state_dict.get("state"), dict)
        and isinstance(state_dict.get("param_groups"), (list, tuple))
        and all(isinstance(g, dict) and "params" in g for g in state_dict["param_groups"])
    )


def _unrecognised(state_dict: Any) -> str:
    if not _is_optimizer_state_dict(state_dict):
        got = sorted(map(str, state_dict))[:8] if isinstance(state_dict, dict) else type(state_dict).__name__
        return f"not an optimizer state dict (expected the keys 'state' and 'param_groups'; got {got})"
    keys = sorted({str(k) for st in _states(state_dict) for k in st})
    group_keys = sorted({str(k) for g in _groups(state_dict) for k in g} - {"params"})
    return (
        f"unrecognised optimizer state dict (per-parameter keys {keys}, group keys {group_keys}); "
        f"convert_state_dict reads galore-torch 1.0, fira 1.0.2 and torch.optim.Adam/AdamW dicts"
    )


def _target_groups(optimizer, groups: List[Dict]) -> List[Optional[Dict]]:
    if optimizer is None:
        return [None] * len(groups)
    if len(optimizer.param_groups) != len(groups):
        raise ValueError(f"the checkpoint has {len(groups)} param groups, the optimizer {len(optimizer.param_groups)}")
    for gi, (g, t) in enumerate(zip(groups, optimizer.param_groups)):
        if len(g["params"]) != len(t["params"]):
            raise ValueError(
                f"param group {gi}: the checkpoint has {len(g['params'])} parameters, the optimizer {len(t['params'])}"
            )
        if g.get("rank") != t.get("rank"):
            raise ValueError(
                f"param group {gi}: the checkpoint's rank is {g.get('rank')!r}, the optimizer's "
                f"{t.get('rank')!r}; the saved moments only fit the checkpoint's layout"
            )
    return list(optimizer.param_groups)


def _params_by_id(optimizer, groups: List[Dict]) -> Dict[Any, torch.Tensor]:
    if optimizer is None:
        return {}
    return {pid: p for g, t in zip(groups, optimizer.param_groups) for pid, p in zip(g["params"], t["params"])}


def _convert_group(group: Dict, gi: int, source: str, target: Optional[Dict]) -> Dict:
    where = f"param group {gi}"
    adafactor = "decay_rate" in group
    if any(k in group for k in _BNB_GROUP_KEYS):
        raise ValueError(
            f"{where}: bitsandbytes 8-bit states (galore-torch's GaLoreAdamW8bit) cannot be converted "
            "exactly; resume that run with galore-torch or restart the optimizer state"
        )
    if target is not None:
        out = {k: v for k, v in target.items() if k != "params"}
    else:
        out = defaults_for({"inner": "adafactor" if adafactor else "adam"})
        if adafactor:
            out["lr"] = None
    out.pop("rank", None)  # present only where the checkpoint has it: the state layout follows the checkpoint
    consumed = {"params", *_LOWRANK_KEYS, "scale", "alpha"}
    if source == "torch":
        consumed |= set(_TORCH_GROUP_KEYS)
        if group.get("amsgrad"):
            raise ValueError(f"{where}: amsgrad=True is not supported (its max_exp_avg_sq has no equivalent here)")
        if group.get("decoupled_weight_decay") is False and group.get("weight_decay", 0):
            raise ValueError(
                f"{where}: torch.optim.Adam's weight decay is an L2 term in the gradient, not decoupled "
                f"(weight_decay={group['weight_decay']!r}); only torch.optim.AdamW's converts"
            )
        out.update(inner="adam", residual="none", eps_style="torch", correct_bias=True)
    else:
        # the reference's raw SVD signs, so the continuation equals the reference's own
        out.update(
            inner="adafactor" if adafactor else "adam",
            subspace_change="keep",
            projector="svd",
            residual="fira" if source == "fira" else "none",
            basis_sign="none",
        )
        if not adafactor:  # HF AdamW's eps placement, through the bitwise multi-tensor path
            out.update(eps_style="galore", fused=False)
        if source == "fira":  # the released code's fixed limiter, no floor
            out.update(fira_gamma=1.01, fira_residual="reference", fira_floor=0.0)
    for key, value in group.items():
        if key not in consumed:
            out[key] = value
    if "rank" in group:
        for key in _LOWRANK_KEYS:
            if key not in group:
                raise ValueError(f"{where}: a low-rank group without {key!r}")
            out[key] = group[key]
        scale_key = "alpha" if source == "fira" else "scale"
        if scale_key not in group:
            raise ValueError(f"{where}: a {source} low-rank group without {scale_key!r}")
        out["scale"] = group[scale_key]
    out["params"] = list(group["params"])
    return out


def _convert_param_state(st: Dict, group: Dict, source: str, where: str, param: Optional[torch.Tensor]) -> Dict:
    if "state1" in st:
        raise ValueError(f"{where}: bitsandbytes 8-bit states cannot be converted exactly")
    if "max_exp_avg_sq" in st:
        raise ValueError(f"{where}: amsgrad states are not supported")
    step = _as_int(st.get("step", 0), where)
    out: Dict[str, Any] = {}
    proj = st.get("projector")
    low_shape = None
    if proj is not None:
        if not _is_projector_object(proj):
            raise ValueError(
                f"{where}: state['projector'] is a {type(proj).__name__}, not a galore-torch / fira "
                "projector (no ortho_matrix / proj_type)"
            )
        if "rank" not in group:
            raise ValueError(f"{where}: a projector in a param group without 'rank'")
        low_shape = _moment_shape(st)
        if proj.ortho_matrix is not None and low_shape is not None:
            out.update(_basis(proj, low_shape, group, where, param))
            gap = int(getattr(proj, "update_proj_gap", group["update_proj_gap"]))
            # galore-torch refreshes before the steps 0, gap, 2 gap, ... that have run: ceil(step / gap) bases
            out["proj_refreshes"] = max(1, (step + gap - 1) // gap)
    elif param is not None and _moment_shape(st) not in (None, tuple(param.shape)):
        raise ValueError(
            f"{where}: the saved moments have shape {_moment_shape(st)}, the optimizer's parameter {tuple(param.shape)}"
        )
    _copy_moments(st, out, group, where)
    if "scaling_grad" in st:
        norm = st["scaling_grad"]
        norm = norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))
        out["fira_prev_norm"] = norm.to(torch.float32).reshape(()).clone()
    if step or any(k in out for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_codes")):
        if proj is None and "decay_rate" not in group:  # dense Adam: torch.optim.AdamW's own state layout
            out["step"] = torch.tensor(float(step), dtype=torch.float32)
        else:
            out["step"] = step
            out["moment_step"] = step  # neither source ever resets its moments: bias correction runs with step
    return out


def _as_int(x: Any, where: str) -> int:
    value = float(x.item() if isinstance(x, torch.Tensor) else x)
    if value < 0 or value != int(value):
        raise ValueError(f"{where}: invalid step {x!r} (must be a whole number >= 0)")
    return int(value)


def _moment_shape(st: Dict) -> Optional[Tuple[int, ...]]:
    """The shape the inner rule saw: the projected gradient's for a low-rank parameter."""
    for key in ("exp_avg", "exp_avg_sq"):
        if isinstance(st.get(key), torch.Tensor):
            return tuple(st[key].shape)
    if isinstance(st.get("exp_avg_sq_row"), torch.Tensor) and isinstance(st.get("exp_avg_sq_col"), torch.Tensor):
        return tuple(st["exp_avg_sq_row"].shape) + tuple(st["exp_avg_sq_col"].shape[-1:])
    return None


def _basis(proj, low_shape: Tuple[int, ...], group: Dict, where: str, param: Optional[torch.Tensor]) -> Dict:
    """Our ``proj_left`` (m x r) / ``proj_right`` (n x r) from galore-torch's ``ortho_matrix``.

    galore-torch keeps U[:, :r] (m x r) for a left projection, Vh[:r] (r x n) for a right one and [U, Vh] for
    "full"; the weight's shape follows from the basis and the moments' (projected) shape."""
    ortho = proj.ortho_matrix
    if len(low_shape) != 2:
        raise ValueError(f"{where}: only 2-D weights convert (the moments have shape {low_shape})")
    if isinstance(ortho, (list, tuple)):
        left, right = (t.detach().float() for t in ortho)
        side, shape, new = "full", (left.shape[0], right.shape[1]), {"proj_left": left, "proj_right": right.t()}
    else:
        ortho = ortho.detach().float()
        if ortho.dim() != 2:
            raise ValueError(f"{where}: the projector's basis has shape {tuple(ortho.shape)}; only 2-D weights convert")
        if ortho.shape[0] <= ortho.shape[1] and low_shape[1] == ortho.shape[0]:
            side, shape, new = "right", (low_shape[0], ortho.shape[1]), {"proj_right": ortho.t()}
        elif ortho.shape[1] <= ortho.shape[0] and low_shape[0] == ortho.shape[1]:
            side, shape, new = "left", (ortho.shape[0], low_shape[1]), {"proj_left": ortho}
        else:
            raise ValueError(
                f"{where}: the projector's basis {tuple(ortho.shape)} does not fit the moments "
                f"{low_shape} on either side"
            )
    expected = side_for(shape, group["proj_type"])
    if expected != side:
        raise ValueError(
            f"{where}: the checkpoint projects the {side} side of a {shape} weight, but proj_type "
            f"{group['proj_type']!r} projects the {expected} side here"
        )
    if min(shape) <= group["rank"]:
        raise ValueError(
            f"{where}: the {shape} weight is not larger than rank {group['rank']} on both sides; "
            "this package trains such weights densely, so its low-rank moments cannot be loaded"
        )
    if param is not None and matrix_shape(param) != shape:
        raise ValueError(
            f"{where}: the checkpoint's weight has shape {shape}, the optimizer's parameter {tuple(param.shape)}"
        )
    return {k: v.contiguous().clone() for k, v in new.items()}


def _copy_moments(st: Dict, out: Dict, group: Dict, where: str) -> None:
    """Moments into the storage the group asks for (``state_dtype``, or 8-bit codes), as the engine creates them;
    Adafactor's factored row / column statistics stay fp32 as the engine keeps them."""
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        value = st.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: state[{key!r}] is a {type(value).__name__}, not a tensor")
        value = value.detach()
        if group["state_bits"] == 8 and quant.use_8bit(value.numel(), group["min_8bit_size"]):
            out[key + "_codes"], out[key + "_absmax"] = quant.quantize_blockwise(value.float(), signed=signed)
        else:
            out[key] = value.to(DTYPES[group["state_dtype"]], copy=True)
    for key in ("exp_avg_sq_row", "exp_avg_sq_col"):
        if isinstance(st.get(key), torch.Tensor):
            out[key] = st[key].detach().float().clone()


__all__ = ["SOURCES", "detect_source", "foreign_state_message", "convert_state_dict"]
