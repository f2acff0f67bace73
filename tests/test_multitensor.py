"""The multi-tensor core: dense groups equal torch's AdamW per implementation, steps gated on the device (no host
read between refreshes, no graph break under torch.compile), odd layouts and dtypes, copies."""

import copy
import pickle

import pytest
import torch
import torch._dynamo as dynamo

import lowrank_optim as lo
from tests.helpers import TinyNet, batches, loss_of, lowrank_groups_for, params_of, rel_err, train


def _dense_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((7, 5), (11,), (3, 4, 2))]


def _run(opt_factory, steps=30, seed=0):
    params = _dense_params(seed)
    opt = opt_factory(params)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("wd,maximize", [(0.0, False), (0.1, True)])
def test_dense_groups_equal_torch_adamw_per_implementation(impl, wd, maximize):
    kw = dict(lr=1e-2, weight_decay=wd, maximize=maximize)
    ours, _ = _run(lambda ps: lo.LowRankOptimizer(ps, fused=(impl == "fused"), foreach=(impl == "foreach"), **kw))
    ref, _ = _run(lambda ps: torch.optim.AdamW(ps, fused=(impl == "fused"), foreach=(impl == "foreach"), **kw))
    for a, b in zip(ours, ref):
        if impl == "fused":
            assert torch.equal(a, b)  # the same kernel, the same inputs
        else:
            assert rel_err(a, b) < 1e-6


def test_fused_dense_state_is_torch_adamw_state():
    ours, opt = _run(lambda ps: lo.LowRankOptimizer(ps, lr=1e-2), steps=3)
    ref, topt = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0, fused=True), steps=3)
    for p, q in zip(ours, ref):
        a, b = opt.state[p], topt.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_projected_moments_step_in_one_multi_tensor_call(monkeypatch):
    model = TinyNet()
    opt = lo.GaLoreAdamW(lowrank_groups_for(model), lr=1e-2)
    calls = {}

    def spy(name):
        real = getattr(torch, name)

        def counted(*args, **kw):
            calls.setdefault(name, []).append(len(args[0]))
            return real(*args, **kw)

        return counted

    for name in ("_foreach_addcmul_", "_fused_adamw_"):  # the list path, or torch's fused kernel (the default)
        monkeypatch.setattr(torch, name, spy(name))
    train(model, opt, batches(1))
    lowrank = sum(1 for g in opt.param_groups if "rank" in g for p in g["params"] if lo.optimizer.is_lowrank(g, p))
    # v <- b2 v + (1 - b2) R*R over every projected moment at once: one fused call by default (dense ones: another)
    assert lowrank >= 3 and lowrank in calls["_fused_adamw_"] and "_foreach_addcmul_" not in calls
    calls.clear()
    opt = lo.GaLoreAdamW(lowrank_groups_for(model), lr=1e-2, fused=False)
    train(model, opt, batches(1))
    assert lowrank in calls["_foreach_addcmul_"] and lowrank not in calls.get("_fused_adamw_", [])  # list path


@pytest.mark.parametrize(
    "make",
    [
        lambda groups: lo.GaLoreAdamW(groups, lr=1e-2),
        lambda groups: lo.FiraAdamW(groups, lr=1e-2),  # galore-style eps, the factored residual
        lambda groups: lo.GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=16),
    ],
    ids=["galore", "fira", "galore8bit"],
)
def test_chunked_moments_reuse_scratch_and_change_no_bit(monkeypatch, make):
    """Moments step in chunks of parameters whose directions share one scratch buffer, reused by the next chunk.
    One parameter per chunk (every buffer reused many times, a late parameter with its own step count in the
    same chunks) gives bit for bit the weights and state of one chunk for everything."""
    from lowrank_optim import route

    def run(chunk):
        monkeypatch.setattr(route, "CHUNK_ELEMENTS", chunk)
        torch.manual_seed(0)
        model = TinyNet()
        extra = torch.nn.Parameter(torch.randn(20, 16))
        opt = make(lowrank_groups_for(model))
        train(model, opt, batches(3))
        opt.add_param_group(dict(params=[extra], rank=4, update_proj_gap=2))  # 3 steps behind the others
        gen = torch.Generator().manual_seed(5)
        for idx in batches(4, seed=2):
            opt.zero_grad(set_to_none=True)
            loss_of(model, idx).backward()
            extra.grad = torch.randn(extra.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in [*model.parameters(), extra]], opt

    one, opt_one = run(1 << 40)
    many, opt_many = run(1)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    for a, b in zip(opt_one.state.values(), opt_many.state.values()):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]


