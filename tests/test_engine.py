"""The engine: dense groups equal torch AdamW, shapes and sides, dtype policy, bad input, all-or-nothing steps."""

import math

import pytest
import torch
from helpers import TinyNet, batches, loss_of, params_of, rel_err, train

from lowrank_optim import GaLoreAdamW, LowRankOptimizer
from lowrank_optim.groups import lowrank_param_groups
from lowrank_optim.optimizer import matrix_shape, side_for


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
def test_dense_groups_equal_torch_adamw(weight_decay, maximize):
    data = batches(50)
    torch.manual_seed(0)
    a = TinyNet()
    b = TinyNet()
    b.load_state_dict(a.state_dict())
    kw = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=weight_decay, maximize=maximize)
    train(a, torch.optim.AdamW(a.parameters(), **kw), data)
    train(b, LowRankOptimizer(b.parameters(), **kw), data)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert rel_err(pb.detach(), pa.detach()) < 1e-6, name


def test_lowrank_group_mixed_with_dense_group_trains():
    torch.manual_seed(0)
    model = TinyNet()
    groups = lowrank_param_groups(model, ["attn", "mlp"], rank=4, update_proj_gap=5)
    opt = GaLoreAdamW(groups, lr=1e-2)
    losses = train(model, opt, batches(30) * 2)
    assert losses[-1] < losses[0]
    attn = model.attn.weight  # 40 x 24 -> right projection: moments are 40 x rank
    assert opt.state[attn]["exp_avg"].shape == (40, 4)
    assert opt.state[model.mlp.weight]["exp_avg"].shape == (4, 40)  # 24 x 40 -> left: rank x 40
    assert opt.state[model.embed.weight]["exp_avg"].shape == model.embed.weight.shape


def test_side_is_decided_from_the_weight_shape():
    assert side_for((40, 24), "std") == "right" and side_for((24, 40), "std") == "left"
    assert side_for((40, 24), "reverse_std") == "left" and side_for((24, 40), "reverse_std") == "right"
    assert side_for((32, 32), "std") == "right"
    for t in ("left", "right", "full"):
        assert side_for((10, 99), t) == t
    # a rank-r tensor of a tall weight is (m x r) even when r > m would make a shape test flip
    w = torch.nn.Parameter(torch.randn(30, 12))
    opt = GaLoreAdamW([{"params": [w], "rank": 11, "proj_type": "std"}], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (30, 11)


def test_conv_weights_are_projected_as_out_by_rest():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 16, 3)
    assert matrix_shape(conv.weight) == (16, 54)
    opt = GaLoreAdamW([{"params": [conv.weight], "rank": 4}], lr=1e-2)
    x = torch.randn(2, 6, 8, 8)
    conv(x).pow(2).mean().backward()
    opt.step()
    assert opt.state[conv.weight]["exp_avg"].shape == (4, 54)  # 16 x 54 is wide: left projection
    assert opt.state[conv.weight]["proj_left"].shape == (16, 4)


def test_small_weights_train_densely_with_one_warning():
    small = torch.nn.Parameter(torch.randn(8, 30))
    big = torch.nn.Parameter(torch.randn(32, 30))
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) whose smaller side is <= rank 8") as rec:
        opt = GaLoreAdamW([{"params": [small, big], "rank": 8}], lr=1e-2)
    assert len([w for w in rec if "trained densely" in str(w.message)]) == 1
    small.grad, big.grad = torch.randn_like(small), torch.randn_like(big)
    opt.step()
    assert opt.state[small]["exp_avg"].shape == small.shape and "proj_left" not in opt.state[small]
    assert opt.state[big]["exp_avg"].shape == (32, 8)  # tall: right projection


def test_bf16_parameters_keep_fp32_states():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 16, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(16, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}, {"params": [b]}], lr=1e-2)
    before = w.detach().clone()
    for _ in range(3):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    assert w.dtype == torch.bfloat16 and not torch.equal(w, before)
    for p in (w, b):
        assert all(
            v.dtype == torch.float32
            for k, v in opt.state[p].items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        )


def test_state_dtype_is_configurable():
    w = torch.nn.Parameter(torch.randn(32, 16))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "state_dtype": "bfloat16"}], lr=1e-2)
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.bfloat16


def test_lr_scheduler_and_grad_scaler_work_unchanged():
    torch.manual_seed(0)
    model = TinyNet()
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=4, update_proj_gap=5), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    train(model, opt, batches(10), sched)
    assert opt.param_groups[0]["lr"] < 1e-3
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for idx in batches(3):
        opt.zero_grad()
        scaler.scale(loss_of(model, idx)).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- bad input
BAD_GROUP_VALUES = [
    ("rank", 0),
    ("rank", -2),
    ("rank", 2.5),
    ("rank", True),
    ("update_proj_gap", 0),
    ("update_proj_gap", -1),
    ("scale", 0.0),
    ("scale", -1.0),
    ("proj_type", "diagonal"),
    ("projector", "wavelet"),
    ("lr", -1e-3),
    ("eps", -1e-8),
    ("weight_decay", -0.1),
    ("betas", (1.0, 0.999)),
    ("betas", (0.9, -0.1)),
    ("state_bits", 4),
    ("subspace_change", "shuffle"),
]


