"""Converting galore-torch / fira / torch.optim checkpoints: a run resumed here continues as the source would.

Each resume test trains with the reference package, saves its optimizer state, converts it, loads it into our
optimizer and continues both for steps that include a basis refresh; the weights must agree as closely as the
parity tests of the two implementations do (weight decay 0 for galore-torch: it decays after the update, we before).
"""

import io
import warnings

import pytest
import torch
from helpers import TinyNet, batches, params_of, rel_err, train

from lowrank_optim import FiraAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, quant
from lowrank_optim.convert import convert_state_dict, detect_source, foreign_state_message
from lowrank_optim.groups import lowrank_param_groups

galore_torch = pytest.importorskip("galore_torch")
fira = pytest.importorskip("fira")

GAP = 5  # bases at steps 0, 5, 10, ...: resuming at 5 or 7 and running 8 more steps crosses the refresh at 10


def _groups(model, proj_type="std", scale_key="scale"):
    # attn is 40 x 24 (tall), mlp 24 x 40 (wide), mlp2 24 x 24 (square); the rest is dense
    groups = lowrank_param_groups(model, ["attn", "mlp"], rank=4, update_proj_gap=GAP, scale=0.25, proj_type=proj_type)
    groups[0][scale_key] = groups[0].pop("scale")
    return groups


def _save_load(obj, weights_only):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


def _resume(make_ref, make_ours, groups_of, before, after=8, use_optimizer=True):
    """(reference weights, our weights, our optimizer) after ``before`` reference steps and ``after`` more each."""
    data = batches(before + after)
    torch.manual_seed(0)
    model = TinyNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # galore-torch / fira: HF AdamW deprecation notice
        ref = make_ref(groups_of(model))
    train(model, ref, data[:before])
    saved = _save_load({"model": model.state_dict(), "opt": ref.state_dict()}, weights_only=False)

    torch.manual_seed(1)  # different initial weights: everything must come from the checkpoint
    model2 = TinyNet()
    model2.load_state_dict(saved["model"])
    ours = make_ours(groups_of(model2))
    converted = convert_state_dict(saved["opt"], optimizer=ours if use_optimizer else None)
    assert detect_source(converted) == "lowrank_optim" and foreign_state_message(converted) is None
    ours.load_state_dict(_save_load(converted, weights_only=True))  # tensors and numbers only
    train(model, ref, data[before:])
    train(model2, ours, data[before:])
    return params_of(model), params_of(model2), ours


def _assert_close(ref, ours, tol=1e-6):
    for name, value in ours.items():
        assert rel_err(value, ref[name]) < tol, (name, rel_err(value, ref[name]))


def _assert_equal(ref, ours):
    """galore-torch / fira AdamW: the parity mode (eps_style "galore", set by the conversion) is bitwise exact."""
    for name, value in ours.items():
        assert torch.equal(value, ref[name]), (name, rel_err(value, ref[name]))


@pytest.mark.parametrize(
    "proj_type,before,use_optimizer",
    [("std", 7, True), ("std", 5, False), ("reverse_std", 7, False), ("left", 7, True), ("right", 5, True)],
)
def test_galore_torch_adamw_resumes_here(proj_type, before, use_optimizer):
    ref, ours, opt = _resume(
        lambda g: galore_torch.GaLoreAdamW(g, lr=1e-2),
        lambda g: GaLoreAdamW(g, lr=1e-2, fused=False),  # the bitwise dense path (see test_galore_parity)
        lambda m: _groups(m, proj_type),
        before,
        use_optimizer=use_optimizer,
    )
    _assert_equal(ref, ours)
    low = opt.param_groups[0]["params"]
    assert all(opt.state[p]["step"] == before + 8 and opt.state[p]["proj_refreshes"] == 3 for p in low)


def test_galore_torch_full_projection_resumes_here():
    ref, ours, _ = _resume(
        lambda g: galore_torch.GaLoreAdamW(g, lr=1e-2),
        lambda g: GaLoreAdamW(g, lr=1e-2, fused=False),  # the bitwise dense path (see test_galore_parity)
        lambda m: _groups(m, "full"),
        7,
    )
    _assert_equal(ref, ours)


@pytest.mark.parametrize("proj_type,use_optimizer", [("std", True), ("reverse_std", False)])
def test_fira_resumes_here(proj_type, use_optimizer):
    ref, ours, opt = _resume(
        lambda g: fira.FiraAdamW(g, lr=1e-2),
        lambda g: FiraAdamW(g, lr=1e-2, fused=False),
        lambda m: _groups(m, proj_type, "alpha"),
        7,
        use_optimizer=use_optimizer,
    )
    _assert_equal(ref, ours)
    group = opt.param_groups[0]
    assert group["residual"] == "fira" and group["scale"] == 0.25 and "alpha" not in group