def test_nonfinite_off_reads_no_gradient_twice_and_steps_as_torch(monkeypatch):
    """``nonfinite="off"``: no flag reduction over the gradients or the projected gradients (the read a loop that
    checks already, as GradScaler does, pays twice), the same steps as the default on finite gradients, and, as in
    torch.optim, a NaN gradient reaches the weights."""
    reductions = []
    for name in ("aminmax", "_foreach_norm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, real=real, name=name, **k: reductions.append(name) or real(*a, **k))
    runs = {}
    for policy in ("skip", "off"):
        torch.manual_seed(0)
        model = TinyNet()
        opt = lo.GaLoreAdamW(lowrank_groups_for(model, update_proj_gap=3), lr=1e-2, nonfinite=policy)
        reductions.clear()
        train(model, opt, batches(5))
        runs[policy] = ([p.detach().clone() for p in model.parameters()], list(reductions))
    assert runs["skip"][1] and not runs["off"][1]
    for a, b in zip(runs["skip"][0], runs["off"][0]):
        assert torch.equal(a, b)
    dense = _dense_params()
    opt = lo.LowRankOptimizer(dense, lr=1e-2, nonfinite="off")
    for p in dense:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert all(torch.isnan(p).all() for p in dense) and opt.skipped_steps == 0
    with pytest.raises(ValueError, match="'off'"):
        lo.LowRankOptimizer(dense, nonfinite="never")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30, 3e38])
def test_overflowing_gradient_skips_between_refreshes_without_touching_anything(bad):
    torch.manual_seed(0)
    model = TinyNet()
    opt = lo.FiraAdamW(lowrank_groups_for(model, update_proj_gap=50), lr=1e-2)
    train(model, opt, batches(2))
    before = params_of(model)
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in opt.state.items()}
    opt.zero_grad()
    loss_of(model, batches(1, seed=9)[0]).backward()
    model.mlp.weight.grad[3, 5] = bad
    with pytest.warns(UserWarning, match="step skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in params_of(model).items())
    for p, st in opt.state.items():
        for k, v in st.items():
            assert torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k], k
    train(model, opt, batches(3, seed=3))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def test_step_between_refreshes_never_reads_the_device(monkeypatch):
    """The non-finite flag stays on the device: no bool()/item() of a tensor in a step between refreshes."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = lo.GaLoreAdamW(lowrank_groups_for(model, update_proj_gap=100), lr=1e-2)
    train(model, opt, batches(1))  # the refresh step
    opt.zero_grad()
    loss_of(model, batches(1, seed=2)[0]).backward()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # take the device path, as on a GPU

    def no_host(self, *a, **k):
        raise AssertionError("host read of a tensor inside the step")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_host)
    monkeypatch.setattr(torch.Tensor, "item", no_host)
    opt.step()
    monkeypatch.undo()
    assert opt.skipped_steps == 0


def test_compiled_step_has_no_graph_break_between_refreshes():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 16))
    b = torch.nn.Parameter(torch.randn(16))
    opt = lo.GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 100}, {"params": [b]}], lr=1e-2)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()  # refresh
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    dynamo.reset()
    explain = dynamo.explain(opt.step)()
    assert explain.graph_break_count == 0, explain.break_reasons


def test_empty_integer_channels_last_and_float64_parameters():
    with pytest.raises(ValueError, match="param group 0: only real floating-point"):
        lo.GaLoreAdamW([torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.int64), requires_grad=False)])
    empty = torch.nn.Parameter(torch.zeros(0, 16))
    conv = torch.nn.Parameter(torch.randn(8, 6, 3, 3).to(memory_format=torch.channels_last))
    w64 = torch.nn.Parameter(torch.randn(20, 12, dtype=torch.float64))
    opt = lo.GaLoreAdamW([{"params": [empty, conv, w64], "rank": 2}], lr=1e-2)
    for p in (empty, conv, w64):
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in (conv, w64)]
    opt.step()
    opt.step()
    assert empty.shape == (0, 16) and conv.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(conv, before[0]) and not torch.equal(w64, before[1])
    assert opt.state[w64]["exp_avg"].dtype == torch.float64  # fp64 moments; the basis is computed in fp32


def test_float64_training_is_float64_accurate():
    """A float64 parameter trained by our dense path equals torch's float64 AdamW (not an fp32 approximation)."""
    p = torch.nn.Parameter(torch.randn(9, 4, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    a, b = lo.LowRankOptimizer([p], lr=1e-2, fused=False), torch.optim.AdamW([q], lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        a.step(), b.step()
    assert rel_err(p, q) < 1e-13


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_optimizer_copies_and_pickles_like_torch(how):
    torch.manual_seed(0)
    model = TinyNet()
    opt = lo.FiraAdamW(lowrank_groups_for(model), lr=1e-2, nonfinite="raise")
    train(model, opt, batches(2))
    twin = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    model2, opt2 = twin
    same = {k: v for k, v in opt2.defaults.items() if k != "differentiable"}  # torch's __setstate__ adds it
    assert opt2.nonfinite == "raise" and same == opt.defaults
    train(model, opt, batches(3, seed=5))
    train(model2, opt2, batches(3, seed=5))
    for (k, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), k
    opt2.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