@pytest.mark.parametrize("key,value", BAD_GROUP_VALUES)
def test_bad_group_value_is_rejected_with_group_and_value(key, value):
    dense = torch.nn.Parameter(torch.randn(4))
    w = torch.nn.Parameter(torch.randn(32, 16))
    group = {"params": [w], "rank": 4, key: value}
    with pytest.raises(ValueError) as err:
        GaLoreAdamW([{"params": [dense]}, group], lr=1e-2)
    msg = str(err.value)
    assert "param group 1" in msg and key in msg and repr(value) in msg
    if key in ("proj_type", "projector"):
        assert "valid:" in msg and ("std" in msg or "svd" in msg)


def test_bad_value_set_after_construction_is_caught_before_any_state_changes():
    w = torch.nn.Parameter(torch.randn(32, 16))
    d = torch.nn.Parameter(torch.randn(5))
    opt = GaLoreAdamW([{"params": [d]}, {"params": [w], "rank": 4}], lr=1e-2)
    before = (w.detach().clone(), d.detach().clone())
    opt.param_groups[1]["update_proj_gap"] = 0
    w.grad, d.grad = torch.randn_like(w), torch.randn_like(d)
    with pytest.raises(ValueError, match=r"param group 1: invalid update_proj_gap 0"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(w, before[0]) and torch.equal(d, before[1])


def test_sparse_gradients_are_rejected_before_any_update():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    d = torch.nn.Parameter(torch.randn(5))
    opt = LowRankOptimizer([{"params": [d]}, {"params": emb.parameters()}], lr=1e-2)
    emb(torch.tensor([1, 2])).sum().backward()
    d.grad = torch.randn_like(d)
    before = d.detach().clone()
    with pytest.raises(ValueError, match="param group 1: sparse gradients"):
        opt.step()
    assert torch.equal(d, before) and len(opt.state) == 0


def test_complex_parameters_are_rejected():
    with pytest.raises(ValueError, match=r"param group 0: complex parameters.*complex64"):
        LowRankOptimizer([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unknown optimizer options"):
        GaLoreAdamW([torch.nn.Parameter(torch.randn(3))], rnak=4)


# ----------------------------------------------------------------------------- all-or-nothing steps
def _model_and_opt(**kw):
    torch.manual_seed(0)
    model = TinyNet()
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2, **kw)
    train(model, opt, batches(2))
    return model, opt


def _snapshot(opt):
    return {
        id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        for p, st in opt.state.items()
    }


def _same_state(a, b):
    return a.keys() == b.keys() and all(
        a[i].keys() == b[i].keys()
        and all(
            torch.equal(a[i][k], b[i][k]) if isinstance(a[i][k], torch.Tensor) else a[i][k] == b[i][k] for k in a[i]
        )
        for i in a
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_whole_step(bad):
    model, opt = _model_and_opt()
    before, state = params_of(model), _snapshot(opt)
    opt.zero_grad()
    loss_of(model, batches(1, seed=9)[0]).backward()
    model.mlp.weight.grad[3, 5] = bad
    with pytest.warns(UserWarning, match="step skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in params_of(model).items())
    assert _same_state(state, _snapshot(opt))
    train(model, opt, batches(2, seed=3))  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_gradient_raise_policy():
    model, opt = _model_and_opt(nonfinite="raise")
    before = params_of(model)
    opt.zero_grad()
    loss_of(model, batches(1, seed=9)[0]).backward()
    model.attn.weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="param group 0: non-finite gradient"):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in params_of(model).items())


def test_failed_svd_keeps_the_previous_basis(monkeypatch):
    model, opt = _model_and_opt()  # 2 steps done, gap 2: the next step refreshes
    basis = opt.state[model.attn.weight]["proj_right"].clone()
    real_svd = torch.linalg.svd

    def failing(*a, **k):
        raise torch.linalg.LinAlgError("The algorithm failed to converge")

    opt.zero_grad()
    loss_of(model, batches(1, seed=5)[0]).backward()
    monkeypatch.setattr(torch.linalg, "svd", failing)
    before = params_of(model)
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        opt.step()
    monkeypatch.setattr(torch.linalg, "svd", real_svd)
    assert torch.equal(opt.state[model.attn.weight]["proj_right"], basis)
    assert not torch.equal(before["attn.weight"], model.attn.weight)  # the step itself went through


def test_failed_first_svd_updates_nothing(monkeypatch):
    torch.manual_seed(0)
    model = TinyNet()
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=4), lr=1e-2)
    loss_of(model, batches(1)[0]).backward()
    before = params_of(model)
    calls = {"n": 0}
    real_svd = torch.linalg.svd

    def fail_on_third(*a, **k):  # the first two weights succeed, the third fails
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_svd(*a, **k)

    monkeypatch.setattr(torch.linalg, "svd", fail_on_third)
    with pytest.raises(RuntimeError, match="param group 0: the first basis .* no parameter was updated"):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in params_of(model).items())
    assert len(opt.state) == 0


def test_state_bytes_counts_every_state_tensor():
    model, opt = _model_and_opt()
    expected = sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
    )
    assert opt.state_bytes() == expected > 0
    attn = opt.state[model.attn.weight]
    assert attn["exp_avg"].numel() == 40 * 4 and attn["proj_right"].numel() == 24 * 4
    assert math.isclose(expected, opt.state_bytes())
