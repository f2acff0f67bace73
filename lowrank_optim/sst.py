"""Sparse Spectral Training (SST; Zhao, Zhang & Cannistraci, 2024) as a preset of the engine.

Each targeted weight W (m x n, k = min(m, n)) is trained through its spectral factors W = U diag(sigma) V^T,
which the optimizer keeps in state; the model keeps a plain dense W that the optimizer rewrites every step.
Per step, from the dense gradient G = dL/dW:

    g_sigma = diag(U^T G V)                  all k singular values (computed as sum(U * (G V), 0))
    g_U_S   = G V_S,   g_V_S = G^T U_S       only the r sampled pairs S ("enhanced" gradients, see below)
    Adam on each; sampled columns renormalised to unit length; sigma clamped >= 0; W <- U diag(sigma) V^T

Every ``update_proj_gap`` steps a new S is drawn with ``sst_sample`` (favouring large sigma); every ``sst_round``
draws the factors are first re-orthogonalised by an SVD of U diag(sigma) V^T. Everything else in the model
(biases, norms, matrices whose smaller side is <= rank) takes the engine's dense AdamW path.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import torch

from .inner import DTYPES, INNER_RULES, Direction
from .optimizer import LowRankOptimizer, is_lowrank, matrix_shape
from .projectors import ProjectorError, sst_sample
from .projectors.svd import truncated_svd

# Moment prefixes: each set is a plain Adam state (exp_avg, exp_avg_sq, moment_step) flattened into the
# parameter's state under its prefix, so checkpoints stay flat dicts of tensors and numbers.
SIGMA, VEC_U, VEC_V = "adam_sigma.", "adam_U.", "adam_V."
SST_OPTIONS = ("sst_round", "factor_dtype")


def spectral_grads(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                   idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g_sigma (k), g_U_S (m x r), g_V_S (n x r)) for W = U diag(sigma) V^T, from G = dL/dW.

    g_sigma is the exact gradient diag(U^T G V). The vector gradients are SST's enhanced ones: the exact
    dL/dU_S = G V_S diag(sigma_S) and dL/dV_S = G^T U_S diag(sigma_S) divided by sigma_S, so a pair with a small
    singular value still moves (paper, Sec. 4.2 and App. D). G V (m x k) is needed for g_sigma anyway, so
    G V_S is a column slice of it; the k x k product U^T G V is never formed."""
    GV = G @ V
    g_sigma = (U * GV).sum(0)
    return g_sigma, GV[:, idx], G.t() @ U[:, idx]


