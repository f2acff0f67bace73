"""Sparse Spectral Training (SST; Zhao, Zhang & Cannistraci, 2024): the ``spectral`` route and its preset.

Each targeted weight W (m x n, k = min(m, n)) is trained through its spectral factors W = U diag(sigma) V^T,
which the optimizer keeps in state; the model keeps a plain dense W that the optimizer rewrites every step.
Per step, from the dense gradient G = dL/dW:

    g_sigma = diag(U^T G V)                  all k singular values (computed as sum(U * (G V), 0))
    g_U_S   = G V_S,   g_V_S = G^T U_S       only the r sampled pairs S ("enhanced" gradients, see below)
    Adam on each; sampled columns renormalised to unit length; sigma clamped >= 0; W <- U diag(sigma) V^T

Every ``update_proj_gap`` steps a new S is chosen by the group's projector (``sst`` samples favouring large
sigma); every ``sst_round`` draws the factors are first re-orthogonalised by an SVD of U diag(sigma) V^T.
Everything else in the model (biases, norms, matrices whose smaller side is <= rank) takes the dense path.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .inner import DTYPES, INNER_RULES, Direction
from .optimizer import LowRankOptimizer
from .options import Option, choice, integer
from .parts import register_route
from .projectors import ProjectorError, sst_sample
from .projectors.svd import truncated_svd
from .route import _grad
from .shapes import matrix_shape
from .state_layout import StateTensor, state_tensor

# Moment prefixes: each set is a plain Adam state (exp_avg, exp_avg_sq, moment_step) flattened into the
# parameter's state under its prefix, so checkpoints stay flat dicts of tensors and numbers.
SIGMA, VEC_U, VEC_V = "adam_sigma.", "adam_U.", "adam_V."


def spectral_grads(
    G: torch.Tensor, U: torch.Tensor, V: torch.Tensor, idx: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g_sigma (k), g_U_S (m x r), g_V_S (n x r)) for W = U diag(sigma) V^T, from G = dL/dW.

    g_sigma is the exact gradient diag(U^T G V). The vector gradients are SST's enhanced ones: the exact
    dL/dU_S = G V_S diag(sigma_S) and dL/dV_S = G^T U_S diag(sigma_S) divided by sigma_S, so a pair with a small
    singular value still moves (paper, Sec. 4.2 and App. D). G V (m x k) is needed for g_sigma anyway, so
    G V_S is a column slice of it; the k x k product U^T G V is never formed."""
    GV = G @ V
    g_sigma = (U * GV).sum(0)
    return g_sigma, GV[:, idx], G.t() @ U[:, idx]


