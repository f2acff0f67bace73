"""Adaptive refresh gap (Q-GaLore's rule): a basis that barely moved doubles its parameter's gap, up to the cap; the
gap lives in state, so a resume continues exactly."""

import io

import torch

import lowrank_optim as lo


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # a gradient with a fixed dominant subspace plus a little noise: consecutive top-4 bases overlap ~1
    u, v = torch.linalg.qr(torch.randn(32, 4, generator=gen))[0], torch.linalg.qr(torch.randn(24, 4, generator=gen))[0]
    core = u @ torch.diag(torch.tensor([8.0, 6.0, 4.0, 3.0])) @ v.t()
    noise = [0.01 * torch.randn(32, 24, generator=gen) for _ in range(64)]
    return core, noise


def _run(steps, opt_state=None, w0=None):
    core, noise = _problem()
    w = torch.nn.Parameter(torch.zeros(32, 24) if w0 is None else w0.clone())
    opt = lo.GaLoreAdamW(
        [{"params": [w], "rank": 4, "update_proj_gap": 2, "adaptive_gap": True, "max_proj_gap": 8}], lr=1e-2
    )
    if opt_state is not None:
        opt.load_state_dict(opt_state["opt"])
    start = 0 if opt_state is None else opt_state["done"]
    refreshes = []
    for t in range(start, start + steps):
        w.grad = core + noise[t]
        before = int(opt.state[w].get("proj_refreshes", 0)) if w in opt.state else 0
        opt.step()
        if int(opt.state[w]["proj_refreshes"]) > before:
            refreshes.append(t)
    return w, opt, refreshes


def test_stable_subspace_doubles_the_gap_up_to_the_cap():
    w, opt, refreshes = _run(40)
    # gap 2 -> 4 -> 8 (cap): refreshes at steps 0, 2, 6, 14, 22, 30, 38 instead of every 2nd step
    assert refreshes == [0, 2, 6, 14, 22, 30, 38]
    assert opt.state[w]["proj_gap"] == 8
    saved = 1 - len(refreshes) / len(range(0, 40, 2))
    assert saved > 0.6


def test_adaptive_gap_resumes_exactly():
    full, _, _ = _run(30)
    w, opt, _ = _run(11)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "done": 11}, buf)
    buf.seek(0)
    resumed, _, _ = _run(19, opt_state=torch.load(buf, weights_only=True), w0=w.detach())
    assert torch.equal(resumed, full)


def test_a_moving_subspace_keeps_the_gap():
    gen = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.zeros(32, 24))
    opt = lo.GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 2, "adaptive_gap": True}], lr=1e-2)
    for _ in range(12):
        w.grad = torch.randn(32, 24, generator=gen)  # unrelated gradients: random 4-d subspaces of 24 overlap ~1/6
        opt.step()
    assert opt.state[w]["proj_gap"] == 2 and opt.state[w]["proj_refreshes"] == 6
