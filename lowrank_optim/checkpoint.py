"""Loading an optimizer state dict: checked against the optimizer before anything changes, dtypes kept.

torch's ``Optimizer.load_state_dict`` casts floating state to each parameter's dtype; here fp32 moments of bf16
weights, 8-bit codes and int64 indices come back exactly as saved (only the device follows the parameter). A sharded
parameter's state comes back sharded like it (see ``sharding.py``), also from a full state dict. Group
keys missing from an older or foreign dict come from the optimizer's defaults; a saved entry whose shape does not
fit its parameter is refused with the parameter and the key named."""

from __future__ import annotations

import warnings
from typing import Any, Dict

import torch

from . import sharding
from .options import OptionError

_METHOD_KEYS = ("projector", "inner", "residual", "route")


def _foreign(state_dict: Dict) -> None:
    try:
        from .convert import foreign_state_message
    except ImportError:  # pragma: no cover - convert is part of the package
        return
    message = foreign_state_message(state_dict)
    if message:
        raise ValueError(message)


def check_and_load(opt, state_dict: Dict[str, Any]) -> None:
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state dict (expected the keys 'state' and 'param_groups')")
    _foreign(state_dict)
    groups, saved_groups = opt.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(groups)}")
    for i, (g, sg) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(
                f"param group {i}: the loaded state dict has {len(sg['params'])} parameters, the "
                f"optimizer's group has {len(g['params'])}"
            )
    id_map = {pid: p for g, sg in zip(groups, saved_groups) for pid, p in zip(sg["params"], g["params"])}
    new_groups = []
    for i, (g, sg) in enumerate(zip(groups, saved_groups)):
        ng = {k: v for k, v in opt.defaults.items()}
        ng.update({k: v for k, v in sg.items() if k != "params"})
        ng["params"] = g["params"]
        if "param_names" in g and "param_names" not in ng:
            ng["param_names"] = g["param_names"]
        changed = [k for k in _METHOD_KEYS if k in sg and sg[k] != g.get(k)]
        if changed:
            warnings.warn(
                f"param group {i}: the loaded state dict selects other parts ("
                + ", ".join(f"{k}={sg[k]!r} instead of {g.get(k)!r}" for k in changed)
                + "): the loaded settings are used",
                stacklevel=2,
            )
        opt._validate_group(ng, i)
        new_groups.append(ng)
    state = {}
    for pid, saved in state_dict["state"].items():
        if pid not in id_map:
            continue
        p = id_map[pid]
        gi = next(i for i, sg in enumerate(saved_groups) if pid in sg["params"])
        _check_entry(opt, new_groups[gi], gi, p, saved)
        where = f"param group {gi}, parameter of shape {tuple(p.shape)}"
        state[p] = {k: _placed(v, p, where, k) for k, v in saved.items()}
    opt.state.clear()
    opt.state.update(state)
    for g, ng in zip(opt.param_groups, new_groups):
        g.clear()
        g.update(ng)


def _placed(v, p: torch.Tensor, where: str, key: str):
    """A saved value as the optimizer keeps it for ``p``: a tensor copied to p's device, its dtype kept. For a sharded
    ``p`` (FSDP2) every tensor with a dim is a ``Shard(0)`` DTensor of the single-process tensor: a loaded one as it
    is (``torch.distributed.checkpoint`` resharded it), a whole one (a full state dict loaded by every rank) cut to
    this rank's rows. 0-dim tensors and numbers stay plain."""
    if not isinstance(v, torch.Tensor):
        return v
    if not sharding.is_sharded(p):
        if sharding.is_sharded(v):
            raise ValueError(
                f"{where}: saved {key} is a DTensor with placements {tuple(v.placements)}, the parameter is a plain "
                "tensor; load a full state dict (StateDictOptions(full_state_dict=True)) into a single process"
            )
        return v.to(device=p.device, copy=True)
    if sharding.is_sharded(v):
        placements, mesh = tuple(v.placements), v.device_mesh
        if placements != tuple(p.placements) or mesh != p.device_mesh:
            raise ValueError(
                f"{where}: saved {key} is a DTensor with placements {placements} on {mesh}, the parameter's are "
                f"{tuple(p.placements)} on {p.device_mesh}: load it through "
                "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict, which reshards it"
            )
        return v.to(device=p.device, copy=True)
    if v.dim() == 0:
        return v.to(device=p.device, copy=True)
    spread = sharding.Spread(p)
    return spread.wrap(spread.mine(v).to(device=p.device, copy=True), v.shape[0])


def _check_entry(opt, group: Dict, gi: int, p: torch.Tensor, saved: Dict) -> None:
    """Shapes of the saved moments and basis against what this parameter's group would create."""
    from .parts import is_lowrank
    from .shapes import matrix_shape

    where = f"param group {gi}, parameter of shape {tuple(p.shape)}"
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: saved state is a {type(saved).__name__}, expected a dict")
    lowrank = is_lowrank(group, p)
    expected = tuple(p.shape)
    if lowrank and group.get("route") == "lowrank":
        proj = opt.projector_for(group, p)
        if getattr(proj, "any_shape", False):
            expected = None  # a block's moments are the whole parameter or nothing
        else:
            expected = tuple(proj.low_rank_shape())
        m, n = matrix_shape(p)
        for key, size in (("proj_left", m), ("proj_right", n)):
            v = saved.get(key)
            if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] != size:
                raise OptionError(f"{where}: saved {key} has {v.shape[0]} rows, the matrix side has {size}")
    elif lowrank:
        expected = None  # the spectral route keeps its own prefixed sets
    for key in ("exp_avg", "exp_avg_sq"):
        v = saved.get(key)
        if isinstance(v, torch.Tensor) and expected is not None and tuple(v.shape) != expected:
            raise OptionError(
                f"{where}: saved {key} has shape {tuple(v.shape)}, this group's settings make it {expected}"
            )


__all__ = ["check_and_load"]
