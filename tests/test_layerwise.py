"""Layer-wise updates inside backward equal ordinary training, and free gradients as they go."""

import pytest
import torch
from helpers import TinyNet, batches, loss_of, params_of

from lowrank_optim import GaLoreAdamW
from lowrank_optim.groups import lowrank_param_groups
from lowrank_optim.layerwise import LayerwiseOptimizer


def _setup():
    torch.manual_seed(0)
    model = TinyNet()
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=4, update_proj_gap=3), lr=1e-2, weight_decay=0.01)
    return model, opt


def _reference(data, k):
    model, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for i in range(0, len(data), k):
        opt.zero_grad()
        for idx in data[i : i + k]:
            (loss_of(model, idx) / k).backward()
        opt.step()
        sched.step()
    return params_of(model)


def _layerwise(data, k, peak=None):
    model, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lw = LayerwiseOptimizer(opt, accumulation_steps=k)
    params = list(model.parameters())
    live = []
    if peak is not None:  # live gradient bytes seen at every hook, recorded after layer-wise ones ran
        for p in params:
            p.register_post_accumulate_grad_hook(
                lambda _: live.append(sum(q.grad.numel() * 4 for q in params if q.grad is not None))
            )
    for idx in data:
        (loss_of(model, idx) / k).backward()
        if lw.boundary:
            sched.step()
    if peak is not None:
        peak.append(max(live))
    return params_of(model)


@pytest.mark.parametrize("k", [1, 4])
def test_layerwise_equals_normal_training(k):
    data = batches(12)
    expected = _reference(data, k)
    got = _layerwise(data, k)
    for name, value in got.items():
        assert torch.allclose(value, expected[name], rtol=0, atol=1e-6), name


def test_layerwise_lowers_peak_live_gradient_memory():
    data = batches(2)
    peak = []
    _layerwise(data, 1, peak)
    model, _ = _setup()
    total = sum(p.numel() * 4 for p in model.parameters())
    assert peak[0] < 0.6 * total


def test_layerwise_checkpoint_resume():
    data = batches(8)
    full = _layerwise(data, 2)
    model, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lw = LayerwiseOptimizer(opt, accumulation_steps=2)
    for idx in data[:4]:
        (loss_of(model, idx) / 2).backward()
        if lw.boundary:
            sched.step()
    ckpt = {"model": model.state_dict(), "lw": lw.state_dict(), "sched": sched.state_dict()}
    model2, opt2 = _setup()
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    lw2 = LayerwiseOptimizer(opt2, accumulation_steps=2)
    model2.load_state_dict(ckpt["model"])
    lw2.load_state_dict(ckpt["lw"])
    sched2.load_state_dict(ckpt["sched"])
    for idx in data[4:]:
        (loss_of(model2, idx) / 2).backward()
        if lw2.boundary:
            sched2.step()
    for name, value in params_of(model2).items():
        assert torch.equal(value, full[name]), name


def test_per_parameter_clipping_and_nonfinite_skip():
    model, opt = _setup()
    LayerwiseOptimizer(opt, clip_grad_norm=0.5)  # lives on through the hooks it registers
    before = params_of(model)
    model.attn.weight.register_hook(lambda g: g * float("nan"))
    with pytest.warns(UserWarning, match="non-finite gradient"):
        loss_of(model, batches(1)[0]).backward()
    after = params_of(model)
    assert torch.equal(after["attn.weight"], before["attn.weight"])
    assert not torch.equal(after["mlp.weight"], before["mlp.weight"])


def test_rejects_bad_arguments():
    model, opt = _setup()
    with pytest.raises(ValueError, match="accumulation_steps"):
        LayerwiseOptimizer(opt, accumulation_steps=0)
    with pytest.raises(TypeError):
        LayerwiseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
