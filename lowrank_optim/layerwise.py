"""Layer-wise updates: each parameter is updated inside backward, as soon as its gradient is complete, and its
gradient is freed right away, so the model's full set of gradients never exists at once.

    opt = GaLoreAdamW(groups, lr=1e-2)
    lw = LayerwiseOptimizer(opt, accumulation_steps=4)
    for i, batch in enumerate(loader):
        (loss_fn(model, batch) / 4).backward()       # every 4th backward updates the weights and frees grads
        if lw.boundary: scheduler.step()            # LR schedulers work on ``opt`` unchanged

What cannot be done layer-wise, by construction: global-norm gradient clipping (no moment sees every gradient;
``clip_grad_norm`` clips each parameter's gradient to that norm instead), the optimizer-wide all-or-nothing policy
for non-finite gradients (a non-finite gradient skips, or with ``nonfinite="raise"`` stops at, that parameter only:
parameters already updated in the same backward stay updated), and ``GradScaler`` (it unscales after backward).
With accumulation the gradients of the micro-batches still accumulate in ``.grad`` until the last one.

Under FSDP2 (``fully_shard``) see ``LayerwiseOptimizer``: the hooks fire on the sharded parameters after each
reduce-scatter, so each rank updates its rows inside backward.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch

from . import sharding
from .optimizer import LowRankOptimizer

# FSDP2 sets a sharded parameter's gradient outside autograd (after its reduce-scatter) and runs the parameter's
# post-accumulate-grad hooks itself from torch 2.5 on; before that they never fire on sharded parameters.
FSDP2_HOOKS_SINCE = (2, 5)


class LayerwiseOptimizer:
    """Steps each parameter of ``optimizer`` from its post-accumulate-grad hook (see the module docstring).

    FSDP2 (``fully_shard``; torch >= 2.5): FSDP runs the hooks of the sharded (DTensor ``Shard(0)``) parameters
    after each reduce-scatter, with this rank's rows of the averaged gradient in ``.grad``, module after module
    and parameter after parameter in the same order on every rank; each hook's step then issues the optimizer's
    collectives (non-finite flag, left projections, directions, basis gathers, refreshes) in that same order
    everywhere, so training equals a single process's (with or without ``reshard_after_forward``).
    ``clip_grad_norm`` clips by the norm of the whole gradient. The hooks fire only on backwards where FSDP
    reduce-scatters, and ``accumulation_steps`` counts those: accumulate either with FSDP reducing every
    micro-batch and ``accumulation_steps=k``, or with ``set_requires_gradient_sync(False)`` on all but the last
    micro-batch and ``accumulation_steps=1`` (cheaper: one reduce-scatter per window; ``boundary`` is then true
    after every backward, so step schedulers on the window you set). Skipping the reduce-scatter with
    ``accumulation_steps > 1`` would step after k reduced backwards, not k micro-batches. Keep FSDP's default
    ``reshard_after_backward=True`` on the backward that updates: kept unsharded weights would not see the update
    (as with ``optimizer.step()``). On torch < 2.5, FSDP never runs these hooks: constructing this over DTensor
    parameters raises instead of never updating them.
    """

    def __init__(
        self, optimizer: LowRankOptimizer, accumulation_steps: int = 1, clip_grad_norm: Optional[float] = None
    ):
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(f"LayerwiseOptimizer wraps a lowrank_optim optimizer (got {type(optimizer).__name__})")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        _check_hooks_fire(optimizer)
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.clip_grad_norm = clip_grad_norm
        self.micro_steps = 0  # backward passes seen (counted on the first hook of each backward)
        self._seen: Dict[torch.Tensor, int] = {}
        self._index = {}
        self._handles: List = []
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    self._index[p] = gi
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    @property
    def boundary(self) -> bool:
        """True right after the backward that completed an accumulation window (weights were updated)."""
        return self.micro_steps > 0 and self.micro_steps % self.accumulation_steps == 0

    def _hook(self, p: torch.Tensor) -> None:
        count = self._seen.get(p, 0) + 1
        self._seen[p] = count
        self.micro_steps = max(self.micro_steps, count)
        if count % self.accumulation_steps:
            return
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p], self.clip_grad_norm)
        # the optimizer's public per-parameter step: LR schedulers see a step, step hooks run, nothing else moves
        self.optimizer.step(params=[p])
        p.grad = None  # free it now: this is the memory layer-wise training saves

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "micro_steps": self.micro_steps,
            "accumulation_steps": self.accumulation_steps,
        }

    def load_state_dict(self, state: Dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro_steps = int(state["micro_steps"])
        self._seen = {p: self.micro_steps for p in self._index}

    def remove(self) -> None:
        """Detach the hooks (back to ordinary ``optimizer.step()`` training)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _check_hooks_fire(optimizer: LowRankOptimizer) -> None:
    """Refuse sharded parameters where FSDP2 would never run their hooks (they would silently never update)."""
    version = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    if version >= FSDP2_HOOKS_SINCE:
        return
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if sharding.is_sharded(p):
                raise RuntimeError(
                    f"LayerwiseOptimizer: param group {gi} holds a DTensor parameter of shape {tuple(p.shape)} "
                    f"(FSDP2 fully_shard), and FSDP2 in torch {torch.__version__} does not run post-accumulate-grad "
                    "hooks on sharded parameters (it sets their gradients outside autograd; torch >= "
                    f"{'.'.join(map(str, FSDP2_HOOKS_SINCE))} does), so no update would ever happen: use torch >= "
                    "2.5 or call optimizer.step() after backward"
                )


__all__ = ["LayerwiseOptimizer"]
