"""Fault injection: one expected outcome per class of fault a careful user can cause (the reliability checklist).

Each test names the fault, injects it, and checks that nothing changed (or that it took effect cleanly), with the
error naming the group, the key and the value. Benchmark-side faults (resume with other options, corrupt
checkpoints, NaN loss, CLI errors) are in test_pretrain_truth.py and test_cli_errors.py; kernel faults in
test_kernel_selfcheck.py."""

import copy
import io
import pickle
import warnings

import pytest
import torch

import lowrank_optim as lo
from tests.helpers import TinyNet, batches, loss_of, lowrank_groups_for, params_of, train


def _trained(cls=lo.GaLoreAdamW, steps=2, **kw):
    torch.manual_seed(0)
    model = TinyNet()
    opt = cls(lowrank_groups_for(model, update_proj_gap=3), lr=1e-2, **kw)
    train(model, opt, batches(steps))
    return model, opt


def _snapshot(model, opt):
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in opt.state.items()}
    return params_of(model), state


def _unchanged(model, opt, snap):
    params, state = snap
    assert all(torch.equal(params[k], v) for k, v in params_of(model).items())
    for p, st in opt.state.items():
        assert st.keys() == state[id(p)].keys()
        for k, v in st.items():
            assert torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k], k


def _grads(model, seed=7):
    model.zero_grad()
    loss_of(model, batches(1, seed=seed)[0]).backward()


# 1. non-finite hyper-parameters, at construction and after it (by hand or by a scheduler)
@pytest.mark.parametrize(
    "key,value",
    [
        ("lr", float("nan")),
        ("lr", torch.tensor(float("nan"))),
        ("scale", float("nan")),
        ("scale", float("inf")),
        ("eps", float("nan")),
        ("weight_decay", float("nan")),
        ("weight_decay", float("inf")),
        ("fira_gamma", float("nan")),
        ("betas", (0.9, float("nan"))),
    ],
)
def test_nonfinite_hyperparameters_are_refused_before_anything_changes(key, value):
    w = torch.nn.Parameter(torch.randn(16, 12))
    with pytest.raises(ValueError, match=f"param group 0: invalid {key}"):
        lo.FiraAdamW([{"params": [w], "rank": 4, key: value}])
    model, opt = _trained(lo.FiraAdamW)
    snap = _snapshot(model, opt)
    opt.param_groups[0][key] = value
    _grads(model)
    with pytest.raises(ValueError, match=f"param group 0: invalid {key}"):
        opt.step()
    _unchanged(model, opt, snap)


def test_a_scheduler_driving_lr_to_nan_is_caught_at_the_step():
    model, opt = _trained()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float("nan") if step >= 1 else 1.0)
    sched.step()
    snap = _snapshot(model, opt)
    _grads(model)
    with pytest.raises(ValueError, match="param group 0: invalid lr nan"):
        opt.step()
    _unchanged(model, opt, snap)


# 2. settings changed after construction: applied cleanly, never half a step
@pytest.mark.parametrize(
    "change",
    [dict(rank=2), dict(projector="dct"), dict(projector="columns"), dict(proj_type="left"), dict(projector="random")],
)
def test_changed_subspace_settings_take_effect_cleanly(change):
    model, opt = _trained()
    opt.param_groups[0].update(change)
    _grads(model)
    opt.step()  # a new basis for every low-rank weight, fresh moments, no KeyError
    for p in opt.param_groups[0]["params"]:
        st = opt.state[p]
        assert st["exp_avg"].shape == opt.projector_for(opt.param_groups[0], p).low_rank_shape()
    train(model, opt, batches(4, seed=2))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_state_dict_with_parameters_in_another_order_is_refused_before_anything_changes():
    model, opt = _trained()
    sd = opt.state_dict()
    ids = sd["param_groups"][0]["params"]
    sd["param_groups"][0]["params"] = ids[1:] + ids[:1]  # the saved states now sit on the wrong weights
    model2, opt2 = _trained()
    snap = _snapshot(model2, opt2)
    with pytest.raises(ValueError, match=r"param group 0, parameter of shape .* saved exp_avg"):
        opt2.load_state_dict(sd)
    _unchanged(model2, opt2, snap)


# 3. overflow is a non-finite step; moments never hold inf or NaN
@pytest.mark.parametrize(
    "cls,kw",
    [
        (lo.GaLoreAdamW, {}),
        (lo.GaLoreAdamW8bit, dict(min_8bit_size=16)),
        (lo.FiraAdamW, {}),
        (lo.DCTAdamW, {}),
        (lo.SSTAdamW, {}),
        (lo.APOLLOAdamW, {}),
        (lo.LowRankOptimizer, {}),
    ],
)
@pytest.mark.parametrize("bad", [1e30, 3e38, float("nan")])
def test_overflowing_gradients_skip_the_step(cls, kw, bad):
    model, opt = _trained(cls, **kw)
    snap = _snapshot(model, opt)
    _grads(model)
    model.mlp.weight.grad[2, 3] = bad
    with pytest.warns(UserWarning, match="step skipped"):
        opt.step()
    _unchanged(model, opt, snap)
    assert opt.skipped_steps == 1
    train(model, opt, batches(3, seed=4))
    for st in opt.state.values():
        assert all(torch.isfinite(v).all() for v in st.values() if torch.is_tensor(v) and v.is_floating_point())