@pytest.mark.parametrize("options", [dict(lr=None, relative_step=True), dict(lr=1e-2, relative_step=False, beta1=0.9)])
def test_galore_torch_adafactor_resumes_here(options):
    ref, ours, opt = _resume(
        lambda g: galore_torch.GaLoreAdafactor(g, **options), lambda g: GaLoreAdafactor(g, **options), _groups, 7
    )
    _assert_close(ref, ours, 1e-5)  # the parity tests' bound for Adafactor
    assert all("RMS" not in st and st["moment_step"] == 15 for st in opt.state.values())


def test_torch_adamw_resumes_here():
    def dense(model):
        return [{"params": list(model.parameters())}]

    ref, ours, opt = _resume(
        lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.05), lambda g: GaLoreAdamW(g, lr=1e-3), dense, 6
    )
    _assert_close(ref, ours)
    group = opt.param_groups[0]
    assert group["eps"] == 1e-8 and group["weight_decay"] == 0.05 and group["eps_style"] == "torch"
    # dense Adam state is torch.optim.AdamW's: a float32 step tensor beside the moments
    assert all(st["step"].dtype == torch.float32 and float(st["step"]) == 14 for st in opt.state.values())


def _trained(make, groups_of=_groups, steps=3):
    torch.manual_seed(0)
    model = TinyNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        opt = make(groups_of(model))
    train(model, opt, batches(steps))
    return model, opt


def test_state_mapping_of_a_galore_torch_checkpoint():
    """Keys, counters and the basis orientation, read directly: right side stores Vh^T, left side U."""
    _, ref = _trained(lambda g: galore_torch.GaLoreAdamW(g, lr=1e-2), steps=7)
    sd = ref.state_dict()
    out = convert_state_dict(sd)
    tall, wide = 0, 1  # attn (40 x 24: std projects the right side), mlp (24 x 40: left side)
    proj_tall, proj_wide = sd["state"][tall]["projector"], sd["state"][wide]["projector"]
    assert torch.equal(out["state"][tall]["proj_right"], proj_tall.ortho_matrix.t())
    assert out["state"][tall]["proj_right"].shape == (24, 4) and "proj_left" not in out["state"][tall]
    assert torch.equal(out["state"][wide]["proj_left"], proj_wide.ortho_matrix)
    assert out["state"][wide]["proj_left"].shape == (24, 4) and "proj_right" not in out["state"][wide]
    for pid, st in out["state"].items():
        src = sd["state"][pid]
        assert torch.equal(st["exp_avg"], src["exp_avg"]) and torch.equal(st["exp_avg_sq"], src["exp_avg_sq"])
        if "proj_refreshes" in st:
            assert st["step"] == st["moment_step"] == 7
            assert st["proj_refreshes"] == 2  # bases at steps 0 and 5
        else:  # a dense parameter: torch.optim.AdamW's state layout
            assert float(st["step"]) == 7 and "moment_step" not in st
    group = out["param_groups"][0]
    assert (group["rank"], group["update_proj_gap"], group["scale"], group["proj_type"]) == (4, GAP, 0.25, "std")
    assert (group["inner"], group["residual"], group["eps_style"], group["projector"]) == (
        "adam",
        "none",
        "galore",
        "svd",
    )


def test_fira_scaling_grad_becomes_the_previous_residual_norm():
    _, ref = _trained(lambda g: fira.FiraAdamW(g, lr=1e-2), lambda m: _groups(m, scale_key="alpha"))
    sd = ref.state_dict()
    out = convert_state_dict(sd)
    for pid in sd["param_groups"][0]["params"]:
        prev = out["state"][pid]["fira_prev_norm"]
        assert prev.shape == () and prev.dtype == torch.float32
        assert prev.item() == pytest.approx(float(sd["state"][pid]["scaling_grad"]), rel=0, abs=0)
    assert out["param_groups"][0]["fira_gamma"] == 1.01


def test_detect_source_and_messages():
    cases = {
        "galore-torch": lambda g: galore_torch.GaLoreAdamW(g, lr=1e-2),
        "fira": lambda g: fira.FiraAdamW([{**g[0], "alpha": g[0].pop("scale")}, *g[1:]], lr=1e-2),
        "lowrank_optim": lambda g: GaLoreAdamW(g, lr=1e-2),
        "torch": lambda g: torch.optim.AdamW([p for grp in g for p in grp["params"]], lr=1e-2),
    }
    for source, make in cases.items():
        for steps in (0, 2):  # before any step only the group keys tell
            _, opt = _trained(make, steps=steps)
            sd = opt.state_dict()
            assert detect_source(sd) == source, (source, steps)
            message = foreign_state_message(sd)
            if source == "lowrank_optim":
                assert message is None
            else:
                assert "lowrank_optim.convert_state_dict(sd)" in message and source.split("-")[0] in message
    assert detect_source({"state": {}, "param_groups": [{"params": [0], "lr": 0.1, "momentum": 0.9}]}) is None
    assert "not a lowrank_optim optimizer state dict" in foreign_state_message({"foo": 1})


