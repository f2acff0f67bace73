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
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .optimizer import LowRankOptimizer


class LayerwiseOptimizer:
    def __init__(
        self, optimizer: LowRankOptimizer, accumulation_steps: int = 1, clip_grad_norm: Optional[float] = None
    ):
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(f"LayerwiseOptimizer wraps a lowrank_optim optimizer (got {type(optimizer).__name__})")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
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


__all__ = ["LayerwiseOptimizer"]
