"""Optimizer-state memory before training: ``estimate_state_bytes`` builds the optimizer on the model's parameters
(a meta-device model works: nothing is allocated, no step is run) and sums each part's state layout (shapes and
element sizes, ``state_layout.py``) — the inner rule's moments (fp32 / bf16 / 8-bit codes + absmax), the
projector's basis or indices, the residual rule's scalars. ``optimizer.state_bytes()`` measures the real state;
the two agree exactly (tested), also per rank of a model sharded with FSDP2 (``world_size``, ``process_rank``).

Not counted by either: the DCT basis cache (one d x d matrix per distinct size and device, shared by every
weight) and per-step temporaries (the fp32 gradient copy, the projected gradient)."""

from __future__ import annotations

import inspect
from typing import Sequence, Type, Union

import torch
from torch import nn

from .groups import lowrank_param_groups
from .registry import method
from .state_layout import check_world

_GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "no_decay_norms_and_biases")


def optimizer_class(name: Union[str, Type[torch.optim.Optimizer]]) -> Type[torch.optim.Optimizer]:
    """The class of a registry name or alias (``lowrank_optim.registry``), or ``name`` itself if it is a class."""
    if not isinstance(name, str):
        return name
    return method(name).optimizer_class


def build(model: nn.Module, optimizer="galore", target_modules: Sequence[str] = ("attn", "mlp"), **kwargs):
    """The optimizer ``estimate_state_bytes`` measures: low-rank group for ``target_modules`` (except for
    ``adamw``), every other keyword as an optimizer default (so ``state_bits=8`` also covers dense groups)."""
    cls = optimizer_class(optimizer)
    group_kw = {k: kwargs.pop(k) for k in _GROUP_KEYS if k in kwargs}
    if isinstance(optimizer, str) and method(optimizer).name == "adamw":
        return cls(model.parameters(), **kwargs)
    accepted = inspect.signature(lowrank_param_groups).parameters
    groups = lowrank_param_groups(model, target_modules, **{k: v for k, v in group_kw.items() if k in accepted})
    return cls(groups, **kwargs)


def estimate_state_bytes(
    model: nn.Module,
    optimizer="galore",
    target_modules: Sequence[str] = ("attn", "mlp"),
    world_size: int = 1,
    process_rank: int = 0,
    **kwargs,
) -> int:
    """Bytes of optimizer state once every parameter has taken a step. ``kwargs``: rank, update_proj_gap, scale,
    proj_type and any option of the chosen optimizer (projector, state_bits, state_dtype, density, ...).

    ``world_size`` > 1: the bytes process ``process_rank`` holds when every parameter is sharded ``Shard(0)`` over
    ``world_size`` ranks (FSDP2 ``fully_shard``; ``rank`` stays the subspace rank). ``model``: the unsharded model
    (or a sharded one: shapes are global either way)."""
    import warnings

    check_world(world_size, process_rank, "process_rank")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trained densely" notes are for training, not for estimates
        return build(model, optimizer, target_modules, **kwargs).expected_state_bytes(world_size, process_rank)


__all__ = ["estimate_state_bytes", "build", "optimizer_class"]
