"""Inner optimizers: the stateful update applied to the (projected) gradient.

Each rule keeps its moments in the per-parameter state dict under its own keys and returns a ``Direction``:
the update is ``W -= step_size * project_back(direction)`` and decoupled decay uses ``decay_lr``.
Moments are fp32 by default (``state_dtype``) or 8-bit blockwise (``state_bits=8``, see ``quant.py``).
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional

import torch

from . import quant

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Direction(NamedTuple):
    direction: torch.Tensor  # fp32, the shape of the gradient it was computed from
    step_size: float  # multiplies the projected-back direction
    decay_lr: float  # learning rate used for decoupled weight decay
    bias_factor: float  # Adam's sqrt(1 - b2^t) / (1 - b1^t); 1 for rules without it
    col_norms: Optional[torch.Tensor] = None  # norms of ``direction`` along a requested dim (Fira), if fused


class Moment:
    """One moment tensor stored either plainly (fp32/bf16/fp16) or as 8-bit codes + per-block absmax."""

    @staticmethod
    def create(state: Dict, key: str, like: torch.Tensor, group: Dict, signed: bool):
        if group["state_bits"] == 8 and quant.use_8bit(like.numel(), group["min_8bit_size"]):
            state[key + "_codes"], state[key + "_absmax"] = quant.quantize_blockwise(
                torch.zeros_like(like, dtype=torch.float32), signed=signed)
        else:
            state[key] = torch.zeros_like(like, dtype=DTYPES[group["state_dtype"]])

    @staticmethod
    def expected_bytes(numel: int, group: Dict) -> int:
        if group["state_bits"] == 8 and quant.use_8bit(numel, group["min_8bit_size"]):
            return numel + quant.num_blocks(numel) * 4  # uint8 codes + fp32 absmax per block
        return numel * torch.empty((), dtype=DTYPES[group["state_dtype"]]).element_size()

    @staticmethod
    def is_quantized(state: Dict, key: str) -> bool:
        return key + "_codes" in state

    @staticmethod
    def load(state: Dict, key: str, signed: bool) -> torch.Tensor:
        if Moment.is_quantized(state, key):
            return quant.dequantize_blockwise(state[key + "_codes"], state[key + "_absmax"], signed=signed)
        return state[key].float()

    @staticmethod
    def store(state: Dict, key: str, value: torch.Tensor, signed: bool) -> None:
        if Moment.is_quantized(state, key):
            codes, absmax = quant.quantize_blockwise(value, signed=signed)
            state[key + "_codes"].copy_(codes)
            state[key + "_absmax"].copy_(absmax)
        elif state[key] is not value:  # an fp32 moment loaded and updated in place needs no copy
            state[key].copy_(value)

    @staticmethod
    def delete(state: Dict, key: str) -> None:
        for k in (key, key + "_codes", key + "_absmax"):
            state.pop(k, None)

    @staticmethod
    def exists(state: Dict, key: str) -> bool:
        return key in state or key + "_codes" in state


class _MomentRule:
    keys: tuple = ()

    def reset(self, state: Dict) -> None:
        """Drop the moments (freed) and the bias-correction count: the rule restarts at the next update."""
        for key in self.keys:
            Moment.delete(state, key)
        state.pop("moment_step", None)


class Adam(_MomentRule):
    """Adam moments. ``eps_style="galore"`` adds eps to sqrt(v) before bias correction (galore-torch / HF AdamW);
    ``"torch"`` matches ``torch.optim.AdamW`` exactly (eps added after correcting v)."""

    name = "adam"
    keys = ("exp_avg", "exp_avg_sq")

    def init(self, state: Dict, like: torch.Tensor, group: Dict) -> None:
        Moment.create(state, "exp_avg", like, group, signed=True)
        Moment.create(state, "exp_avg_sq", like, group, signed=False)
        state["moment_step"] = 0

    def expected_bytes(self, shape, group: Dict) -> int:
        numel = math.prod(shape)
        return 2 * Moment.expected_bytes(numel, group)

    def update(self, state: Dict, grad: torch.Tensor, group: Dict, param: torch.Tensor, eps_style: str,
               col_norm_dim: Optional[int] = None) -> Direction:
        if not Moment.exists(state, "exp_avg"):
            self.init(state, grad, group)
        beta1, beta2 = group["betas"]
        state["moment_step"] += 1
        t = state["moment_step"]
        bc1, bc2 = (1 - beta1 ** t, 1 - beta2 ** t) if group["correct_bias"] else (1.0, 1.0)
        eps = group["eps"] * (math.sqrt(bc2) if eps_style == "torch" else 1.0)
        col_norms = None
        if Moment.is_quantized(state, "exp_avg"):
            out = quant.adam8bit_step(grad, state["exp_avg_codes"], state["exp_avg_absmax"],
                                      state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"],
                                      beta1, beta2, eps, col_norm_dim=col_norm_dim)
            direction, col_norms = out if col_norm_dim is not None else (out, None)
        else:  # fp32 moments update in place; bf16/fp16 ones in an fp32 copy, stored rounded
            m = Moment.load(state, "exp_avg", True).mul_(beta1).add_(grad, alpha=1 - beta1)
            v = Moment.load(state, "exp_avg_sq", False).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            Moment.store(state, "exp_avg", m, True)
            Moment.store(state, "exp_avg_sq", v, False)
            denom = v.sqrt().add_(eps)
            direction = torch.div(m, denom, out=denom)  # reuse the buffer: one allocation per step
        factor = math.sqrt(bc2) / bc1
        return Direction(direction, group["lr"] * factor, group["lr"], factor, col_norms)

    def rotate(self, state: Dict, rot: Dict[str, torch.Tensor]) -> None:
        """Carry moments into a new subspace: m <- R_l m R_r^T, v <- (R_l^2) v (R_r^2)^T (keeps v >= 0)."""
        if not Moment.exists(state, "exp_avg"):
            return
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            signed = key == "exp_avg"
            x = Moment.load(state, key, signed)
            if "left" in rot:
                x = (rot["left"] ** power).matmul(x)
            if "right" in rot:
                x = x.matmul((rot["right"] ** power).t())
            Moment.store(state, key, x, signed)


class Adafactor(_MomentRule):
    """Adafactor (Shazeer & Stern) as in HF / galore-torch: factored second moment, relative step, RMS clipping."""

    name = "adafactor"
    keys = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")

    def init(self, state: Dict, like: torch.Tensor, group: Dict) -> None:
        if group["beta1"] is not None:
            Moment.create(state, "exp_avg", like, group, signed=True)
        if like.dim() >= 2:  # factored: row and column statistics are tiny, kept in fp32
            state["exp_avg_sq_row"] = torch.zeros(like.shape[:-1], dtype=torch.float32, device=like.device)
            state["exp_avg_sq_col"] = torch.zeros(like.shape[:-2] + like.shape[-1:], dtype=torch.float32,
                                                  device=like.device)
        else:
            Moment.create(state, "exp_avg_sq", like, group, signed=False)

    def expected_bytes(self, shape, group: Dict) -> int:
        numel = math.prod(shape)
        total = Moment.expected_bytes(numel, group) if group["beta1"] is not None else 0
        if len(shape) >= 2:
            return total + 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
        return total + Moment.expected_bytes(numel, group)

    @staticmethod
    def _rms(x: torch.Tensor) -> torch.Tensor:
        return x.norm(2) / (x.numel() ** 0.5)

    def _lr(self, group: Dict, step: int, param_rms: float) -> float:
        lr = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr = max(group["eps"][1], param_rms) * lr
        return lr

    def update(self, state: Dict, grad: torch.Tensor, group: Dict, param: torch.Tensor, eps_style: str,
               col_norm_dim: Optional[int] = None) -> Direction:
        if not ("exp_avg_sq_row" in state or Moment.exists(state, "exp_avg_sq")):
            self.init(state, grad, group)
        state["moment_step"] = state.get("moment_step", 0) + 1
        t = state["moment_step"]
        # The relative step needs the parameter's RMS as a number: one host sync, as in every Adafactor.
        param_rms = float(self._rms(param.float())) if group["scale_parameter"] else 0.0
        lr = self._lr(group, t, param_rms)
        beta2t = 1.0 - math.pow(t, group["decay_rate"])
        update = grad * grad + group["eps"][0]
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = (r_factor * c_factor).mul_(grad)
        else:
            v = Moment.load(state, "exp_avg_sq", signed=False).mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            Moment.store(state, "exp_avg_sq", v, signed=False)
            update = v.rsqrt().mul_(grad)
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["beta1"] is not None:
            m = Moment.load(state, "exp_avg", signed=True).mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            Moment.store(state, "exp_avg", m, signed=True)
            update = m
        col_norms = update.norm(dim=col_norm_dim) if col_norm_dim is not None else None
        return Direction(update, 1.0, lr, 1.0, col_norms)

    def rotate(self, state: Dict, rot: Dict[str, torch.Tensor]) -> None:
        # Factored statistics have no meaningful rotation: start them afresh, keep the step count.
        step = state.get("moment_step", 0)
        self.reset(state)
        state["moment_step"] = step


INNER_RULES = {"adam": Adam(), "adafactor": Adafactor()}
