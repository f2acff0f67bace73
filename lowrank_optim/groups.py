"""Param groups from a model: low-rank for the targeted Linear / conv weights, dense for everything else."""

from __future__ import annotations

import re
import warnings
from typing import Dict, List, Optional, Sequence, Union

from torch import nn

TARGETABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Embedding)


_REGEX_CHARS = set("^$*+?[](){}|\\")


def _matches(name: str, target) -> bool:
    """A target is a compiled regex, a pattern (``re:PATTERN`` or any string with regex syntax), or a substring."""
    if isinstance(target, re.Pattern):
        return target.search(name) is not None
    if target.startswith("re:"):
        return re.search(target[3:], name) is not None
    if _REGEX_CHARS & set(target):
        return re.search(target, name) is not None
    return target in name


def _is_lm_head(name: str, module: nn.Module, model: nn.Module) -> bool:
    out = getattr(model, "get_output_embeddings", None)
    head = out() if callable(out) else None
    return module is head or name.split(".")[-1] in ("lm_head", "output", "classifier")


def target_weights(
    model: nn.Module, target_modules: Union[str, Sequence[str]] = ("attn", "mlp")
) -> Dict[str, nn.Parameter]:
    """Names -> weights of the Linear/conv modules whose module name matches a target (substring, ``re:regex``,
    or ``"all-linear"`` for every Linear except the LM head; the head is taken only when named explicitly)."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, TARGETABLE) or getattr(module, "weight", None) is None:
            continue
        if "all-linear" in targets and isinstance(module, nn.Linear) and not _is_lm_head(name, module, model):
            chosen[name + ".weight"] = module.weight
        elif any(_matches(name, t) for t in targets if t != "all-linear"):
            chosen[name + ".weight"] = module.weight
    return chosen


def _no_decay_ids(model: nn.Module) -> set:
    ids = set()
    for module in model.modules():
        norm_like = isinstance(module, NO_DECAY_TYPES) or "norm" in type(module).__name__.lower()
        for pname, p in module.named_parameters(recurse=False):
            if norm_like or pname == "bias" or p.dim() < 2:
                ids.add(id(p))
    return ids


def lowrank_param_groups(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]] = ("attn", "mlp"),
    rank: Optional[int] = None,
    update_proj_gap: Optional[int] = None,
    scale: Optional[float] = None,
    proj_type: Optional[str] = None,
    no_decay_norms_and_biases: bool = False,
    weight_decay: float = None,
    **group_options,
) -> List[Dict]:
    """Param groups: one low-rank group for the targeted weights, dense groups for the rest.

    Only the options given here go into the low-rank group, so each optimizer's own defaults (GaLore's gap 200 and
    scale 0.25, DCT-AdamW's gap 1 and scale 1) apply to the rest. ``rank=None`` sizes the rank from the model:
    a quarter of the targeted weights' smallest side (GaLore's d/4: 128 on LLaMA-60M, 16 on a 64-wide model).
    With ``no_decay_norms_and_biases`` the dense norms/biases get weight_decay 0."""
    chosen = target_weights(model, target_modules)
    if not chosen:
        raise ValueError(
            f"target_modules {list(target_modules) if not isinstance(target_modules, str) else target_modules!r} "
            f"matched no nn.Linear / conv module of the model"
        )
    if rank is None:
        rank = max(1, min(min(p.shape[0], p.numel() // max(p.shape[0], 1)) for p in chosen.values()) // 4)
    lowrank_ids = {id(p) for p in chosen.values()}
    no_decay = _no_decay_ids(model) if no_decay_norms_and_biases else set()
    given = dict(update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
    lowrank = {
        "params": list(chosen.values()),
        "rank": rank,
        **{k: v for k, v in given.items() if v is not None},
        **group_options,
    }
    small = [n for n, p in chosen.items() if min(p.shape[0], p.numel() // max(p.shape[0], 1)) <= rank]
    if len(small) == len(chosen):
        warnings.warn(
            f"rank {rank} is at least the smaller side of every targeted weight: nothing will be trained "
            f"low-rank (all {len(chosen)} weights take plain AdamW); pass a smaller rank",
            stacklevel=2,
        )
    dense, dense_no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in lowrank_ids or id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (dense_no_decay if id(p) in no_decay else dense).append(p)
    groups = [lowrank]
    if weight_decay is not None:
        lowrank["weight_decay"] = weight_decay
    if dense:
        groups.append({"params": dense} if weight_decay is None else {"params": dense, "weight_decay": weight_decay})
    if dense_no_decay:
        groups.append({"params": dense_no_decay, "weight_decay": 0.0})
    return groups


def lowrank_parameter_names(model: nn.Module, target_modules: Union[str, Sequence[str]] = ("attn", "mlp")) -> List[str]:
    return list(target_weights(model, target_modules))


__all__ = ["lowrank_param_groups", "target_weights", "lowrank_parameter_names"]
