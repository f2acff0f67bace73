"""8-bit optimizer states in the engine: accuracy against fp32 states, refreshes, checkpoints, every method.

Tolerances (bitsandbytes-like: 8-bit Adam is compared by trajectory, not bitwise):
* with a fixed-seed subspace (``columns``) and 4 refreshes in 100 steps, every weight's total update
  (W_100 - W_0) is within 8% (relative L2) of the fp32-state run, and the final loss within 0.5%;
* with SVD refreshes the chosen basis itself can differ after a few steps (near-equal singular values swap), so
  only the loss is compared there (within 1%);
* fed identical gradients (so identical bases), the dequantized moments after each refresh are within 2% of the
  fp32 moments, for the keep, reset and rotate policies.
"""

import io

import pytest
import torch
from helpers import TinyNet, batches, params_of, rel_err, train

from lowrank_optim import DCTAdamW, FiraAdamW, FrugalAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, SSTAdamW
from lowrank_optim.groups import lowrank_param_groups
from lowrank_optim.inner import Moment


def _run(bits, projector, gap, steps=100):
    torch.manual_seed(0)
    model = TinyNet(d=128)
    start = params_of(model)
    opt = GaLoreAdamW(
        lowrank_param_groups(model, rank=32, update_proj_gap=gap, projector=projector), lr=3e-3, state_bits=bits
    )
    losses = train(model, opt, batches(steps, batch=8, seq=16))
    return start, params_of(model), sum(losses[-10:]) / 10, opt


def test_8bit_galore_tracks_fp32_galore_over_100_steps():
    start, p32, loss32, _ = _run(32, "columns", 25)
    _, p8, loss8, opt = _run(8, "columns", 25)
    for name in p32:
        if p32[name].numel() >= 4096:  # the ones that really are 8-bit
            assert rel_err(p8[name] - start[name], p32[name] - start[name]) < 0.08, name
    assert abs(loss8 - loss32) / loss32 < 0.005
    assert any(Moment.is_quantized(st, "exp_avg") for st in opt.state.values())


def test_8bit_galore_with_svd_refreshes_reaches_the_same_loss():
    _, _, loss32, _ = _run(32, "svd", 25)
    _, _, loss8, _ = _run(8, "svd", 25)
    assert abs(loss8 - loss32) / loss32 < 0.01


