"""First-use self-check of the Triton kernels, simulated on CPU: with the test-only switch ``CPU_AS_DEVICE`` the
"auto" backend treats CPU tensors (Triton interpreter) like CUDA ones.  A kernel that fails (raises, or returns
wrong values) warns once and the torch path is used from then on; a forced "triton" backend raises instead."""

import warnings

import pytest
import torch

from lowrank_optim import GaLoreAdamW, quant
from lowrank_optim.quant import dispatch

pytest.importorskip("triton")

from lowrank_optim.kernels import adam8bit, interpreter_enabled, projection, quant8, selfcheck

if not interpreter_enabled():
    pytest.skip("simulates a device through the Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)


@pytest.fixture
def device_like_cpu(monkeypatch):
    monkeypatch.setattr(dispatch, "CPU_AS_DEVICE", True)
    dispatch.reset_self_checks()
    quant.set_backend("auto")
    yield
    dispatch.reset_self_checks()
    quant.set_backend("auto")


def _counting(monkeypatch, module, name, replacement=None):
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return (replacement or real)(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_passing_kernel_is_checked_once_then_used(device_like_cpu, monkeypatch):
    checks = _counting(monkeypatch, selfcheck, "run")
    kernel = _counting(monkeypatch, quant8, "quantize_blockwise_triton")
    x = torch.randn(1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a good kernel
        for _ in range(3):
            codes, absmax = quant.quantize_blockwise(x, True)
    ref = quant.quantize_blockwise_torch(x, True)
    assert torch.equal(codes, ref[0]) and torch.equal(absmax, ref[1])
    assert len(checks) == 1  # per kernel, device, dtypes and variant
    assert len(kernel) == 1 + 3  # the self-check's own call, then every real call
    quant.quantize_blockwise(x, False)  # another variant: checked separately
    assert len(checks) == 2


def test_raising_kernel_warns_once_and_falls_back(device_like_cpu, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile error")

    kernel = _counting(monkeypatch, quant8, "quantize_blockwise_triton", broken)
    x = torch.randn(700)
    with pytest.warns(RuntimeWarning, match="quantize_blockwise.*simulated compile error"):
        codes, absmax = quant.quantize_blockwise(x, True)
    ref = quant.quantize_blockwise_torch(x, True)
    assert torch.equal(codes, ref[0]) and torch.equal(absmax, ref[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: silent from then on
        quant.quantize_blockwise(x, True)
    assert len(kernel) == 1  # only the self-check ever called it


def test_wrong_adam_codes_fall_back_to_torch(device_like_cpu, monkeypatch):
    real = adam8bit.adam8bit_step_triton

    def off_by_one(grad, m_codes, *rest, **kwargs):
        out = real(grad, m_codes, *rest, **kwargs)
        m_codes.view(-1)[:10] += 1  # a few wrong codes
        return out

    monkeypatch.setattr(adam8bit, "adam8bit_step_triton", off_by_one)
    shape = (40, 130)
    state = [*quant.zero_state(shape, True), *quant.zero_state(shape, False)]
    ref_state = [t.clone() for t in state]
    g = torch.randn(shape)
    with pytest.warns(RuntimeWarning, match="adam8bit_step.*codes differ"):
        d = quant.adam8bit_step(g, *state, 0.9, 0.999, 1e-8)
    assert torch.equal(d, quant.adam8bit_step_torch(g, *ref_state, 0.9, 0.999, 1e-8))
    assert all(torch.equal(a, b) for a, b in zip(state, ref_state))


def _galore_run(steps=3):
    gen = torch.Generator().manual_seed(0)
    weights = [
        torch.nn.Parameter(torch.randn(40, 64, generator=gen)),
        torch.nn.Parameter(torch.randn(64, 40, generator=gen)),
    ]
    grads = [[torch.randn(p.shape, generator=gen) for p in weights] for _ in range(steps)]
    opt = GaLoreAdamW([{"params": weights, "rank": 8, "update_proj_gap": 2}], lr=1e-2, weight_decay=0.1)
    for gs in grads:
        for p, g in zip(weights, gs):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in weights]


def test_wrong_fused_update_is_caught_and_the_step_stays_exact(device_like_cpu, monkeypatch):
    real = projection.project_back_apply_dense_triton

    def drifting(W, *args, **kwargs):
        out = real(W, *args, **kwargs)
        W.add_(1e-3)
        return out

    kernel = _counting(monkeypatch, projection, "project_back_apply_dense_triton", drifting)
    with pytest.warns(RuntimeWarning, match="project_back_apply_dense"):
        got = _galore_run()
    quant.set_backend("torch")
    ref = _galore_run()
    assert all(torch.equal(a, b) for a, b in zip(got, ref))  # every step took the torch path
    assert 1 <= len(kernel) <= 2  # only self-checks (one per side) called it


def test_forced_triton_raises_on_a_failing_kernel(device_like_cpu, monkeypatch):
    monkeypatch.setattr(quant8, "dequantize_blockwise_triton", lambda codes, absmax, signed: torch.zeros(codes.shape))
    quant.set_backend("triton")
    codes, absmax = quant.quantize_blockwise_torch(torch.randn(600), True)
    with pytest.raises(RuntimeError, match="dequantize_blockwise.*self-check"):
        quant.dequantize_blockwise(codes, absmax, True)


def test_every_real_kernel_passes_its_self_check():
    for name, dtypes, variant in selfcheck.DEFAULT_CASES:
        err = selfcheck.run(name, "cpu", dtypes, variant)
        assert err == err and err >= 0.0, name  # a number (max error), no exception


def test_self_check_catches_mismatch_directly(monkeypatch):
    monkeypatch.setattr(
        projection, "project_rows_triton", lambda G, B, idx, side: projection.project_rows_torch(G, B, idx, side) * 1.01
    )
    with pytest.raises(selfcheck.KernelMismatch, match="project_rows"):
        selfcheck.run("project_rows", "cpu", (torch.float32, torch.float32), "right")
    with pytest.raises(ValueError, match="no self-check"):
        selfcheck.run("nope", "cpu", (), None)