class SSTAdamW(LowRankOptimizer):
    """Sparse Spectral Training with AdamW moments.

    Groups with a ``rank`` key train each matrix whose smaller side exceeds ``rank`` spectrally (see the module
    docstring); everything else is plain AdamW (numerically ``torch.optim.AdamW``).

    Args (besides the engine's lr, betas, eps, weight_decay, maximize, rank, update_proj_gap, seed, state_bits,
    state_dtype, nonfinite):
        update_proj_gap: steps between resamplings of the r trained singular pairs (engine default 200).
        sst_round: resamplings between re-SVDs of the factors; ``None`` (default) = ceil(k / r), i.e. about as many
            draws as it takes to visit every pair once.
        sst_weight: sampling mix, ``p_i = (1 - w)/k + w sigma_i / sum(sigma)``; default 0.5.
        factor_dtype: storage dtype of U, sigma, V: "float32" (default), "bfloat16" or "float16". Math is fp32.

    Semantics:
        * The factors are the master copy of W (as fp32 master weights are for bf16 models): W is rewritten from
          them every step, so edits to W made outside the optimizer are overwritten. Factors come from an SVD of W
          at the first step; later re-SVDs factor U diag(sigma) V^T, which keeps sub-bf16 progress in the factors.
        * Weight decay multiplies sigma by (1 - lr wd): with orthonormal U, V this is exactly AdamW's decoupled
          decay of W, at O(k) cost.
        * Moments: Adam on all of sigma and on the r sampled columns of U and V (r columns, not k). A resampling
          resets the sampled vectors' moments (new vectors start fresh); a re-SVD also resets sigma's, since the
          singular values it returns are re-sorted and re-based. ``state_bits=8`` stores every moment set that is
          large enough (>= 4096 entries) in 8 bits.
        * The engine's ``scale``, ``proj_type`` and ``subspace_change`` do not apply; ``inner`` must be "adam" and
          ``residual`` "none". The ``projector`` chooses WHICH r singular pairs are trained at each resampling:
          "sst" (default) samples by the rule above; "svd"/"rsvd" take the r largest sigma; "random"/"columns"
          draw r pairs uniformly; "dct" takes the r pairs best aligned with the gradient, |u_i^T G v_i| (the
          analogue of DCT's selection in W's own singular basis). Draws use the seeded generator.

    Memory per targeted m x n weight (k = min(m, n)), in elements:
        factors  (m + n + 1) k        U, V, sigma in ``factor_dtype`` -- more than the dense W itself (m n)
        moments  2 (m + n) r + 2 k    Adam for the sampled U_S, V_S and for sigma (fp32, or ~1 byte with 8 bits)
        plus r int64 indices; versus AdamW's 2 m n. Per-step temporaries: G V (m x k) and W's rebuild (m x n).
        SST saves optimizer memory only when (m + n + 1) k + 2 (m + n) r + 2 k < 2 m n, e.g. a square n x n
        weight costs ~2n^2 + 4nr vs 2n^2: its gain is in what it trains (a sparse spectral update), not in memory.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False,
                 sst_round: Optional[int] = None, sst_weight: float = 0.5, factor_dtype: str = "float32", **kw):
        # The engine rejects keys it does not know; SST's own keys are filled into each group here instead.
        self._sst_defaults = dict(sst_round=sst_round, factor_dtype=factor_dtype)
        kw.setdefault("projector", "sst")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         sst_weight=sst_weight, **kw)
        self.defaults.update(self._sst_defaults)

    def add_param_group(self, param_group: Dict) -> None:
        for key, value in self._sst_defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)

    def _validate_group(self, g: Dict, i: int) -> None:
        super()._validate_group(g, i)
        if "rank" not in g:
            return
        rnd = g.get("sst_round")
        checks = (
            ("sst_round", rnd is None or (isinstance(rnd, int) and not isinstance(rnd, bool) and rnd > 0),
             "must be None or an int > 0"),
            ("factor_dtype", g.get("factor_dtype") in DTYPES, sorted(DTYPES)),
            ("sst_weight", isinstance(g.get("sst_weight"), (int, float)) and 0 <= g["sst_weight"] <= 1,
             "must be a number in [0, 1]"),
            ("inner", g["inner"] == "adam", "SSTAdamW uses Adam moments"),
            ("residual", g["residual"] == "none", "SST has no residual"),
        )
        for key, ok, why in checks:
            if not ok:
                valid = f"; valid: {why}" if isinstance(why, list) else f" ({why})"
                raise ValueError(f"param group {i}: invalid {key} {g.get(key)!r}{valid}")

    # ------------------------------------------------------------------ refresh: factors and sample
    @staticmethod
    def _round(group: Dict, k: int) -> int:
        return group["sst_round"] or math.ceil(k / group["rank"])

    def _refresh(self, gi: int, group: Dict, p: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """New factors (first step, or every ``sst_round`` draws) and a new sample S. Never mutates state."""
        state = self.state.get(p, {})
        started = "sst_U" in state
        if started and state.get("step", 0) % group["update_proj_gap"] != 0:
            return None
        new: Dict = {}
        draws = int(state.get("proj_refreshes", 0))
        k = min(matrix_shape(p))
        if not started or draws % self._round(group, k) == 0:
            try:
                new.update(self._factorise(p, state, group))
            except ProjectorError as err:
                if not started:
                    raise RuntimeError(f"param group {gi}: the SVD of a parameter of shape {tuple(p.shape)} failed "
                                       f"({err}); no parameter was updated") from err
                warnings.warn(f"param group {gi}: re-SVD failed for a parameter of shape {tuple(p.shape)} ({err}); "
                              f"keeping the current factors")
        factors = {k: new.get(k, state.get(k)) for k in ("sst_U", "sst_sigma", "sst_V")}
        new["sst_idx"] = self._select(group, p, state, factors)
        new["proj_refreshes"] = draws + 1
        return new

    def _select(self, group: Dict, p: torch.Tensor, state: Dict, factors: Dict) -> torch.Tensor:
        """The r singular pairs to train next, by the group's projector (see the class docstring)."""
        sigma, r, name = factors["sst_sigma"].float(), group["rank"], group["projector"]
        gen = self.projector_for(group, p).generator(state, torch.device("cpu"))  # (seed, param, draw count)
        if name == "sst":
            return sst_sample(sigma.cpu(), r, group["sst_weight"], gen).to(sigma.device)
        if name in ("svd", "rsvd"):
            score = sigma
        elif name == "dct":
            U, V = factors["sst_U"].float(), factors["sst_V"].float()
            score = spectral_grads(self._grad(p, group, matrix=True), U, V, sigma.new_zeros(0).long())[0].abs()
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
        return {"sst_U": u.to(dtype).contiguous(), "sst_sigma": s.to(dtype), "sst_V": vh.t().to(dtype).contiguous(),
                "sst_svds": int(state.get("sst_svds", 0)) + 1}

    def _expected_param_bytes(self, group: Dict, p: torch.Tensor) -> int:
        if not is_lowrank(group, p):
            return super()._expected_param_bytes(group, p)
        (m, n), r = matrix_shape(p), group["rank"]
        k = min(m, n)
        factor = torch.empty((), dtype=DTYPES[group["factor_dtype"]]).element_size()
        adam = INNER_RULES["adam"]
        return ((m + n + 1) * k * factor + r * 8  # U, sigma, V and the sampled indices
                + adam.expected_bytes((k,), group) + adam.expected_bytes((m, r), group)
                + adam.expected_bytes((n, r), group))

    # ------------------------------------------------------------------ step
    @staticmethod
    def _reset(state: Dict, prefix: str) -> None:
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]

    @staticmethod
    def _adam(state: Dict, prefix: str, grad: torch.Tensor, group: Dict, p: torch.Tensor) -> Direction:
        """The engine's Adam rule (fp32 / low-precision / 8-bit) on one prefixed moment set."""
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        d = INNER_RULES["adam"].update(sub, grad, group, p, eps_style=group["eps_style"] or "torch")
        state.update({prefix + k: v for k, v in sub.items()})
        return d

    def _step_lowrank(self, group: Dict, p: torch.Tensor, refresh: Optional[Dict]) -> None:
        state = self.state[p]
        if refresh is not None:
            self._reset(state, VEC_U)
            self._reset(state, VEC_V)
            if "sst_U" in refresh:
                self._reset(state, SIGMA)
            state.update(refresh)
        U, sigma, V, idx = state["sst_U"], state["sst_sigma"], state["sst_V"], state["sst_idx"]
        U32, s32, V32 = U.float(), sigma.float(), V.float()
        g_sigma, g_u, g_v = spectral_grads(self._grad(p, group, matrix=True), U32, V32, idx)
        # Every gradient above came from the old factors; only now are they updated.
        d = self._adam(state, SIGMA, g_sigma, group, p)
        s_new = s32.mul(1 - d.decay_lr * group["weight_decay"]).add_(d.direction, alpha=-d.step_size)
        sigma.copy_(s_new.clamp_min_(0))
        for prefix, factor, f32, grad in ((VEC_U, U, U32, g_u), (VEC_V, V, V32, g_v)):
            d = self._adam(state, prefix, grad, group, p)
            cols = f32[:, idx].add_(d.direction, alpha=-d.step_size)
            cols.div_(cols.norm(dim=0).clamp_min_(torch.finfo(torch.float32).tiny))
            factor[:, idx] = cols.to(factor.dtype)
        state["step"] = state.get("step", 0) + 1
        # W is the image of the stored (rounded) factors, so W == U diag(sigma) V^T holds exactly.
        W = (U.float() * sigma.float()) @ V.float().t()
        p.copy_(W.view(p.shape))


__all__ = ["SSTAdamW", "spectral_grads"]