@pytest.mark.parametrize(
    "make",
    [
        lambda g, b: GaLoreAdamW(g, lr=1e-2, state_bits=b),  # keep
        lambda g, b: FrugalAdamW(g, lr=1e-2, state_bits=b, projector="svd"),  # reset
        lambda g, b: DCTAdamW(g, lr=1e-2, state_bits=b, update_proj_gap=3, rotate_subspace=True),  # rotate
    ],
    ids=["keep", "reset", "rotate"],
)
def test_refresh_with_8bit_states_behaves_as_with_fp32(make):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(96, 128, generator=gen) + 0.1 * k for k in range(10)]
    moments = {}
    for bits in (32, 8):
        w = torch.nn.Parameter(torch.zeros(96, 128))
        opt = make([{"params": [w], "rank": 48, "update_proj_gap": 3}], bits)
        trace = []
        for g in grads:
            w.grad = g.clone()
            opt.step()
            st = opt.state[w]
            trace.append(Moment.load(st, "exp_avg", True).clone() if Moment.exists(st, "exp_avg") else None)
        moments[bits] = trace
        assert (bits == 8) == Moment.is_quantized(opt.state[w], "exp_avg")
    for m32, m8 in zip(moments[32], moments[8]):
        assert rel_err(m8, m32) < 0.02


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_8bit_state_dict_holds_codes_and_absmax_and_resumes_exactly():
    data = batches(8, batch=8, seq=16)

    def make(dtype=torch.float32):
        torch.manual_seed(0)
        model = TinyNet(d=128).to(dtype)
        return model, GaLoreAdamW8bit(lowrank_param_groups(model, rank=32, update_proj_gap=3), lr=1e-2)

    model, opt = make()
    train(model, opt, data)
    expected = params_of(model)
    model, opt = make()
    train(model, opt, data[:4])
    sd = _roundtrip({"m": model.state_dict(), "o": opt.state_dict()})
    for st in sd["o"]["state"].values():
        for k, v in st.items():
            if k.endswith("_codes"):
                assert v.dtype == torch.uint8
            if k.endswith("_absmax"):
                assert v.dtype == torch.float32
            assert v is None or not isinstance(v, torch.Tensor) or v.numel() != 256 or "map" not in k
    model2, opt2 = make()
    model2.load_state_dict(sd["m"])
    opt2.load_state_dict(sd["o"])
    train(model2, opt2, data[4:])
    assert all(torch.equal(v, expected[k]) for k, v in params_of(model2).items())

    bf_model, bf_opt = make(torch.bfloat16)  # bf16 parameters: codes stay uint8, absmax fp32 after loading
    train(bf_model, bf_opt, data[:2])
    fresh = GaLoreAdamW8bit(lowrank_param_groups(bf_model, rank=32, update_proj_gap=3), lr=1e-2)
    fresh.load_state_dict(_roundtrip(bf_opt.state_dict()))
    st = fresh.state[bf_model.embed.weight]
    assert st["exp_avg_codes"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32


def test_small_tensors_stay_fp32():
    torch.manual_seed(0)
    model = TinyNet(d=128)
    opt = GaLoreAdamW8bit(lowrank_param_groups(model, rank=32), lr=1e-2)
    train(model, opt, batches(1))
    assert opt.state[model.norm.weight]["exp_avg"].dtype == torch.float32  # 128 elements < 4096
    assert opt.state[model.embed.weight]["exp_avg_codes"].dtype == torch.uint8  # 50 x 128 = 6400


@pytest.mark.parametrize(
    "cls,kw",
    [
        (GaLoreAdamW, {"lr": 1e-2}),
        (FiraAdamW, {"lr": 1e-2}),
        (FrugalAdamW, {"projector": "svd", "lr": 1e-2}),
        (DCTAdamW, {"lr": 1e-2}),
        (SSTAdamW, {"lr": 1e-2}),
        (GaLoreAdafactor, {"beta1": 0.9}),
    ],
)
def test_every_method_runs_with_8bit_states(cls, kw):
    torch.manual_seed(0)
    model = TinyNet(d=128)
    opt = cls(lowrank_param_groups(model, rank=32, update_proj_gap=4), state_bits=8, **kw)
    losses = train(model, opt, batches(1, batch=8, seq=16) * 12)  # one batch, fitted: loss must fall
    assert losses[-1] < losses[0]
    assert any(k.endswith("_codes") for st in opt.state.values() for k in st)


def test_galore_adamw8bit_takes_galore_torch_signature():
    w = torch.nn.Parameter(torch.randn(96, 128))
    small = torch.nn.Parameter(torch.randn(64, 32))  # 2048 elements
    opt = GaLoreAdamW8bit(
        [{"params": [w], "rank": 48}, {"params": [small]}],
        1e-3,
        (0.9, 0.999),
        1e-8,
        1e-2,
        False,
        32,
        None,
        1024,
        100,
        True,
        False,
    )  # galore-torch's positional order
    assert opt.defaults["eps"] == 1e-8 and opt.defaults["weight_decay"] == 1e-2
    w.grad, small.grad = torch.randn_like(w), torch.randn_like(small)
    opt.step()
    assert "exp_avg_codes" in opt.state[w] and "exp_avg_codes" in opt.state[small]  # min_8bit_size=1024 honoured
    for bad in (dict(amsgrad=True), dict(percentile_clipping=5), dict(block_wise=False), dict(is_paged=True)):
        with pytest.raises(ValueError, match="bitsandbytes feature"):
            GaLoreAdamW8bit([w], **bad)
    with pytest.raises(ValueError, match="param group 0: invalid min_8bit_size 0"):
        GaLoreAdamW8bit([w], min_8bit_size=0)
