"""FrugalAdamW: an independent in-test reference of the update rule, the rho = 1 / rho = 0 limits, blocks."""

import io
import math

import pytest
import torch

from lowrank_optim.frugal import FrugalAdamW, active_blocks

SHAPES = ((40, 24), (24, 40), (32, 32), (24, 24))
B1, B2 = 0.9, 0.999


def problem(n_weights=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = SHAPES[:n_weights]
    init = [torch.randn(s, generator=gen) * 0.3 for s in shapes]
    data = [(torch.randn(48, s[1], generator=gen), torch.randn(48, s[0], generator=gen)) for s in shapes]

    def grads(ws):
        ws = [w.detach().clone().requires_grad_(True) for w in ws]
        loss = sum(((torch.tanh(x @ w.t()) - y) ** 2).mean() for w, (x, y) in zip(ws, data))
        return torch.autograd.grad(loss, ws)

    return init, grads


def run(init, grads, factory, steps):
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = factory(params)
    for _ in range(steps):
        for p, g in zip(params, grads(params)):
            p.grad = g.clone()
        opt.step()
    return params, opt


def close(a, b, tol=1e-5):
    return ((a.detach() - b).norm() / b.norm()).item() < tol


# ---------------------------------------------------------------------------------------------------- reference
def reference_projected(init, grads, steps, lr, wd, eps, density, gap, scale, inactive_scale, reset):
    """FRUGAL with norm-selected columns (tall: right side) / rows (wide: left side), written from the paper's
    rule with explicit 0/1 selection matrices: Adam on the selected coordinates, signSGD on the rest."""
    ws = [w.clone() for w in init]
    st = [dict() for _ in ws]
    for step in range(steps):
        gs = grads(ws)
        for i, (w, G) in enumerate(zip(ws, gs)):
            s = st[i]
            right = w.shape[0] >= w.shape[1]
            dim = w.shape[1] if right else w.shape[0]
            r = max(1, round(density * dim))
            if step % gap == 0:
                score = G.norm(dim=0) if right else G.norm(dim=1)
                idx = torch.topk(score, r).indices.sort().values
                s["P"] = torch.eye(dim)[:, idx]
                if step == 0 or reset:
                    s["m"] = s["v"] = None
                    s["t"] = 0
            P = s["P"]
            R = G @ P if right else P.t() @ G
            if s["m"] is None:
                s["m"], s["v"] = torch.zeros_like(R), torch.zeros_like(R)
            s["t"] += 1
            s["m"] = B1 * s["m"] + (1 - B1) * R
            s["v"] = B2 * s["v"] + (1 - B2) * R * R
            N = s["m"] / (s["v"].sqrt() + eps)
            bias = math.sqrt(1 - B2 ** s["t"]) / (1 - B1 ** s["t"])
            low = N @ P.t() if right else P @ N
            rest = G - (R @ P.t() if right else P @ R)
            ws[i] = w * (1 - lr * wd) - lr * bias * scale * low - lr * inactive_scale * rest.sign()
    return ws


@pytest.mark.parametrize("reset", [True, False])
def test_matches_independent_reference(reset):
    init, grads = problem(2)
    kw = dict(lr=1e-2, wd=0.1, eps=1e-8, density=0.25, gap=3, scale=0.5, inactive_scale=0.3, reset=reset)
    expected = reference_projected(init, grads, 10, **kw)
    params, opt = run(
        init,
        grads,
        lambda ps: FrugalAdamW(
            [{"params": ps, "density": 0.25}],
            lr=1e-2,
            weight_decay=0.1,
            eps=1e-8,
            update_proj_gap=3,
            proj_params_lr_scale=0.5,
            inactive_lr_scale=0.3,
            reset_statistics=reset,
            select="norm",
        ),
        10,
    )
    for p, e in zip(params, expected):
        assert close(p, e), ((p.detach() - e).norm() / e.norm()).item()
    # 24 of the projected side's 24 -> r = 6 coordinates of Adam state per row / column
    assert [tuple(opt.state[p]["exp_avg"].shape) for p in params] == [(40, 6), (6, 40)]


def reference_blocks(init, grads, steps, lr, wd, eps, active_sets, gap, inactive_scale):
    """Blockwise FRUGAL: the listed matrices get torch-style AdamW (moments restart each period), the rest
    signSGD."""
    ws = [w.clone() for w in init]
    st = [dict() for _ in ws]
    for step in range(steps):
        if step % gap == 0:
            active = active_sets[step // gap]
            st = [
                dict(m=torch.zeros_like(w), v=torch.zeros_like(w), t=0) if i in active else None
                for i, w in enumerate(ws)
            ]
        gs = grads(ws)
        for i, (w, G) in enumerate(zip(ws, gs)):
            w = w * (1 - lr * wd)
            s = st[i]
            if s is None:
                ws[i] = w - lr * inactive_scale * G.sign()
                continue
            s["t"] += 1
            s["m"] = B1 * s["m"] + (1 - B1) * G
            s["v"] = B2 * s["v"] + (1 - B2) * G * G
            denom = s["v"].sqrt() / math.sqrt(1 - B2 ** s["t"]) + eps
            ws[i] = w - lr / (1 - B1 ** s["t"]) * s["m"] / denom
    return ws


def test_blocks_match_independent_reference():
    init, grads = problem(4)
    # descending, 4 matrices, rho 0.5: {3, 2}, then {1, 0}, then {3, 2} again
    expected = reference_blocks(
        init,
        grads,
        10,
        lr=1e-2,
        wd=0.1,
        eps=1e-8,
        active_sets=[{3, 2}, {1, 0}, {3, 2}, {1, 0}],
        gap=3,
        inactive_scale=0.5,
    )
    params, _ = run(
        init,
        grads,
        lambda ps: FrugalAdamW(
            [{"params": ps, "density": 0.5}],
            projector="blocks",
            block_order="descending",
            lr=1e-2,
            weight_decay=0.1,
            update_proj_gap=3,
            inactive_lr_scale=0.5,
        ),
        10,
    )
    for p, e in zip(params, expected):
        assert close(p, e)


def test_block_orders():
    group = {"params": list(range(6)), "density": 0.5, "seed": 0}
    asc = [active_blocks(dict(group, block_order="ascending"), k) for k in range(3)]
    assert asc == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]
    desc = [active_blocks(dict(group, block_order="descending"), k) for k in range(3)]
    assert desc == [[5, 4, 3], [2, 1, 0], [5, 4, 3]]
    mirror = [sorted(active_blocks(dict(group, density=4 / 6, block_order="mirror"), k)) for k in range(3)]
    assert mirror == [[0, 1, 4, 5], [0, 2, 3, 5], [1, 2, 3, 4]]
    rand = [active_blocks(dict(group, block_order="random"), k) for k in range(4)]
    assert all(len(set(a)) == 3 for a in rand) and len({tuple(sorted(a)) for a in rand}) > 1
    assert rand == [active_blocks(dict(group, block_order="random"), k) for k in range(4)]  # seeded
    assert rand != [active_blocks(dict(group, block_order="random", seed=1), k) for k in range(4)]


# ---------------------------------------------------------------------------------------------------- limits
@pytest.mark.parametrize("projector", ["columns", "blocks"])
def test_density_one_without_reset_is_adamw(projector):
    """rho = 1: every coordinate (or block) is state-full for good, so with reset_statistics=False this is
    AdamW. Full-rank matrices take the whole-matrix Adam path, whose eps is torch-style like torch.optim.AdamW,
    so we compare with torch.optim.AdamW itself at its default eps."""
    init, grads = problem(4)
    ref, _ = run(init, grads, lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), 12)
    ours, opt = run(
        init,
        grads,
        lambda ps: FrugalAdamW(
            [{"params": ps, "density": 1.0}],
            projector=projector,
            lr=1e-2,
            weight_decay=0.1,
            update_proj_gap=4,
            reset_statistics=False,
        ),
        12,
    )
    for a, b in zip(ours, ref):
        assert close(a, b.detach(), 1e-6)
    assert all("exp_avg" in opt.state[p] for p in ours)