class SpectralRoute:
    """The ``spectral`` route: a targeted matrix is trained through the factors of its SVD (see module doc).

    Memory per targeted m x n weight (k = min(m, n)), in elements: factors (m + n + 1) k in ``factor_dtype``
    (more than W itself), moments 2 (m + n) r + 2 k, r int64 indices; versus AdamW's 2 m n."""

    kind, name = "route", "spectral"
    options = (
        Option(
            "sst_round",
            None,
            integer(1, none_ok=True),
            "resamplings between re-SVDs of the factors (None = ceil(k / r))",
        ),
        Option(
            "factor_dtype",
            "float32",
            choice("float32", "bfloat16", "float16"),
            "storage dtype of U, sigma, V (math is fp32)",
        ),
    )

    @staticmethod
    def check_group(group: Dict) -> Optional[str]:
        if group["inner"] != "adam":
            return "the spectral route uses Adam moments (inner='adam')"
        if group["residual"] != "none":
            return "the spectral route has no residual (residual='none')"
        return None

    def rank_for(self, group: Dict, p: torch.Tensor) -> int:
        return group["rank"]

    def is_lowrank(self, group: Dict, p: torch.Tensor) -> bool:
        return "rank" in group and p.dim() >= 2 and min(matrix_shape(p)) > group["rank"]

    def refresh_due(self, opt, it) -> bool:
        return "sst_U" not in it.state or it.state.get("step", 0) % it.group["update_proj_gap"] == 0

    def state_layout(self, opt, group: Dict, p: torch.Tensor) -> List[StateTensor]:
        (m, n), r = matrix_shape(p), group["rank"]
        k = min(m, n)
        factor = DTYPES[group["factor_dtype"]]
        adam = INNER_RULES["adam"]
        return (
            [state_tensor((m, k), factor), state_tensor((k,), factor), state_tensor((n, k), factor)]  # U, sigma, V
            + [state_tensor((r,), torch.int64)]  # the sampled indices
            + adam.state_layout((k,), group)
            + adam.state_layout((m, r), group)
            + adam.state_layout((n, r), group)
        )

    # ------------------------------------------------------------------ refresh: factors and sample
    def prepare(self, opt, items) -> None:
        for it in items:
            it.G = _grad(it.g, it.group, matrix=True)
            it.refresh = self._refresh(opt, it) if self.refresh_due(opt, it) else None

    def _refresh(self, opt, it) -> Dict:
        """New factors (first step, or every ``sst_round`` draws) and a new sample S. Never mutates state."""
        state, group, p = it.state, it.group, it.w
        started = "sst_U" in state
        new: Dict = {}
        draws = int(state.get("proj_refreshes", 0))
        k = min(matrix_shape(p))
        if not started or draws % (group["sst_round"] or math.ceil(k / group["rank"])) == 0:
            try:
                new.update(self._factorise(p, state, group))
            except ProjectorError as err:
                if not started:
                    raise RuntimeError(
                        f"param group {it.gi}: the SVD of a parameter of shape {tuple(p.shape)} "
                        f"failed ({err}); no parameter was updated"
                    ) from err
                warnings.warn(
                    f"param group {it.gi}: re-SVD failed for a parameter of shape {tuple(p.shape)} "
                    f"({err}); keeping the current factors",
                    stacklevel=2,
                )
        factors = {k: new.get(k, state.get(k)) for k in ("sst_U", "sst_sigma", "sst_V")}
        new["sst_idx"] = self._select(opt, it, factors)
        new["proj_refreshes"] = draws + 1
        return new

    def _select(self, opt, it, factors: Dict) -> torch.Tensor:
        """The r singular pairs to train next, by the group's projector (see ``SSTAdamW``)."""
        group, state = it.group, it.state
        sigma, r, name = factors["sst_sigma"].float(), group["rank"], group["projector"]
        gen = opt.projector_for(group, it.p).generator(state, torch.device("cpu"))  # (seed, param, draw count)
        if name == "sst":
            return sst_sample(sigma.cpu(), r, group["sst_weight"], gen).to(sigma.device)
        if name in ("svd", "rsvd", "power"):
            score = sigma
        elif name == "dct":
            U, V = factors["sst_U"].float(), factors["sst_V"].float()
            score = spectral_grads(it.G, U, V, sigma.new_zeros(0).long())[0].abs()
        else:  # random, columns: uniform
            return torch.randperm(sigma.numel(), generator=gen)[:r].sort().values.to(sigma.device)
        return torch.topk(score, r).indices.sort().values

    @staticmethod
    def _factorise(p: torch.Tensor, state: Dict, group: Dict) -> Dict:
        if "sst_U" in state:  # re-orthogonalise the master copy, not its (possibly bf16) image in W
            source = (state["sst_U"].float() * state["sst_sigma"].float()) @ state["sst_V"].float().t()
        else:
            source = p.detach().reshape(matrix_shape(p)).float()
        u, s, vh = truncated_svd(source, min(source.shape), "sst")
        dtype = DTYPES[group["factor_dtype"]]
        return {
            "sst_U": u.to(dtype).contiguous(),
            "sst_sigma": s.to(dtype),
            "sst_V": vh.t().to(dtype).contiguous(),
            "sst_svds": int(state.get("sst_svds", 0)) + 1,
        }

    def commit_refresh(self, opt, items) -> None:
        for it in items:
            if it.refresh is None:
                continue
            _drop(it.state, VEC_U)
            _drop(it.state, VEC_V)
            if "sst_U" in it.refresh:
                _drop(it.state, SIGMA)
            it.state.update(it.refresh)

    # ------------------------------------------------------------------ step
    def update(self, opt, items, keep_on) -> None:
        for it in items:
            self._step_one(it, keep_on(it.w.device))

    @staticmethod
    def _step_one(it, keep: torch.Tensor) -> None:
        state, group, p = it.state, it.group, it.w
        U, sigma, V, idx = state["sst_U"], state["sst_sigma"], state["sst_V"], state["sst_idx"]
        U32, s32, V32 = U.float(), sigma.float(), V.float()
        g_sigma, g_u, g_v = spectral_grads(it.G, U32, V32, idx)
        # Every gradient above came from the old factors; only now are they updated.
        d = _adam(state, SIGMA, g_sigma, group, keep)
        decay = 1 - d.decay_lr * group["weight_decay"]
        s_new = s32.mul(decay).addcmul_(d.direction, -d.step).clamp_min_(0)
        sigma.copy_(torch.where(keep.bool(), s_new, s32))
        for prefix, factor, f32, grad in ((VEC_U, U, U32, g_u), (VEC_V, V, V32, g_v)):
            d = _adam(state, prefix, grad, group, keep)
            old = f32[:, idx]
            cols = old.addcmul(d.direction, -d.step)
            cols.div_(cols.norm(dim=0).clamp_min_(torch.finfo(torch.float32).tiny))
            factor[:, idx] = torch.where(keep.bool(), cols, old).to(factor.dtype)
        state["step"] = state.get("step", 0) + 1
        # W is the image of the stored (rounded) factors, so W == U diag(sigma) V^T holds exactly.
        W = (U.float() * sigma.float()) @ V.float().t()
        p.copy_(W.view(p.shape))