def test_raise_policy_names_the_parameter():
    model, opt = _trained(nonfinite="raise")
    snap = _snapshot(model, opt)
    _grads(model)
    model.attn.weight.grad[0, 0] = 1e30
    with pytest.raises(FloatingPointError, match=r"param group 0: non-finite gradient .* shape \(40, 24\)"):
        opt.step()
    _unchanged(model, opt, snap)


# 4. empty parameters behave as in torch's AdamW
def test_empty_parameters():
    empty = torch.nn.Parameter(torch.zeros(0, 16))
    w = torch.nn.Parameter(torch.randn(16, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = lo.GaLoreAdamW([{"params": [empty, w], "rank": 4}])
    empty.grad, w.grad = torch.zeros(0, 16), torch.randn(16, 12)
    opt.step()
    assert empty.numel() == 0 and "exp_avg" in opt.state[w]


# 5. copies and odd layouts
def test_copies_pickles_layouts_and_dtypes():
    model, opt = _trained(nonfinite="raise")
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.nonfinite == "raise" and twin.defaults["eps"] == opt.defaults["eps"]
    conv = torch.nn.Parameter(torch.randn(8, 6, 3, 3).to(memory_format=torch.channels_last))
    w64 = torch.nn.Parameter(torch.randn(12, 10, dtype=torch.float64))
    opt = lo.GaLoreAdamW([{"params": [conv, w64], "rank": 2}])
    conv.grad, w64.grad = torch.randn_like(conv), torch.randn_like(w64)
    opt.step()
    assert conv.is_contiguous(memory_format=torch.channels_last) and w64.dtype == torch.float64
    with pytest.raises(ValueError, match="only real floating-point"):
        lo.GaLoreAdamW([torch.zeros(3, dtype=torch.int32)])


# 6. load_state_dict like torch, and stricter
def test_load_state_dict_hooks_defaults_and_checks():
    model, opt = _trained()
    sd = opt.state_dict()
    for g in sd["param_groups"]:  # an older dict without some of today's group keys
        g.pop("inner")
        g.pop("adaptive_gap")
    model2, opt2 = _trained()
    seen = {}

    def pre(optimizer, state_dict):
        out = copy.deepcopy(state_dict)
        out["param_groups"][0]["lr"] = 0.5  # a pre-hook may return a replacement
        return out

    def post(optimizer):
        seen["lr"] = optimizer.param_groups[0]["lr"]
        seen["state"] = len(optimizer.state)  # post-hooks see the loaded state

    opt2.register_load_state_dict_pre_hook(pre)
    opt2.register_load_state_dict_post_hook(post)
    opt2.load_state_dict(sd)
    assert seen == {"lr": 0.5, "state": len(opt.state)} and opt2.param_groups[0]["inner"] == "adam"
    _grads(model2)
    opt2.step()
    bad = copy.deepcopy(opt.state_dict())
    first = bad["param_groups"][0]["params"][0]
    bad["state"][first]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="saved exp_avg has shape"):
        opt2.load_state_dict(bad)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = lo.DCTAdamW(lowrank_groups_for(TinyNet()), lr=1e-2)
    with pytest.warns(UserWarning, match="selects other parts"):
        other.load_state_dict(torch.load(buf, weights_only=True))


# 7. migration: a galore-torch state dict says how to convert it
def test_foreign_state_dict_says_how_to_convert():
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    model = TinyNet()
    ref = galore_torch.GaLoreAdamW(
        lowrank_groups_for(model, scale=0.25, proj_type="std"), lr=1e-2, no_deprecation_warning=True
    )
    train(model, ref, batches(2))
    ours = lo.GaLoreAdamW(lowrank_groups_for(model), lr=1e-2)
    with pytest.raises(ValueError, match=r"convert_state_dict"):
        ours.load_state_dict(ref.state_dict())
    ours.load_state_dict(lo.convert_state_dict(ref.state_dict()))
    train(model, ours, batches(2, seed=3))


# 8. Adafactor: a per-group lr under the relative step, and torch.compile
def test_adafactor_refuses_a_manual_lr_under_relative_step_and_compile(monkeypatch):
    w = torch.nn.Parameter(torch.randn(16, 12))
    with pytest.raises(ValueError, match="param group 0: invalid inner 'adafactor'.*relative_step.*got lr=0.001"):
        lo.GaLoreAdafactor([{"params": [w], "rank": 4, "lr": 1e-3}])
    lo.GaLoreAdafactor([{"params": [w], "rank": 4, "lr": torch.tensor(0.0)}])  # lr 0 alone: a step changing no weight
    opt = lo.GaLoreAdafactor([{"params": [w], "rank": 4}])
    w.grad = torch.randn_like(w)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="cannot run inside torch.compile"):
        opt.step()
