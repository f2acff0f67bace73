"""GaLore presets: low-rank Adam / Adafactor / 8-bit Adam with the residual dropped and moments kept across
refreshes (rows ``galore``, ``galore8bit``, ``galore_adafactor`` of the registry). Drop-in for galore-torch: same
signatures and group keys (rank, update_proj_gap, scale, proj_type)."""

from __future__ import annotations

from .optimizer import LowRankOptimizer


class GaLoreAdamW(LowRankOptimizer):
    """GaLore with AdamW moments. ``eps`` defaults to 1e-6 as in galore-torch."""

    method = "galore"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, maximize=False, **kw):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, **kw)


class GaLoreAdamW8bit(LowRankOptimizer):
    """GaLore with 8-bit blockwise Adam states (tensors under ``min_8bit_size`` elements stay fp32).

    Takes galore-torch's ``GaLoreAdamW8bit`` signature and defaults (those of bitsandbytes' AdamW8bit: eps 1e-8,
    weight decay 1e-2, eps added to the bias-corrected sqrt(v)). bitsandbytes-only features raise a clear error
    instead of being silently ignored: AMSGrad, percentile clipping, non-blockwise quantization, paged states."""

    method = "galore8bit"

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
        is_paged=False,
        **kw,
    ):
        unsupported = {
            "amsgrad": (amsgrad, False),
            "percentile_clipping": (percentile_clipping, 100),
            "block_wise": (block_wise, True),
            "is_paged": (is_paged, False),
            "args": (args, None),
        }
        for name, (value, only) in unsupported.items():
            if value != only:
                raise ValueError(
                    f"GaLoreAdamW8bit: {name}={value!r} is a bitsandbytes feature not supported here (only {only!r})"
                )
        # optim_bits is accepted for signature compatibility: like galore-torch, this class is always 8-bit.
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size, **kw
        )


class GaLoreAdafactor(LowRankOptimizer):
    """GaLore with Adafactor (HF semantics: relative step when ``lr`` is None)."""

    method = "galore_adafactor"

    def __init__(
        self,
        params,
        lr=None,
        eps=(1e-30, 1e-3),
        clip_threshold=1.0,
        decay_rate=-0.8,
        beta1=None,
        weight_decay=0.0,
        scale_parameter=True,
        relative_step=None,
        warmup_init=False,
        **kw,
    ):
        if relative_step is None:
            relative_step = lr is None
        super().__init__(
            params,
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            **kw,
        )


__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor"]