@pytest.mark.parametrize("projector", ["columns", "svd", "blocks"])
def test_density_zero_is_signsgd(projector):
    init, grads = problem(3)
    lr, wd, scale = 1e-2, 0.1, 0.7
    ws = [w.clone() for w in init]
    for _ in range(8):
        ws = [w * (1 - lr * wd) - lr * scale * g.sign() for w, g in zip(ws, grads(ws))]
    ours, opt = run(
        init,
        grads,
        lambda ps: FrugalAdamW(
            [{"params": ps, "density": 0.0}],
            projector=projector,
            lr=lr,
            weight_decay=wd,
            inactive_lr_scale=scale,
            update_proj_gap=3,
        ),
        8,
    )
    for a, b in zip(ours, ws):
        assert close(a, b, 1e-6)
    assert opt.state_bytes() == 0  # state-free: no tensor anywhere


# ---------------------------------------------------------------------------------------------------- blocks
def tensor_keys(state):
    return sorted(k for k, v in state.items() if isinstance(v, torch.Tensor))


def test_blocks_free_inactive_state():
    init, grads = problem(4)
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = FrugalAdamW(
        [{"params": params, "density": 0.5}], projector="blocks", block_order="ascending", update_proj_gap=2, lr=1e-2
    )
    for step in range(6):
        for p, g in zip(params, grads(params)):
            p.grad = g.clone()
        opt.step()
        active = {0, 1} if (step // 2) % 2 == 0 else {2, 3}
        for i, p in enumerate(params):
            st = opt.state[p]
            assert st["block_active"] == int(i in active)
            # moments and their bias-correction count (a 0-dim fp32 tensor on the device) only while active
            assert tensor_keys(st) == (["exp_avg", "exp_avg_sq", "moment_step"] if i in active else [])
        assert opt.state_bytes() == sum(2 * 4 * params[i].numel() + 4 for i in active)
        for v in (v for st in opt.state.values() for v in st.values()):
            assert isinstance(v, (torch.Tensor, int, float))


@pytest.mark.parametrize("projector", ["blocks", "columns", "svd"])
def test_param_without_grad_at_refresh_is_skipped(projector):
    init, grads = problem(3)
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = FrugalAdamW([{"params": params, "density": 0.5}], projector=projector, update_proj_gap=2, lr=1e-2)
    for step in range(7):
        for i, (p, g) in enumerate(zip(params, grads(params))):
            p.grad = None if (i == 1 and step in (2, 3)) else g.clone()  # missing at a refresh and after
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert opt.state[params[1]]["step"] == 5 and opt.state[params[0]]["step"] == 7


@pytest.mark.parametrize("order", ["random", "mirror"])
def test_blocks_resume_mid_interval_is_exact(order):
    init, grads = problem(4)
    factory = lambda ps: FrugalAdamW(
        [{"params": ps, "density": 0.5}], projector="blocks", block_order=order, update_proj_gap=4, lr=1e-2, seed=3
    )
    params, opt = run(init, grads, factory, 6)  # stop mid-period (periods start at 0, 4, 8)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = factory(resumed)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(7):  # crosses the period boundary at step 8
        for ps, o in ((params, opt), (resumed, opt2)):
            for p, g in zip(ps, grads(ps)):
                p.grad = g.clone()
            o.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- options
def test_group_options_and_validation():
    w = [torch.nn.Parameter(torch.randn(16, 12)) for _ in range(3)]
    b = torch.nn.Parameter(torch.zeros(16))
    opt = FrugalAdamW(
        [{"params": [b]}, {"params": w, "is_proj_params": True, "proj_params_lr_scale": 2.0, "reset_statistics": False}]
    )
    g = opt.param_groups[1]
    assert (g["density"], g["scale"], g["subspace_change"]) == (0.25, 2.0, "keep")
    assert "density" not in opt.param_groups[0]  # untargeted: plain AdamW
    assert opt.defaults["subspace_change"] == "reset" and opt.defaults["projector"] == "columns"
    assert FrugalAdamW(w, density=0.5).param_groups[0]["density"] == 0.5
    with pytest.raises(ValueError, match="density"):
        FrugalAdamW([{"params": w, "density": 1.5}])
    with pytest.raises(ValueError, match="not both"):
        FrugalAdamW([{"params": w, "density": 0.5, "rank": 2}])
    with pytest.raises(ValueError, match="mirror"):
        FrugalAdamW([{"params": w, "density": 1 / 3}], projector="blocks", block_order="mirror")
    with pytest.raises(ValueError, match="block_order"):
        FrugalAdamW([{"params": w, "density": 0.5}], projector="blocks", block_order="sideways")
    with pytest.raises(ValueError, match="blocks"):
        FrugalAdamW([{"params": w, "rank": 2}], projector="blocks")
    with pytest.raises(TypeError):
        FrugalAdamW(w, density=0.5, scale=0.3)


def test_rank_groups_and_per_parameter_rank():
    """A ``rank`` group works as in every other method; a density group sizes r per weight and side."""
    tall, wide = torch.nn.Parameter(torch.randn(40, 24)), torch.nn.Parameter(torch.randn(24, 40))
    opt = FrugalAdamW([{"params": [tall, wide], "density": 0.5, "proj_type": "reverse_std"}], projector="dct")
    # reverse_std: tall -> left (its 40 rows), wide -> right (its 40 columns): r = round(0.5 * 40) = 20 for both
    assert [opt.rank_for(opt.param_groups[0], p) for p in (tall, wide)] == [20, 20]
    for p in (tall, wide):
        p.grad = torch.randn_like(p)
    opt.step()
    assert [tuple(opt.state[p]["exp_avg"].shape) for p in (tall, wide)] == [(20, 24), (24, 20)]
    opt2 = FrugalAdamW([{"params": [tall], "rank": 3}])
    tall.grad = torch.randn_like(tall)
    opt2.step()
    assert tuple(opt2.state[tall]["exp_avg"].shape) == (40, 3)
