"""Inner rules: the stateful update applied to the (projected) gradient, as functions over lists of tensors.

A rule keeps its moments in each parameter's state dict under its own keys and returns, per parameter, a
``Direction``: the update is ``W -= step * project_back(direction)`` and decoupled decay uses ``decay_lr``.
Moments are fp32 by default (``state_dtype``) or 8-bit blockwise (``state_bits=8``, see ``quant.py``).

Every rule takes ``keep``, a 0-dim fp32 tensor on the device (1 = apply the step, 0 = the step was found non-finite):
with ``keep = 0`` every moment and counter stays bit-for-bit as it was, without the host ever reading the flag;
``keep=None`` when the host has already checked the step (no gating work at all).
"""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from . import quant
from .options import Option, boolean, choice, number, pair
from .state_layout import StateTensor, state_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class Direction(NamedTuple):
    direction: torch.Tensor  # compute dtype, the shape of the gradient it was computed from
    step: torch.Tensor  # 0-dim fp32: multiplies the projected-back direction (lr x bias correction)
    decay_lr: object  # learning rate used for decoupled weight decay (float or 0-dim tensor)
    bias_factor: torch.Tensor  # 0-dim fp32: Adam's sqrt(1 - b2^t) / (1 - b1^t); 1 for rules without it
    col_norms: Optional[torch.Tensor] = None  # norms of ``direction`` along a requested dim (Fira), if fused
    scratch: bool = False  # ``direction`` is this step's own memory: its consumer may overwrite it