register_route(SpectralRoute())


def _drop(state: Dict, prefix: str) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


def _adam(state: Dict, prefix: str, grad: torch.Tensor, group: Dict, keep: torch.Tensor) -> Direction:
    """The engine's Adam rule (fp32 / low-precision / 8-bit) on one prefixed moment set."""
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    (d,) = INNER_RULES["adam"].step([sub], [grad], group, keep, eps_style=group.get("eps_style") or "torch")
    state.update({prefix + k: v for k, v in sub.items()})
    return d


class SSTAdamW(LowRankOptimizer):
    """Sparse Spectral Training with AdamW moments (registry row ``sst``).

    Groups with a ``rank`` key train each matrix whose smaller side exceeds ``rank`` spectrally; everything else
    is plain AdamW.

    Args (besides the engine's lr, betas, eps, weight_decay, maximize, rank, update_proj_gap, seed, state_bits,
    state_dtype, nonfinite):
        update_proj_gap: steps between resamplings of the r trained singular pairs (engine default 200).
        sst_round: resamplings between re-SVDs of the factors; ``None`` (default) = ceil(k / r).
        sst_weight: sampling mix, ``p_i = (1 - w)/k + w sigma_i / sum(sigma)``; default 0.5.
        factor_dtype: storage dtype of U, sigma, V: "float32" (default), "bfloat16" or "float16". Math is fp32.

    Semantics: the factors are the master copy of W (W is rewritten from them every step); weight decay multiplies
    sigma by (1 - lr wd), AdamW's decoupled decay of W at O(k) cost; a resampling resets the sampled vectors'
    moments, a re-SVD also sigma's. The ``projector`` chooses WHICH r pairs train: "sst" samples by the rule
    above; "svd"/"rsvd"/"power" take the r largest sigma; "random"/"columns" draw uniformly; "dct" takes the r
    pairs best aligned with the gradient, |u_i^T G v_i|.
    """

    method = "sst"

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        maximize=False,
        sst_round: Optional[int] = None,
        sst_weight: float = 0.5,
        factor_dtype: str = "float32",
        **kw,
    ):
        if kw.get("projector", "sst") == "sst" or sst_weight != 0.5:
            kw["sst_weight"] = sst_weight
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            sst_round=sst_round,
            factor_dtype=factor_dtype,
            **kw,
        )


__all__ = ["SSTAdamW", "SpectralRoute", "spectral_grads"]
