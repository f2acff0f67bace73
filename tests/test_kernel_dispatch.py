"""The optimizer's Triton path (chosen on CUDA; forced here through the interpreter) equals its torch path:
fused project-back + apply for explicit and DCT bases, DCT projection by gathered rows, fused 8-bit Adam.
Gradients are fixed in advance, so both paths see the same bases and only the kernels differ."""

import pytest
import torch
from helpers import rel_err

from lowrank_optim import DCTAdamW, FiraAdamW, GaLoreAdamW, quant

pytest.importorskip("triton")

SHAPES = [(40, 64), (64, 40)]  # left and right projections


def _run(backend, make, steps=5):
    quant.set_backend(backend)
    try:
        gen = torch.Generator().manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in SHAPES]
        bias = torch.nn.Parameter(torch.randn(64, 64, generator=gen))  # dense group, 8-bit when asked
        grads = [[torch.randn(p.shape, generator=gen) for p in weights + [bias]] for _ in range(steps)]
        opt = make([{"params": weights, "rank": 8, "update_proj_gap": 2}, {"params": [bias]}])
        for gs in grads:
            for p, g in zip(weights + [bias], gs):
                p.grad = g
            opt.step()
        return [p.detach().clone() for p in weights + [bias]]
    finally:
        quant.set_backend("auto")


@pytest.mark.parametrize(
    "make",
    [
        lambda g: GaLoreAdamW(g, lr=1e-2, weight_decay=0.1),
        lambda g: FiraAdamW(g, lr=1e-2),
        lambda g: DCTAdamW(g, lr=1e-2, weight_decay=0.1),
        lambda g: GaLoreAdamW(g, lr=1e-2, state_bits=8),
    ],
    ids=["galore", "fira", "dct", "galore8bit"],
)
def test_triton_path_equals_torch_path(make):
    for a, b in zip(_run("triton", make), _run("torch", make)):
        assert rel_err(a, b) < 1e-6


def test_forced_backend_really_runs_the_kernels(monkeypatch):
    import lowrank_optim.kernels.projection as projection

    calls = {"dense": 0, "rows": 0}
    real_dense, real_rows = projection.project_back_apply_dense_triton, projection.project_back_apply_triton

    def dense(*a, **k):
        calls["dense"] += 1
        return real_dense(*a, **k)

    def rows(*a, **k):
        calls["rows"] += 1
        return real_rows(*a, **k)

    monkeypatch.setattr(projection, "project_back_apply_dense_triton", dense)
    monkeypatch.setattr(projection, "project_back_apply_triton", rows)
    _run("triton", lambda g: GaLoreAdamW(g, lr=1e-2), steps=1)
    _run("triton", lambda g: DCTAdamW(g, lr=1e-2), steps=1)
    assert calls == {"dense": 2, "rows": 2}
    _run("torch", lambda g: GaLoreAdamW(g, lr=1e-2), steps=1)
    assert calls == {"dense": 2, "rows": 2}
