"""LLaMA model configs (GaLore's sizes plus CPU-sized ones) and shape helpers."""

import os
from collections import OrderedDict

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_names():
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))


def load_config(name_or_path):
    """A `LlamaConfig` from a config name in benchmarks/configs (e.g. "llama_60m") or a JSON path."""
    from transformers import LlamaConfig

    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(CONFIG_DIR, f"{name_or_path}.json")
    if not os.path.isfile(path):
        raise ValueError(f"unknown model config {name_or_path!r}: not a file and not one of {config_names()}")
    return LlamaConfig.from_json_file(path)


def build_model(config, seed=0):
    """A freshly initialised `LlamaForCausalLM`; the same seed gives bitwise the same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def weight_shapes(config):
    """OrderedDict parameter name -> shape of every 2-D weight, built on the meta device (no memory),
    so memory/step estimates for 1B/7B need not allocate the model."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return OrderedDict((n, tuple(p.shape)) for n, p in model.named_parameters() if p.ndim == 2)


def linear_weight_names(model_or_shapes, target_modules=("attn", "mlp")):
    """Names of the 2-D weights inside modules whose name contains one of `target_modules`
    (GaLore's substring rule: "attn" matches self_attn.q_proj, "mlp" matches mlp.up_proj)."""
    names = (
        model_or_shapes.keys()
        if isinstance(model_or_shapes, dict)
        else [n for n, p in model_or_shapes.named_parameters() if p.ndim == 2]
    )
    return [n for n in names if any(t in n.rsplit(".", 1)[0] for t in target_modules)]
