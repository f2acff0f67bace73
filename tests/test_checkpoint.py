"""Checkpoints: tensors and numbers only, weights_only loading, bitwise-exact resume (also between refreshes)."""

import io

import pytest
import torch
from helpers import TinyNet, batches, params_of, train

from lowrank_optim import GaLoreAdafactor, GaLoreAdamW
from lowrank_optim.groups import lowrank_param_groups

PROJECTORS = ["svd", "rsvd", "random", "dct", "columns", "sst"]


def _make(projector, opt_cls=GaLoreAdamW, **kw):
    torch.manual_seed(0)
    model = TinyNet(conv=True)
    groups = lowrank_param_groups(model, ["attn", "mlp", "conv"], rank=4, update_proj_gap=4, projector=projector)
    return model, opt_cls(groups, **kw)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _only_tensors_and_numbers(x):
    if isinstance(x, dict):
        return all(_only_tensors_and_numbers(k) and _only_tensors_and_numbers(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_only_tensors_and_numbers(v) for v in x)
    return x is None or isinstance(x, (torch.Tensor, int, float, bool, str))


@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("stop_at", [4, 6])  # at a refresh boundary and between refreshes
def test_resume_is_bitwise_exact(projector, stop_at):
    data = batches(10)
    model, opt = _make(projector, lr=1e-2, weight_decay=0.01)
    train(model, opt, data)
    expected = params_of(model)

    model, opt = _make(projector, lr=1e-2, weight_decay=0.01)
    train(model, opt, data[:stop_at])
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    assert _only_tensors_and_numbers(ckpt["opt"]["state"])
    model2, opt2 = _make(projector, lr=1e-2, weight_decay=0.01)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, data[stop_at:])
    for name, value in params_of(model2).items():
        assert torch.equal(value, expected[name]), name


def test_adafactor_resume_is_exact():
    data = batches(8)
    model, opt = _make("svd", GaLoreAdafactor)
    train(model, opt, data)
    expected = params_of(model)
    model, opt = _make("svd", GaLoreAdafactor)
    train(model, opt, data[:5])
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, opt2 = _make("svd", GaLoreAdafactor)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, data[5:])
    assert all(torch.equal(v, expected[k]) for k, v in params_of(model2).items())


def test_fp32_states_of_bf16_params_stay_fp32_after_loading():
    torch.manual_seed(0)
    model = TinyNet().to(torch.bfloat16)
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=4), lr=1e-2)
    train(model, opt, batches(2))
    sd = _roundtrip(opt.state_dict())
    fresh = GaLoreAdamW(lowrank_param_groups(model, rank=4), lr=1e-2)
    fresh.load_state_dict(sd)
    for st in fresh.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32, k
