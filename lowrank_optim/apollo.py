"""APOLLO and APOLLO-Mini (Zhu et al., MLSys 2025) as presets (registry rows ``apollo`` and ``apollo_mini``):
Adam moments kept in a random low-rank space only to measure how much Adam scales each channel; the whole
gradient is scaled by that ratio and limited in norm growth (``residual="apollo"``, see ``residual.py``).

Drop-in for ``apollo_torch.APOLLOAdamW``: same group keys (``rank``, ``proj`` = our ``projector``, ``scale_type``,
``scale``, ``update_proj_gap``, ``proj_type``, ``scale_front``). Any of our projectors works (``proj="svd"`` is the
paper's "APOLLO w. SVD"); APOLLO-Mini is ``rank=1, scale_type="tensor"`` (``scale=128`` in the paper)."""

from __future__ import annotations

from .optimizer import LowRankOptimizer


class APOLLOAdamW(LowRankOptimizer):
    """APOLLO with AdamW moments in the projected space (eps 1e-6, apollo-torch's)."""

    method = "apollo"

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.0,
        correct_bias=True,
        scale_front=False,
        disable_nl=False,
        no_deprecation_warning=True,
        maximize=False,
        **kw,
    ):
        # no_deprecation_warning: accepted for apollo-torch's signature (nothing here is deprecated)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            scale_front=scale_front,
            disable_nl=disable_nl,
            maximize=maximize,
            **kw,
        )


class APOLLOMiniAdamW(APOLLOAdamW):
    """APOLLO-Mini: rank 1, one scaling factor for the whole tensor, scale 128 (the paper's setting)."""

    method = "apollo_mini"


__all__ = ["APOLLOAdamW", "APOLLOMiniAdamW"]
