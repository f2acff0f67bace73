"""SSTAdamW: spectral gradients against autograd, factor invariants, sampling schedule, checkpoints, 8-bit states."""

import io

import pytest
import torch

from lowrank_optim.sst import SSTAdamW, spectral_grads

SHAPES = ((24, 16), (16, 24))


def loss_fn(W, x, y):
    return ((x @ W.t() - y) ** 2).sum() + (W**3).sum() * 0.01  # non-quadratic, so G is not rank-limited


def tiny_model(out=24, inp=16, dtype=torch.float32):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(inp, out), torch.nn.Tanh(), torch.nn.Linear(out, 8)).to(dtype)


def make_opt(model, rank=4, **kw):
    mats = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return SSTAdamW([{"params": mats, "rank": rank}, {"params": rest}], **kw)


def batch(step, inp=16):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, inp, generator=g), torch.randn(32, 8, generator=g)


def train(model, opt, steps, start=0):
    losses = []
    dtype = model[0].weight.dtype
    for t in range(start, start + steps):
        x, y = (v.to(dtype) for v in batch(t, model[0].in_features))
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def factors(opt, p):
    st = opt.state[p]
    return st["sst_U"].float(), st["sst_sigma"].float(), st["sst_V"].float()


@pytest.mark.parametrize("shape", SHAPES)
def test_spectral_grads_match_autograd(shape):
    m, n = shape
    k = min(m, n)
    x, y = torch.randn(10, n, dtype=torch.float64), torch.randn(10, m, dtype=torch.float64)
    W0 = torch.randn(m, n, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(W0, full_matrices=False)
    U, S, V = (t.clone().requires_grad_() for t in (u, s, vh.t()))
    loss_fn(U @ torch.diag(S) @ V.t(), x, y).backward()
    W = W0.clone().requires_grad_()
    loss_fn(W, x, y).backward()
    idx = torch.tensor([0, 3, k - 1])
    g_sigma, g_u, g_v = spectral_grads(W.grad, u, vh.t(), idx)
    torch.testing.assert_close(g_sigma, S.grad)
    # SST's enhanced gradients are the exact factor gradients divided by the pair's singular value.
    torch.testing.assert_close(g_u, U.grad[:, idx] / s[idx])
    torch.testing.assert_close(g_v, V.grad[:, idx] / s[idx])


@pytest.mark.parametrize("shape", SHAPES)
def test_first_step_is_adamw_on_the_explicit_factors(shape):
    m, n = shape
    lr, eps = 1e-2, 1e-8
    W = torch.nn.Parameter(torch.randn(m, n))
    x, y = torch.randn(10, n), torch.randn(10, m)
    W0 = W.detach().clone()
    opt = SSTAdamW([{"params": [W], "rank": 4}], lr=lr, eps=eps)
    loss_fn(W, x, y).backward()
    opt.step()
    idx = opt.state[W]["sst_idx"]
    # Reference: autograd through U diag(s) V^T from the same SVD, then AdamW's first step (m/sqrt(v) = g/|g|).
    u, s, vh = torch.linalg.svd(W0, full_matrices=False)
    U, S, V = (t.clone().requires_grad_() for t in (u, s, vh.t()))
    loss_fn(U @ torch.diag(S) @ V.t(), x, y).backward()

    def adam1(p, g):
        return p - lr * g / (g.abs() + eps)

    def unit(c):
        return c / c.norm(dim=0)

    U1, V1 = u.clone(), vh.t().clone()
    U1[:, idx] = unit(adam1(u[:, idx], U.grad[:, idx] / s[idx]))
    V1[:, idx] = unit(adam1(vh.t()[:, idx], V.grad[:, idx] / s[idx]))
    Uo, So, Vo = factors(opt, W)
    torch.testing.assert_close(So, adam1(s, S.grad).clamp_min(0))
    torch.testing.assert_close(Uo, U1)
    torch.testing.assert_close(Vo, V1)


@pytest.mark.parametrize("out,inp", [(24, 16), (16, 24)])
def test_invariants_every_step(out, inp):
    model = tiny_model(out, inp)
    opt = make_opt(model, lr=3e-2, update_proj_gap=3, weight_decay=0.1)
    W = model[0].weight
    for t in range(12):
        train(model, opt, 1, start=t)
        U, s, V = factors(opt, W)
        torch.testing.assert_close(W.detach(), (U * s) @ V.t(), atol=1e-5, rtol=0)
        torch.testing.assert_close(U.norm(dim=0), torch.ones(U.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(V.norm(dim=0), torch.ones(V.shape[1]), atol=1e-5, rtol=0)
        assert bool((s >= 0).all())
        assert U.shape == (out, min(out, inp)) and V.shape == (inp, min(out, inp))


def test_resample_schedule_and_reproducible():
    gap = 3
    runs = []
    for _ in range(2):
        model = tiny_model()
        opt = make_opt(model, lr=1e-2, update_proj_gap=gap, sst_round=2, seed=7)
        W, trace = model[0].weight, []
        for t in range(10):
            train(model, opt, 1, start=t)
            st = opt.state[W]
            trace.append(
                (
                    st["sst_idx"].clone(),
                    st["proj_refreshes"],
                    st["sst_svds"],
                    int(st["adam_U.moment_step"]),
                    int(st["adam_sigma.moment_step"]),
                )
            )  # counters are device tensors updated in place
        runs.append(trace)
    for a, b in zip(*runs):
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    for t, (idx, draws, svds, vec_steps, sig_steps) in enumerate(runs[0]):
        assert draws == t // gap + 1  # a draw at steps 0, gap, 2 gap, ...
        assert svds == (draws - 1) // 2 + 1  # a re-SVD every sst_round=2 draws
        assert vec_steps == t % gap + 1  # sampled vectors start fresh at each draw
        assert sig_steps == (t % (2 * gap)) + 1  # sigma's moments restart only with a re-SVD
        assert idx.numel() == 4 and idx.unique().numel() == 4
    idxs = [tr[0] for tr in runs[0]]
    assert all(torch.equal(idxs[t], idxs[t - 1]) for t in range(1, 10) if t % gap)
    # A different seed draws a different sequence (6 equal draws of 4 out of 16 are practically impossible).
    model = tiny_model()
    other = make_opt(model, lr=1e-2, update_proj_gap=1, seed=8)
    train(model, other, 6)
    ref_model = tiny_model()
    ref = make_opt(ref_model, lr=1e-2, update_proj_gap=1, seed=7)
    train(ref_model, ref, 6)
    assert not torch.equal(model[0].weight, ref_model[0].weight)


def assert_same_run(model, opt, model2, opt2):
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert opt.state[p].keys() == opt2.state[q].keys()
        for key, v in opt.state[p].items():
            w = opt2.state[q][key]
            assert (v.dtype == w.dtype and torch.equal(v, w)) if torch.is_tensor(v) else v == w


@pytest.mark.parametrize("dtype,extra", [(torch.float32, {}), (torch.bfloat16, {"factor_dtype": "bfloat16"})])
def test_resume_mid_interval_is_bitwise(dtype, extra):
    kw = dict(lr=1e-2, update_proj_gap=3, sst_round=2, weight_decay=0.01, **extra)
    model = tiny_model(dtype=dtype)
    opt = make_opt(model, **kw)
    train(model, opt, 4)  # 4 = mid-interval: the next draw is at step 6, the next re-SVD at step 12
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 10, start=4)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = tiny_model(dtype=dtype)
    model2.load_state_dict(ckpt["model"])
    opt2 = make_opt(model2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state[model2[0].weight]["sst_idx"].dtype == torch.int64
    assert opt2.state[model2[0].weight]["adam_sigma.exp_avg"].dtype == torch.float32
    train(model2, opt2, 10, start=4)
    assert_same_run(model, opt, model2, opt2)


def test_loss_decreases():
    torch.manual_seed(0)
    teacher = torch.randn(24, 16) / 4
    x = torch.randn(256, 16)
    y = x @ teacher.t()
    W = torch.nn.Parameter(torch.randn(24, 16) * 0.1)
    opt = SSTAdamW([{"params": [W], "rank": 4}], lr=2e-2, update_proj_gap=10)
    losses = []
    for _ in range(150):
        loss = ((x @ W.t() - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_state_bits_8():
    def run(W, opt, steps, start):
        losses = []
        for t in range(start, start + steps):
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(64, 48, generator=g), torch.randn(64, 512, generator=g)
            loss = ((x @ W.t() - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    def build(W):
        return SSTAdamW([{"params": [W], "rank": 8}], lr=1e-2, update_proj_gap=2, state_bits=8)

    W = torch.nn.Parameter(torch.randn(512, 48) * 0.05)
    W0 = W.detach().clone()
    opt = build(W)
    losses = run(W, opt, 3, 0)
    st = opt.state[W]
    assert st["adam_U.exp_avg_codes"].dtype == torch.uint8  # 512 x 8 = 4096 entries: 8-bit
    assert "adam_V.exp_avg" in st  # 48 x 8 entries: too small to quantise, fp32
    buf = io.BytesIO()
    torch.save({"W": W.detach(), "opt": opt.state_dict()}, buf)
    losses += run(W, opt, 3, 3)
    U, s, V = factors(opt, W)
    torch.testing.assert_close(W.detach(), (U * s) @ V.t(), atol=1e-5, rtol=0)
    assert losses[-1] < losses[0]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    W2 = torch.nn.Parameter(W0)
    W2.data.copy_(ckpt["W"])
    opt2 = build(W2)
    opt2.load_state_dict(ckpt["opt"])
    run(W2, opt2, 3, 3)
    assert torch.equal(W, W2)
    for key, v in opt.state[W].items():
        w = opt2.state[W2][key]
        assert (v.dtype == w.dtype and torch.equal(v, w)) if torch.is_tensor(v) else v == w


def test_dense_params_are_torch_adamw():
    model = tiny_model()
    ref = tiny_model()
    opt = make_opt(model, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.dim() < 2], lr=1e-2, weight_decay=0.1)
    # One step: afterwards the reference's (frozen) matrices differ, and so would the bias gradients.
    for mdl, o in ((model, opt), (ref, ref_opt)):
        x, y = batch(0)
        mdl.zero_grad()
        ((mdl(x) - y) ** 2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        if a.dim() < 2:  # the engine's dense path matches torch's AdamW to rounding
            torch.testing.assert_close(a, b)


def test_weight_decay_shrinks_sigma_like_adamw():
    W = torch.nn.Parameter(torch.randn(24, 16))
    opt = SSTAdamW([{"params": [W], "rank": 4}], lr=0.1, weight_decay=0.5)
    W.grad = torch.zeros_like(W)  # zero gradient: Adam's direction is 0, only decay acts
    s0 = torch.linalg.svdvals(W.detach())
    opt.step()
    torch.testing.assert_close(opt.state[W]["sst_sigma"], s0 * (1 - 0.1 * 0.5))
    torch.testing.assert_close(torch.linalg.svdvals(W.detach()), s0 * 0.95)


def test_bf16_params_and_factors():
    model = tiny_model(dtype=torch.bfloat16)
    opt = make_opt(model, lr=1e-2, update_proj_gap=2, factor_dtype="bfloat16")
    train(model, opt, 5)
    W = model[0].weight
    U, s, V = factors(opt, W)
    assert opt.state[W]["sst_U"].dtype == torch.bfloat16 and W.dtype == torch.bfloat16
    assert torch.equal(W, ((U * s) @ V.t()).to(torch.bfloat16))


def test_conv_weight_and_small_matrices():
    conv = torch.nn.Conv2d(4, 8, 3)
    small = torch.nn.Parameter(torch.randn(3, 30))  # min side 3 <= rank: dense AdamW, with a warning
    with pytest.warns(UserWarning, match="trained densely"):
        opt = SSTAdamW([{"params": [conv.weight, small], "rank": 4}, {"params": [conv.bias]}], lr=1e-2)
    x = torch.randn(2, 4, 6, 6)
    for _ in range(3):
        opt.zero_grad()
        (conv(x).pow(2).mean() + small.pow(2).sum()).backward()
        opt.step()
    U, s, V = factors(opt, conv.weight)
    assert U.shape == (8, 8) and V.shape == (36, 8)
    torch.testing.assert_close(conv.weight.detach().reshape(8, 36), (U * s) @ V.t(), atol=1e-5, rtol=0)
    assert "sst_U" not in opt.state[small] and "exp_avg" in opt.state[small]


@pytest.mark.parametrize(
    "bad",
    [
        dict(sst_round=0),
        dict(factor_dtype="float64"),
        dict(inner="adafactor"),
        dict(residual="fira"),
        dict(projector="wavelet"),
        dict(sst_weight=1.5),
    ],
)
def test_invalid_options(bad):
    W = torch.nn.Parameter(torch.randn(24, 16))
    with pytest.raises(ValueError):
        SSTAdamW([{"params": [W], "rank": 4}], **bad)


def test_memory_formula():
    W = torch.nn.Parameter(torch.randn(24, 16))
    opt = SSTAdamW([{"params": [W], "rank": 4}], lr=1e-2)
    W.grad = torch.randn_like(W)
    opt.step()
    m, n, k, r = 24, 16, 16, 4
    floats = (m + n + 1) * k + 2 * (m + n) * r + 2 * k
    # fp32 factors and moments + r int64 indices + three fp32 bias-correction counters (sigma, U_S, V_S)
    assert opt.state_bytes() == 4 * floats + 8 * r + 3 * 4


def test_svd_failure(monkeypatch):
    import lowrank_optim.sst as sst_mod
    from lowrank_optim.projectors import ProjectorError

    real = sst_mod.truncated_svd

    def failing(*a, **k):
        raise ProjectorError("no convergence")

    W = torch.nn.Parameter(torch.randn(24, 16))
    W0 = W.detach().clone()
    opt = SSTAdamW([{"params": [W], "rank": 4}], lr=1e-2, update_proj_gap=1, sst_round=1)
    W.grad = torch.randn_like(W)
    monkeypatch.setattr(sst_mod, "truncated_svd", failing)
    with pytest.raises(RuntimeError, match="no parameter was updated"):
        opt.step()  # the first factorisation cannot be skipped
    assert torch.equal(W, W0) and not opt.state[W]
    monkeypatch.setattr(sst_mod, "truncated_svd", real)
    opt.step()
    monkeypatch.setattr(sst_mod, "truncated_svd", failing)
    with pytest.warns(UserWarning, match="keeping the current factors"):
        opt.step()  # a later re-SVD failure keeps the factors and still resamples
    st = opt.state[W]
    assert st["sst_svds"] == 1 and st["proj_refreshes"] == 2 and st["step"] == 2


@pytest.mark.parametrize("projector", ["sst", "svd", "rsvd", "random", "columns", "dct"])
def test_every_projector_chooses_the_trained_pairs(projector):
    """The projector is SST's pair-selection rule: top sigma (svd/rsvd), the pairs most aligned with the gradient
    (dct: |u_i^T G v_i|), uniform (random/columns) or the SST multinomial."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 16))
    opt = SSTAdamW([{"params": [w], "rank": 4, "update_proj_gap": 3, "projector": projector}], lr=1e-2)
    G = torch.randn(24, 16)
    w.grad = G.clone()
    U, s, Vh = torch.linalg.svd(w.detach(), full_matrices=False)
    opt.step()
    idx = opt.state[w]["sst_idx"]
    assert idx.numel() == 4 and idx.unique().numel() == 4
    if projector in ("svd", "rsvd"):
        assert idx.tolist() == [0, 1, 2, 3]  # singular values come sorted
    if projector == "dct":
        aligned = ((U.t() @ G) * Vh).sum(1).abs()
        assert idx.tolist() == sorted(torch.topk(aligned, 4).indices.tolist())
    for _ in range(5):
        w.grad = torch.randn(24, 16)
        opt.step()
    st = opt.state[w]
    rebuilt = (st["sst_U"] * st["sst_sigma"]) @ st["sst_V"].t()
    assert torch.allclose(w.detach(), rebuilt, atol=1e-5)