def test_own_format_is_returned_unchanged():
    _, opt = _trained(lambda g: GaLoreAdamW(g, lr=1e-2))
    sd = opt.state_dict()
    out = convert_state_dict(sd)
    assert out["param_groups"] == sd["param_groups"] and out["state"].keys() == sd["state"].keys()
    assert all(out["state"][k] is sd["state"][k] for k in sd["state"])
    with pytest.raises(ValueError, match="source='galore-torch', but the dict is in lowrank_optim format"):
        convert_state_dict(sd, source="galore-torch")


def test_moments_take_the_target_storage():
    """Loaded into an 8-bit optimizer, the fp32 moments are stored as that optimizer would store them."""
    _, ref = _trained(lambda g: galore_torch.GaLoreAdamW(g, lr=1e-2))
    sd = ref.state_dict()
    torch.manual_seed(0)
    model = TinyNet()
    ours = GaLoreAdamW8bit(_groups(model), lr=1e-2, weight_decay=0.0, min_8bit_size=64)
    out = convert_state_dict(sd, optimizer=ours)
    head = len(sd["param_groups"][0]["params"])  # the first dense parameter: the 50 x 24 embedding
    st = out["state"][head]
    assert "exp_avg" not in st and st["exp_avg_codes"].dtype == torch.uint8
    back = quant.dequantize_blockwise(st["exp_avg_codes"], st["exp_avg_absmax"], signed=True)
    assert rel_err(back, sd["state"][head]["exp_avg"]) < 0.05
    ours.load_state_dict(out)
    train(model, ours, batches(2))  # and it trains on


def test_unconvertible_dicts_raise_clear_errors():
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        convert_state_dict({"foo": 1})
    w = torch.nn.Parameter(torch.randn(4, 3))
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.ones_like(w)
    sgd.step()
    with pytest.raises(ValueError, match="unrecognised optimizer state dict.*momentum_buffer"):
        convert_state_dict(sgd.state_dict())
    adam = torch.optim.Adam([w], lr=0.1, weight_decay=0.1)
    adam.step()
    with pytest.raises(ValueError, match="param group 0: torch.optim.Adam's weight decay is an L2 term"):
        convert_state_dict(adam.state_dict())
    amsgrad = torch.optim.AdamW([w], amsgrad=True)
    amsgrad.step()
    with pytest.raises(ValueError, match="amsgrad"):
        convert_state_dict(amsgrad.state_dict())
    torch.manual_seed(0)
    galore8 = galore_torch.GaLoreAdamW8bit(_groups(TinyNet()), lr=1e-2).state_dict()  # bitsandbytes states
    assert detect_source(galore8) == "galore-torch" and "cannot be converted" in foreign_state_message(galore8)
    with pytest.raises(ValueError, match="param group 0: bitsandbytes 8-bit states"):
        convert_state_dict(galore8)
    with pytest.raises(ValueError, match="invalid source 'galore'"):
        convert_state_dict(adam.state_dict(), source="galore")


def test_mismatched_optimizer_is_refused():
    _, ref = _trained(lambda g: galore_torch.GaLoreAdamW(g, lr=1e-2))
    sd = ref.state_dict()
    torch.manual_seed(0)
    model = TinyNet()
    with pytest.raises(ValueError, match="param group 0: the checkpoint's rank is 4, the optimizer's 8"):
        convert_state_dict(sd, optimizer=GaLoreAdamW(lowrank_param_groups(model, ["attn", "mlp"], rank=8)))
    with pytest.raises(ValueError, match="param group 0: the checkpoint has 3 parameters, the optimizer 1"):
        convert_state_dict(sd, optimizer=GaLoreAdamW(lowrank_param_groups(model, ["attn"], rank=4)))
    # the same number of parameters, in another order: shapes do not fit
    groups = _groups(model)
    groups[0]["params"] = groups[0]["params"][::-1]
    with pytest.raises(ValueError, match=r"param group 0, parameter id 0: the checkpoint's weight has shape"):
        convert_state_dict(sd, optimizer=GaLoreAdamW(groups))
    dense = list(model.parameters())
    adamw = torch.optim.AdamW(dense)
    train(model, adamw, batches(1))
    moved = r"parameter id 1: the saved moments have shape \(40, 24\), the optimizer's parameter \(24,\)"
    with pytest.raises(ValueError, match=moved):
        convert_state_dict(adamw.state_dict(), optimizer=GaLoreAdamW(dense[::-1]))
    # torch AdamW trained everything densely: its full-size moments do not fit a low-rank group
    adamw = torch.optim.AdamW([{"params": g["params"]} for g in _groups(model)])
    with pytest.raises(ValueError, match="param group 0: the checkpoint's rank is None, the optimizer's 4"):
        convert_state_dict(adamw.state_dict(), optimizer=GaLoreAdamW(_groups(model)))