def where_keep(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` where the step is kept, 0 where it is skipped (NaN included): a skipped step adds exactly nothing."""
    return torch.where(keep.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def gated(keep: torch.Tensor, factor: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A multiplier that is ``factor`` when the step is kept and exactly 1 when it is skipped (on the device, in
    the dtype it multiplies, so it rounds as the Python number would)."""
    return torch.where(
        keep.bool(),
        torch.tensor(factor, dtype=dtype, device=keep.device),
        torch.ones((), dtype=dtype, device=keep.device),
    )


class Moment:
    """One moment tensor stored either plainly (fp32/bf16/fp16/fp64) or as 8-bit codes + per-block absmax."""

    @staticmethod
    def create(state: Dict, key: str, like: torch.Tensor, group: Dict, signed: bool):
        if group["state_bits"] == 8 and quant.use_8bit(like.numel(), group["min_8bit_size"]):
            state[key + "_codes"], state[key + "_absmax"] = quant.quantize_blockwise(
                torch.zeros_like(like, dtype=torch.float32), signed=signed
            )
        else:
            state[key] = torch.zeros_like(like, dtype=moment_dtype(group, like))

    @staticmethod
    def layout(shape, group: Dict, compute: torch.dtype = torch.float32) -> List[StateTensor]:
        """What ``create`` stores for a moment of ``shape`` (see ``state_layout.py``)."""
        numel = math.prod(shape)
        if group["state_bits"] == 8 and quant.use_8bit(numel, group["min_8bit_size"]):
            # uint8 codes shaped like the moment + fp32 absmax per block of the flattened moment
            return [state_tensor(shape, torch.uint8), state_tensor((quant.num_blocks(numel),), torch.float32)]
        dtype = torch.float64 if compute == torch.float64 else DTYPES[group["state_dtype"]]
        return [state_tensor(shape, dtype)]

    @staticmethod
    def is_quantized(state: Dict, key: str) -> bool:
        return key + "_codes" in state

    @staticmethod
    def load(state: Dict, key: str, signed: bool, compute: torch.dtype = torch.float32) -> torch.Tensor:
        if Moment.is_quantized(state, key):
            return quant.dequantize_blockwise(state[key + "_codes"], state[key + "_absmax"], signed=signed)
        x = state[key]
        return x if x.dtype == compute else x.to(compute)

    @staticmethod
    def store(state: Dict, key: str, value: torch.Tensor, signed: bool) -> None:
        if Moment.is_quantized(state, key):
            codes, absmax = quant.quantize_blockwise(value, signed=signed)
            state[key + "_codes"].copy_(codes)
            state[key + "_absmax"].copy_(absmax)
        elif state[key] is not value:  # a moment loaded and updated in place needs no copy
            state[key].copy_(value)

    @staticmethod
    def delete(state: Dict, key: str) -> None:
        for k in (key, key + "_codes", key + "_absmax"):
            state.pop(k, None)

    @staticmethod
    def exists(state: Dict, key: str) -> bool:
        return key in state or key + "_codes" in state

    @staticmethod
    def shape(state: Dict, key: str):
        t = state.get(key, state.get(key + "_codes"))
        return None if t is None else tuple(t.shape)


def moment_dtype(group: Dict, like: torch.Tensor) -> torch.dtype:
    """fp64 parameters keep fp64 moments; otherwise ``state_dtype`` (fp32 by default, whatever the param dtype)."""
    return torch.float64 if like.dtype == torch.float64 else DTYPES[group["state_dtype"]]


def _step_counter(state: Dict, key: str, device) -> torch.Tensor:
    """Bias-correction count as a 0-dim fp32 tensor on the device (so a skipped step can leave it unchanged
    without a host sync); older checkpoints stored a Python int."""
    t = state.get(key)
    if not isinstance(t, torch.Tensor):
        t = state[key] = torch.tensor(float(t or 0), dtype=torch.float32, device=device)
    return t


def bias_steps(ts: Sequence[torch.Tensor], lr, beta1: float, beta2: float, correct_bias: bool):
    """(lr * sqrt(1 - b2^t) / (1 - b1^t), sqrt(1 - b2^t), bias factor) per counter, in fp64 on the device with the
    operations in the order Python would do them, so the fp32-rounded step equals the scalar one bit for bit."""
    if not correct_bias:
        ones = [torch.ones((), dtype=torch.float64, device=t.device) for t in ts]
        lrs = [_as64(lr, t.device) for t in ts]
        return lrs, ones, ones
    t64 = [t.double() for t in ts]
    bc1 = torch._foreach_add(torch._foreach_neg(torch._foreach_pow(beta1, t64)), 1.0)
    bc2_sqrt = torch._foreach_sqrt(torch._foreach_add(torch._foreach_neg(torch._foreach_pow(beta2, t64)), 1.0))
    lrs = [_as64(lr, t.device) for t in ts]
    steps = torch._foreach_div(torch._foreach_mul(lrs, bc2_sqrt), bc1)
    factors = torch._foreach_div(bc2_sqrt, bc1)
    return steps, bc2_sqrt, factors


def _as64(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float64)
    return torch.tensor(float(x), dtype=torch.float64, device=device)


def _fusable_moments(state: Dict, grad: torch.Tensor, group: Dict, eps_style: str, known: bool) -> bool:
    """Whether torch's fused AdamW kernel can compute this moment update and direction (``_fused_directions``):
    plain moments of the gradient's dtype on CPU / CUDA, bias correction on, and, for galore-style eps (which the
    kernel places after the correction), a step count the host may read (a host-checked, uncompiled step)."""
    if group.get("fused") is False or not group["correct_bias"] or grad.device.type not in ("cpu", "cuda"):
        return False
    if grad.dtype not in (torch.float32, torch.float64) or state["exp_avg"].dtype != grad.dtype:
        return False
    return eps_style == "torch" or (known and not torch.compiler.is_compiling())


def _zeros_like_all(grads: List[torch.Tensor], workspace: Optional[Dict]) -> List[torch.Tensor]:
    """Zeros shaped like each of ``grads`` (one device and dtype): views of one buffer kept in ``workspace`` and
    reused by the next call (memory already paged in), or fresh tensors without a workspace."""
    if workspace is None or not all(g.is_contiguous() for g in grads):
        return [torch.zeros_like(g) for g in grads]
    need, key = sum(g.numel() for g in grads), (grads[0].device, grads[0].dtype)
    buf = workspace.get(key)
    if buf is None or buf.numel() < need:
        buf = workspace[key] = torch.empty(need, dtype=grads[0].dtype, device=grads[0].device)
    flat = buf[:need].zero_()
    offsets = [0]
    for g in grads:
        offsets.append(offsets[-1] + g.numel())
    return [flat[a:b].view(g.shape) for a, b, g in zip(offsets, offsets[1:], grads)]


def _fused_directions(states, grads, ts, factors, group, keep, eps_style, which, steps, out, workspace=None) -> None:
    """Adam's moments and direction ``m / (sqrt(v) + eps)`` through torch's fused AdamW kernel, run on a zero
    "parameter" D (zeros, from ``workspace`` when given: the caller is done with the previous call's directions) at
    lr 1: the kernel leaves ``D = -factor * m / (sqrt(v) + eps)`` (factor: the bias factor
    sqrt(1 - b2^t) / (1 - b1^t); galore-style eps enters the kernel as eps / sqrt(1 - b2^t)), so the direction is
    ``-D / factor``: one multi-threaded pass instead of seven list passes, equal up to rounding (``fused=False``
    keeps the list path, bit for bit). A skipped step (``keep`` 0) changes no moment, as in torch's GradScaler path.
    The step counts in ``ts`` already include this step."""
    beta1, beta2 = group["betas"]
    found = None if keep is None else (1.0 - keep).to(torch.float32)
    buckets: Dict[tuple, List[int]] = {}
    kinds: Dict[tuple, List[int]] = {}
    for i in which:
        eps = group["eps"] if eps_style == "torch" else group["eps"] / math.sqrt(1 - beta2 ** float(ts[i]))
        buckets.setdefault((grads[i].device, grads[i].dtype, eps), []).append(i)
        kinds.setdefault((grads[i].device, grads[i].dtype), []).append(i)
    zeros = {}  # one workspace buffer per device and dtype, whatever the eps buckets
    for idx in kinds.values():
        zeros.update(zip(idx, _zeros_like_all([grads[i] for i in idx], workspace)))
    for (device, dtype, eps), idx in buckets.items():
        ds = [zeros[i] for i in idx]
        torch._fused_adamw_(
            ds,
            [grads[i] for i in idx],
            [states[i]["exp_avg"] for i in idx],
            [states[i]["exp_avg_sq"] for i in idx],
            [],
            [ts[i] for i in idx],
            amsgrad=False,
            lr=1.0,
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=eps,
            maximize=False,
            grad_scale=None,
            found_inf=None if found is None else found.to(device),
        )
        torch._foreach_mul_(ds, [(-1.0 / factors[i]).to(dtype) for i in idx])
        for i, d in zip(idx, ds):
            out[i] = Direction(d, steps[i].to(dtype), group["lr"], factors[i].to(dtype), scratch=True)


class Adam:
    """Adam moments on lists of tensors. ``eps_style="galore"`` adds eps to sqrt(v) before bias correction
    (galore-torch / HF AdamW); ``"torch"`` is ``torch.optim.AdamW``'s placement (eps after correcting v)."""

    kind = "inner"
    name = "adam"
    keys = ("exp_avg", "exp_avg_sq")
    needs_host = False
    options = (
        Option("betas", (0.9, 0.999), pair(number(0.0, 1.0, hi_open=True)), "Adam's moment decay rates (beta1, beta2)"),
        Option("eps", 1e-8, number(0.0), "added to sqrt(v) (where: see eps_style)"),
        Option("correct_bias", True, boolean, "Adam bias correction"),
        Option(
            "eps_style",
            None,
            choice(None, "torch", "galore"),
            "`torch` (torch.optim.AdamW: eps after bias correction) or `galore` (galore-torch / HF: before); "
            "None = torch for full-rank updates, galore for low-rank ones",
        ),
    )

    def check_group(self, group: Dict) -> Optional[str]:
        if group["lr"] is None:
            return "lr None is only for Adafactor's relative step"
        return None

    def reset(self, state: Dict) -> None:
        """Drop the moments (freed) and the bias-correction count: the rule restarts at the next update."""
        for key in self.keys:
            Moment.delete(state, key)
        state.pop("moment_step", None)

    def state_layout(self, shape, group: Dict, compute: torch.dtype = torch.float32) -> List[StateTensor]:
        moments = Moment.layout(shape, group, compute)
        return moments + moments + [state_tensor((), torch.float32)]  # + the 0-dim fp32 step counter

    def step(
        self,
        states: List[Dict],
        grads: List[torch.Tensor],
        group: Dict,
        keep: torch.Tensor,
        eps_style: str,
        counter: str = "moment_step",
        col_norm_dims: Optional[List[Optional[int]]] = None,
        params=None,
        workspace: Optional[Dict] = None,
    ) -> List[Direction]:
        """One Adam update of every state in ``states`` (one group, one device), gated by ``keep``."""
        if not states:
            return []
        beta1, beta2 = group["betas"]
        device = grads[0].device
        for st, g in zip(states, grads):
            if Moment.exists(st, "exp_avg") and Moment.shape(st, "exp_avg") != tuple(g.shape):
                self.reset(st)  # the subspace changed size (a new rank, a block turned on): start afresh
            if not Moment.exists(st, "exp_avg"):
                Moment.create(st, "exp_avg", g, group, signed=True)
                Moment.create(st, "exp_avg_sq", g, group, signed=False)
        ts = [_step_counter(st, counter, device) for st in states]
        known = keep is None  # the host already knows this step is kept: no gating needed
        for t in ts:
            t.add_(1 if known else keep)
        steps, bc2_sqrt, factors = bias_steps(ts, group["lr"], beta1, beta2, group["correct_bias"])
        clean = list(grads) if known else [where_keep(keep, g) for g in grads]
        eps = group["eps"]
        if eps_style == "torch":
            eps_list = [(bc * eps).to(g.dtype) for bc, g in zip(bc2_sqrt, grads)]
        out: List[Optional[Direction]] = [None] * len(states)
        plain = [i for i, st in enumerate(states) if not Moment.is_quantized(st, "exp_avg")]
        fast = [i for i in plain if _fusable_moments(states[i], grads[i], group, eps_style, known)]
        if fast:
            _fused_directions(states, grads, ts, factors, group, keep, eps_style, fast, steps, out, workspace)
            plain = [i for i in plain if out[i] is None]
        if plain:
            compute = grads[plain[0]].dtype
            ms = [Moment.load(states[i], "exp_avg", True, compute) for i in plain]
            vs = [Moment.load(states[i], "exp_avg_sq", False, compute) for i in plain]
            gs = [clean[i] for i in plain]
            torch._foreach_mul_(ms, beta1 if known else gated(keep, beta1, compute))
            torch._foreach_add_(ms, gs, alpha=1 - beta1)
            torch._foreach_mul_(vs, beta2 if known else gated(keep, beta2, compute))
            torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
            for i, m, v in zip(plain, ms, vs):
                Moment.store(states[i], "exp_avg", m, True)
                Moment.store(states[i], "exp_avg_sq", v, False)
            denoms = torch._foreach_sqrt(vs)
            if eps_style == "torch":
                torch._foreach_add_(denoms, [eps_list[i] for i in plain])
            else:
                torch._foreach_add_(denoms, eps)
            dirs = torch._foreach_div(ms, denoms)
            for i, d in zip(plain, dirs):
                out[i] = Direction(d, steps[i].to(compute), group["lr"], factors[i].to(compute))
        for i, st in enumerate(states):
            if out[i] is not None:
                continue
            # 8-bit: the update rewrites the codes in place; a skipped step restores them from a copy of the codes
            e = float(eps_list[i]) if eps_style == "torch" else eps
            keys8 = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
            saved = [] if known else [st[k].clone() for k in keys8]
            dim = col_norm_dims[i] if col_norm_dims else None  # the 8-bit update can return per-channel norms
            res = quant.adam8bit_step(
                clean[i].float(),
                st["exp_avg_codes"],
                st["exp_avg_absmax"],
                st["exp_avg_sq_codes"],
                st["exp_avg_sq_absmax"],
                beta1,
                beta2,
                e,
                col_norm_dim=dim,
            )
            d, norms = res if dim is not None else (res, None)
            for k, old in zip(keys8, saved):
                st[k].copy_(torch.where(keep.bool(), st[k], old))
            out[i] = Direction(d, steps[i].float(), group["lr"], factors[i].float(), norms)
        return out  # type: ignore[return-value]

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
            if x.shape != Moment.shape(state, key):
                self.reset(state)
                return
            Moment.store(state, key, x, signed)


class Adafactor:
    """Adafactor (Shazeer & Stern) as in HF / galore-torch: factored second moment, relative step, RMS clipping.
    Its relative step needs the parameter's RMS as a number, so each step reads the device (``needs_host``).

    ``lr=0`` (with or without the relative step) is a step that changes no weight: the statistics and the first
    moment advance as HF's would at lr 0 (the update they take is 0 x the computed one) and nothing is applied,
    where HF would still apply the decayed first moment. It is the one manual value the relative step accepts:
    ``torch.distributed.checkpoint`` creates an optimizer's state by one step at lr 0 with zero gradients."""

    kind = "inner"
    name = "adafactor"
    keys = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")
    needs_host = True
    options = (
        Option("eps", (1e-30, 1e-3), pair(number(0.0)), "(eps1 added to g^2, eps2 floor of the parameter RMS)"),
        Option("clip_threshold", 1.0, number(0.0, lo_open=True), "RMS clipping threshold of the update"),
        Option("decay_rate", -0.8, number(hi=0.0), "beta2_t = 1 - t^decay_rate"),
        Option("beta1", None, number(0.0, 1.0, hi_open=True, none_ok=True), "first-moment decay (None: none kept)"),
        Option("scale_parameter", True, boolean, "scale the step by the parameter's RMS"),
        Option("relative_step", True, boolean, "lr = min(1e-2, 1/sqrt(t)) (needs lr=None)"),
        Option("warmup_init", False, boolean, "relative step warm-up 1e-6 t (needs relative_step)"),
    )

    def check_group(self, group: Dict) -> Optional[str]:
        if group["relative_step"] and group["lr"] is not None and not _is_zero(group["lr"]):
            return (
                f"relative_step=True computes its own lr: set lr=None (or relative_step=False); got lr={group['lr']!r} "
                "(lr=0 alone is accepted: a step that changes no weight)"
            )
        if not group["relative_step"] and group["lr"] is None:
            return "lr=None needs relative_step=True"
        if group["warmup_init"] and not group["relative_step"]:
            return "warmup_init=True needs relative_step=True"
        return None

    def reset(self, state: Dict) -> None:
        for key in self.keys:
            Moment.delete(state, key)
        state.pop("moment_step", None)

    def init(self, state: Dict, like: torch.Tensor, group: Dict) -> None:
        if group["beta1"] is not None:
            Moment.create(state, "exp_avg", like, group, signed=True)
        if like.dim() >= 2:  # factored: row and column statistics are tiny, kept in fp32
            state["exp_avg_sq_row"] = torch.zeros(like.shape[:-1], dtype=torch.float32, device=like.device)
            state["exp_avg_sq_col"] = torch.zeros(
                like.shape[:-2] + like.shape[-1:], dtype=torch.float32, device=like.device
            )
        else:
            Moment.create(state, "exp_avg_sq", like, group, signed=False)

    def state_layout(self, shape, group: Dict, compute: torch.dtype = torch.float32) -> List[StateTensor]:
        shape = tuple(shape)
        out = Moment.layout(shape, group, compute) if group["beta1"] is not None else []
        if len(shape) >= 2:  # fp32 row and column statistics; the step count is a number
            return out + [state_tensor(shape[:-1], torch.float32), state_tensor(shape[:-2] + shape[-1:], torch.float32)]
        return out + Moment.layout(shape, group, compute)

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

    def step(
        self,
        states: List[Dict],
        grads: List[torch.Tensor],
        group: Dict,
        keep: torch.Tensor,
        eps_style: str,
        counter: str = "moment_step",
        col_norm_dims: Optional[List[Optional[int]]] = None,
        params=None,
        workspace: Optional[Dict] = None,
    ) -> List[Direction]:
        # needs_host: the engine reads the non-finite flag before calling, so ``keep`` is 1 here
        dims = col_norm_dims or [None] * len(states)
        return [self._one(st, g, group, p, dim) for st, g, p, dim in zip(states, grads, params, dims)]

    def _one(self, state: Dict, grad: torch.Tensor, group: Dict, param: torch.Tensor, col_norm_dim) -> Direction:
        if not ("exp_avg_sq_row" in state or Moment.exists(state, "exp_avg_sq")):
            self.init(state, grad, group)
        state["moment_step"] = int(state.get("moment_step", 0)) + 1
        t = state["moment_step"]
        frozen = _is_zero(group["lr"])  # lr 0: every statistic advances, no weight changes (see the class doc)
        param_rms = float(self._rms(param.float())) if group["scale_parameter"] and not frozen else 0.0
        lr = 0.0 if frozen else self._lr(group, t, param_rms)
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
        one = torch.ones((), dtype=torch.float32, device=grad.device)
        step = torch.zeros_like(one) if frozen else one  # at lr 0 even a decayed first moment is not applied
        return Direction(update, step, lr, one, col_norms)

    def rotate(self, state: Dict, rot: Dict[str, torch.Tensor]) -> None:
        # Factored statistics have no meaningful rotation: start them afresh, keep the step count.
        step = state.get("moment_step", 0)
        self.reset(state)
        state["moment_step"] = step


def _is_zero(lr) -> bool:
    """Whether a learning rate (None, a number or a 0-dim tensor) is exactly 0."""
    return lr is not None and float(lr) == 0.0


INNER_RULES = {"adam": Adam(), "adafactor": Adafactor()}

__all__ = ["INNER_RULES", "Adam", "Adafactor", "Direction", "Moment", "DTYPES", "where_keep", "gated", "bias_steps"]
