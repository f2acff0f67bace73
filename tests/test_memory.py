"""estimate_state_bytes (before training, from shapes) equals optimizer.state_bytes() (measured) exactly.

Checked on the benchmark LLaMA-60M weight shapes: every distinct projected matrix shape of the model (one decoder
layer: 512x512, 1376x512, 512x1376) trained a real step, with the vocabulary cut to 2048 to keep CI fast (embedding
and head go through the same dense rule whatever their size); the full-depth estimate is the 1-layer one plus
(L-1) layers. benchmarks/results/state_bytes_llama60m.md has the full-size table."""

import warnings

import pytest
import torch

from lowrank_optim.memory import build, estimate_state_bytes

transformers = pytest.importorskip("transformers")
from benchmarks.model import load_config  # noqa: E402

# every projector once (with GaLore), every method at both precisions on the cheap ``columns`` subspace (SST
# always factors W), and a few mixed ones: the byte formulas are per part, so this covers every combination's parts
CASES = (
    [("galore", p, 32) for p in ("svd", "rsvd", "random", "dct", "columns", "sst")]
    + [
        (m, "columns", b)
        for m in ("adamw", "galore", "galore_adafactor", "fira", "frugal", "dct", "sst")
        for b in (32, 8)
        if (m, b) != ("galore", 32)
    ]
    + [("frugal-density", "columns", 8), ("fira", "dct", 8), ("galore", "svd", 8)]
)


def _llama(layers, device=None, vocab=2048):
    config = load_config("llama_60m")
    config.num_hidden_layers = layers
    config.vocab_size = vocab
    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(config)
    return transformers.LlamaForCausalLM(config)


def _kwargs(method, projector, bits):
    if method == "frugal-density":  # per-weight rank from rho
        return dict(rank=128, density=0.25, update_proj_gap=10, state_bits=bits, projector=projector)
    kw = dict(rank=128, update_proj_gap=10, state_bits=bits)
    if method != "sst" and method != "adamw":
        kw["projector"] = projector
    return kw


@pytest.mark.parametrize("method,projector,bits", CASES)
def test_estimate_equals_measured_on_llama60m_shapes(method, projector, bits):
    model = _llama(1)
    kw = _kwargs(method, projector, bits)
    method = method.split("-")[0]
    estimate = estimate_state_bytes(_llama(1, "meta"), method, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build(model, method, **kw)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    opt.step()
    assert opt.state_bytes() == estimate


def test_full_depth_estimate_is_linear_in_layers():
    one = estimate_state_bytes(_llama(1, "meta"), "galore", rank=128)
    two = estimate_state_bytes(_llama(2, "meta"), "galore", rank=128)
    full = estimate_state_bytes(_llama(8, "meta"), "galore", rank=128)
    assert full == one + 7 * (two - one)


def test_lowrank_saves_memory_and_8bit_saves_more():
    meta = _llama(8, "meta")
    adamw = estimate_state_bytes(meta, "adamw")
    galore = estimate_state_bytes(meta, "galore", rank=128)
    galore8 = estimate_state_bytes(meta, "galore", rank=128, state_bits=8)
    assert galore8 < galore < adamw


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        estimate_state_bytes(_llama(1, "meta"), "lion")
