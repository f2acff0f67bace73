"""Which weights a step benchmark times: model configs' weight shapes or explicit MxN shapes."""

from __future__ import annotations

from collections import OrderedDict


def parse_shapes(text):
    """'64x32,32x64' -> OrderedDict w0 -> (64, 32), ...; every such weight is a low-rank target."""
    out = OrderedDict()
    for i, item in enumerate(s for s in text.split(",") if s.strip()):
        try:
            dims = tuple(int(d) for d in item.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 2 or min(dims) <= 0:
            raise ValueError(f"--shapes item {item!r}: expected MxN with positive M, N")
        out[f"w{i}.mlp.weight"] = dims
    return out


def _config_shapes(config):
    """LLaMA 2-D weight shapes computed from the config (used when benchmarks.model.weight_shapes is missing)."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = h // config.num_attention_heads * getattr(config, "num_key_value_heads", config.num_attention_heads)
    out = OrderedDict([("model.embed_tokens.weight", (v, h))])
    for i in range(config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out.update(
            {
                f"{a}.q_proj.weight": (h, h),
                f"{a}.k_proj.weight": (kv, h),
                f"{a}.v_proj.weight": (kv, h),
                f"{a}.o_proj.weight": (h, h),
                f"{m}.gate_proj.weight": (f, h),
                f"{m}.up_proj.weight": (f, h),
                f"{m}.down_proj.weight": (h, f),
            }
        )
    out["lm_head.weight"] = (v, h)
    return out


def model_shapes(model, layers, include_embeddings):
    """name -> shape of the weights to bench: the first `layers` transformer layers (0 = all) with their RMSNorm
    weights, plus embed_tokens, lm_head and the final norm when include_embeddings."""
    from ..model import load_config

    config = load_config(model)
    try:
        from ..model import weight_shapes

        shapes = weight_shapes(config)
    except ImportError:
        shapes = _config_shapes(config)
    n = config.num_hidden_layers if not layers else min(layers, config.num_hidden_layers)
    h = config.hidden_size
    out = OrderedDict()
    for name, shape in shapes.items():
        parts = name.split(".")
        in_layer = "layers" in parts and int(parts[parts.index("layers") + 1]) < n
        if in_layer or (include_embeddings and "layers" not in parts):
            out[name] = tuple(shape)
    for i in range(n):
        out[f"model.layers.{i}.input_layernorm.weight"] = (h,)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (h,)
    if include_embeddings:
        out["model.norm.weight"] = (h,)
    return out, n, config.num_hidden_layers


def is_target(name, shape):
    """GaLore's recipe: 2-D weights of attention and MLP modules are low-rank, everything else dense."""
    module = name.rsplit(".", 1)[0]
    return len(shape) == 2 and ("attn" in module or "mlp" in module)


def lowrank_side(shape):
    """The side the engine projects for proj_type "std" (right for tall, left for wide)."""
    return "right" if shape[0] >= shape[1] else "left"
