"""Named optimizers as data: each row picks parts and defaults of the one engine. The constructors, the
state-memory estimator, the benchmarks and the tuner all look methods up here, by their one name or an alias.

A row's ``recipe`` is its paper's pretraining recipe (what ``benchmarks.pretrain --recipe paper`` uses); its
``key_aliases`` are the group keys its reference package spells differently (Fira's ``alpha`` is ``scale``)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from .options import OptionError


@dataclass(frozen=True)
class Method:
    name: str
    cls: str  # "module:Class", imported lazily
    parts: Dict[str, Any]  # projector / inner / residual / route / subspace_change ...
    defaults: Dict[str, Any] = field(default_factory=dict)  # everything else that differs from the engine's
    aliases: Tuple[str, ...] = ()
    key_aliases: Dict[str, Tuple[str, Callable[[Any], Any]]] = field(default_factory=dict)
    recipe: Dict[str, Any] = field(default_factory=dict)
    doc: str = ""

    @property
    def optimizer_class(self):
        module, name = self.cls.split(":")
        return getattr(importlib.import_module(module), name)


def _same(x):
    return x


def _reset(flag):
    return "reset" if flag else "keep"


def _rotate(flag):
    return "rotate" if flag else "keep"


# eps_style="galore" for the drop-ins of galore-torch, fira and apollo-torch: their dense groups place Adam's eps
# before bias correction (HF AdamW), and that placement is what their published perplexities were measured with
# (README, "Defaults from evidence"); a user who changes only the import gets their runs, bit for bit.
# Paper recipes: each method's LLaMA-on-C4 pretraining recipe as its paper states it (GaLore's setup, which the later
# papers reuse: batch 512 x 256 tokens, linear warmup over the first 10% of steps, cosine decay to 10% of the peak
# lr). Keys are `benchmarks.pretrain` options; `rank_fraction` means rank = that fraction of the hidden size
# (GaLore's "d/4": 128 on LLaMA-60M, 512 on LLaMA-1B).
# GaLore (Zhao et al., ICML 2024), Sec. 5.1 and App. C: lr 0.01, alpha 0.25, T = 200, rank about d/4, 10% warmup;
# Fira (Chen et al., 2024) keeps GaLore's settings with its alpha (our scale) 0.25.
_GALORE = dict(lr=1e-2, scale=0.25, update_proj_gap=200, rank_fraction=0.25, warmup=0.1)
# FRUGAL (Zmushko et al., ICML 2025): the AdamW-tuned lr 1e-3, density 0.25, T = 200, signSGD outside.
_FRUGAL = dict(lr=1e-3, density=0.25, update_proj_gap=200, warmup=0.1)
# DCT-AdamW (Modoranu et al., 2025) is compared against GaLore in GaLore's setup: GaLore's values (not checked
# against the paper's per-size tables).
_DCT = dict(lr=1e-2, scale=0.25, update_proj_gap=200, rank_fraction=0.25, warmup=0.1)
# SST (Zhao et al., 2024): rank "6% of the embedding dimension" on LLaMA-1.3B (1/16); lr 1e-3 and the 200-step
# resampling interval are GaLore-setup values, not checked against the paper's tables.
_SST = dict(lr=1e-3, rank_fraction=1 / 16, update_proj_gap=200, warmup=0.1)
# APOLLO (Zhu et al., MLSys 2025): lr 0.01, T = 200; channel-wise at rank d/4 with scale 1, APOLLO-Mini tensor-wise
# at rank 1 with scale 128.
_APOLLO = dict(lr=1e-2, scale=1.0, update_proj_gap=200, rank_fraction=0.25, warmup=0.1)
_APOLLO_MINI = dict(lr=1e-2, scale=128.0, update_proj_gap=200, rank=1, warmup=0.1)

METHODS: Dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "adamw",
            "lowrank_optim.optimizer:LowRankOptimizer",
            dict(inner="adam"),
            dict(eps=1e-8),
            aliases=("adam",),
            recipe=dict(lr=1e-3, warmup=0.1),
            doc="AdamW on every parameter (our engine)",
        ),
        Method(
            "galore",
            "lowrank_optim.galore:GaLoreAdamW",
            dict(projector="svd", inner="adam", residual="none", subspace_change="keep"),
            dict(eps=1e-6, eps_style="galore"),
            aliases=("galore_adamw", "galoreadamw"),
            recipe=_GALORE,
            doc="GaLore (Zhao et al., ICML 2024): Adam in the top-r SVD subspace of the gradient",
        ),
        Method(
            "galore8bit",
            "lowrank_optim.galore:GaLoreAdamW8bit",
            dict(projector="svd", inner="adam", residual="none", subspace_change="keep"),
            dict(eps=1e-8, weight_decay=1e-2, state_bits=8, eps_style="torch"),
            aliases=("galore_8bit", "galore_adamw8bit", "galoreadamw8bit"),
            recipe=_GALORE,
            doc="GaLore with 8-bit blockwise Adam states",
        ),
        Method(
            "galore_adafactor",
            "lowrank_optim.galore:GaLoreAdafactor",
            dict(projector="svd", inner="adafactor", residual="none", subspace_change="keep"),
            dict(lr=None),
            aliases=("galoreadafactor",),
            recipe=_GALORE,
            doc="GaLore with Adafactor (factored second moment)",
        ),
        Method(
            "fira",
            "lowrank_optim.fira:FiraAdamW",
            dict(projector="svd", inner="adam", residual="fira", subspace_change="keep"),
            dict(eps=1e-6, eps_style="galore"),
            aliases=("fira_adamw", "firaadamw"),
            key_aliases={"alpha": ("scale", _same)},
            recipe=_GALORE,
            doc="Fira (Chen et al., 2024): GaLore plus the norm-scaled, growth-limited residual",
        ),
        Method(
            "frugal",
            "lowrank_optim.frugal:FrugalAdamW",
            dict(projector="columns", inner="adam", residual="frugal", subspace_change="reset"),
            dict(scale=1.0),
            aliases=("frugal_adamw", "frugaladamw"),
            key_aliases={"proj_params_lr_scale": ("scale", _same), "reset_statistics": ("subspace_change", _reset)},
            recipe=_FRUGAL,
            doc="FRUGAL (Zmushko et al., ICML 2025): Adam in a subspace, state-free signSGD outside it",
        ),
        Method(
            "dct",
            "lowrank_optim.dct:DCTAdamW",
            dict(projector="dct", inner="adam", residual="none", subspace_change="keep"),
            dict(update_proj_gap=1, scale=1.0, eps=1e-8),
            aliases=("dct_adamw", "dctadamw"),
            key_aliases={"rotate_subspace": ("subspace_change", _rotate)},
            recipe=_DCT,
            doc="DCT-AdamW (Modoranu et al., 2025): Adam in the r DCT directions with the most gradient energy",
        ),
        Method(
            "sst",
            "lowrank_optim.sst:SSTAdamW",
            dict(projector="sst", inner="adam", residual="none", route="spectral"),
            dict(eps=1e-8),
            aliases=("sst_adamw", "sstadamw"),
            recipe=_SST,
            doc="Sparse Spectral Training (Zhao et al., 2024): Adam on W's singular values and sampled vectors",
        ),
        Method(
            "apollo",
            "lowrank_optim.apollo:APOLLOAdamW",
            dict(projector="random", inner="adam", residual="apollo", subspace_change="keep"),
            dict(eps=1e-6, eps_style="galore", scale=1.0, scale_type="channel", random_style="apollo"),
            aliases=("apollo_adamw", "apolloadamw"),
            key_aliases={"proj": ("projector", _same)},
            recipe=_APOLLO,
            doc="APOLLO (Zhu et al., MLSys 2025): Adam on a random projection scales the full gradient per channel",
        ),
        Method(
            "apollo_mini",
            "lowrank_optim.apollo:APOLLOMiniAdamW",
            dict(projector="random", inner="adam", residual="apollo", subspace_change="keep"),
            dict(eps=1e-6, eps_style="galore", scale=128.0, scale_type="tensor", random_style="apollo"),
            aliases=("apollomini", "apollo-mini"),
            key_aliases={"proj": ("projector", _same)},
            recipe=_APOLLO_MINI,
            doc="APOLLO-Mini: rank 1, one scaling factor per tensor",
        ),
    )
}

_ALIASES = {alias: m.name for m in METHODS.values() for alias in (m.name, *m.aliases)}


def method(name: str) -> Method:
    """The registry row for a name or alias (case-insensitive); a ValueError lists the valid names."""
    key = str(name).lower().replace("-", "_")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("_", ""), key))
    try:
        return METHODS[key]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; valid: {sorted(METHODS)} (aliases: "
            f"{sorted(a for a in _ALIASES if a not in METHODS)})"
        ) from None


def method_defaults(name: Optional[str]) -> Dict[str, Any]:
    if not name:
        return {}
    m = method(name)
    return {**m.parts, **m.defaults}


def apply_key_aliases(name: Optional[str], options: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Rename a method's reference-package keys (``alpha`` -> ``scale``); a conflicting pair is an error."""
    if not name:
        return options
    aliases = method(name).key_aliases
    if not any(k in options for k in aliases):
        return options
    out = dict(options)
    for alias, (key, convert) in aliases.items():
        if alias in out:
            value = convert(out.pop(alias))
            if key in options and options[key] != value:
                raise OptionError(
                    f"{where}: got both {alias}={options[alias]!r} and {key}={options[key]!r}; they "
                    f"are the same option ({method(name).name}'s name and the engine's): pass one"
                )
            out[key] = value
    return out


def recipe(name: str) -> Dict[str, Any]:
    """The paper's pretraining recipe of a method (a copy)."""
    return dict(method(name).recipe)


__all__ = ["Method", "METHODS", "method", "method_defaults", "apply_key_aliases", "recipe"]
