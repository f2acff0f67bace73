"""Declared options: every option rejects a wrong value naming it; misspelled and misplaced keys raise; free-form
keys pass; the registry drives the constructors and the estimator."""

import math

import pytest
import torch

import lowrank_optim as lo
from lowrank_optim.inner import INNER_RULES
from lowrank_optim.optimizer import ENGINE_OPTIONS, ROUTES, all_options, part_options
from lowrank_optim.projectors import PROJECTORS
from lowrank_optim.registry import METHODS, method
from lowrank_optim.residual import RESIDUAL_RULES

BAD = {  # a wrong value per declared option (by the kind of check it declares)
    "lr": -1.0,
    "weight_decay": float("nan"),
    "maximize": 1,
    "rank": 0,
    "density": 1.5,
    "update_proj_gap": 0,
    "scale": float("inf"),
    "proj_type": "diag",
    "projector": "wavelet",
    "seed": 1.5,
    "subspace_change": "shuffle",
    "inner": "sgd",
    "residual": "magic",
    "route": "teleport",
    "state_bits": 4,
    "state_dtype": "int8",
    "min_8bit_size": 0,
    "fused": "yes",
    "foreach": 2,
    "betas": (0.9, 1.0),
    "eps": float("nan"),
    "correct_bias": "no",
    "eps_style": "hf",
    "fira_gamma": 0.5,
    "fira_residual": "other",
    "fira_floor": -1.0,
    "inactive_update": "adam",
    "inactive_lr_scale": float("nan"),
    "scale_type": "row",
    "scale_front": "no",
    "apollo_gamma": 0.0,
    "oversample": -1,
    "power_iters": -1,
    "dct_norm": "l3",
    "dct_impl": "dft",
    "select": "best",
    "sst_weight": 2.0,
    "block_order": "sideways",
    "sst_round": 0,
    "factor_dtype": "int8",
    "clip_threshold": 0.0,
    "decay_rate": 0.5,
    "beta1": 1.0,
    "scale_parameter": "yes",
    "relative_step": 1,
    "warmup_init": "no",
    "adaptive_gap": "yes",
    "gap_overlap": 1.5,
    "max_proj_gap": 0,
    "basis_bits": 16,
    "basis_sign": "raw",
    "disable_nl": "no",
    "random_style": "gauss",
}

# the parts a group must select for an option to be in play
SELECT = {
    **{o.name: {} for o in ENGINE_OPTIONS},
    **{o.name: {"inner": "adam"} for o in part_options(INNER_RULES["adam"])},
    **{o.name: {"inner": "adafactor", "lr": None} for o in part_options(INNER_RULES["adafactor"])},
    **{o.name: {"residual": n} for n, r in RESIDUAL_RULES.items() for o in part_options(r)},
    **{o.name: {"route": n} for n, r in ROUTES.items() for o in part_options(r)},
    **{o.name: {"projector": n} for n, c in PROJECTORS.items() for o in part_options(c)},
}


def every_option():
    return sorted(all_options())


@pytest.mark.parametrize("name", every_option())
def test_every_declared_option_rejects_a_wrong_value_naming_it(name):
    assert name in BAD, f"add a wrong value for the new option {name!r} to BAD"
    w = torch.nn.Parameter(torch.randn(16, 12))
    group = {"params": [w], "rank": 4, **SELECT[name], name: BAD[name]}
    if name == "density":
        group.pop("rank")
    if (
        name in ("eps", "beta1", "clip_threshold", "decay_rate", "scale_parameter", "relative_step", "warmup_init")
        and group.get("inner") == "adafactor"
    ):
        group.setdefault("relative_step", True)
    with pytest.raises(ValueError) as err:
        lo.LowRankOptimizer([group])
    msg = str(err.value)
    assert "param group 0" in msg and name in msg and repr(BAD[name]) in msg


def test_a_bad_value_set_after_construction_is_refused_at_the_step():
    w = torch.nn.Parameter(torch.randn(16, 12))
    opt = lo.GaLoreAdamW([{"params": [w], "rank": 4}])
    w.grad = torch.randn_like(w)
    for key, value in (
        ("lr", float("nan")),
        ("lr", torch.tensor(float("nan"))),
        ("scale", float("inf")),
        ("weight_decay", float("inf")),
        ("eps", float("nan")),
    ):
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        before = w.detach().clone()
        with pytest.raises(ValueError, match=f"param group 0: invalid {key}"):
            opt.step()
        assert torch.equal(w, before) and len(opt.state[w]) == 0
        opt.param_groups[0][key] = good
    opt.step()
    assert not torch.equal(w, before)


@pytest.mark.parametrize(
    "cls,group,likely",
    [
        (lo.FiraAdamW, dict(rank=4, gamma=0.5), "fira_gamma"),
        (lo.GaLoreAdamW, dict(rank=4, update_proj_gaps=10), "update_proj_gap"),
        (lo.DCTAdamW, dict(ranks=4), "rank"),
        (lo.FiraAdamW, dict(rank=4, fira_gama=1.1), "fira_gamma"),
        (lo.GaLoreAdamW, dict(rank=4, fira_gamma=1.1), "residual 'fira'"),  # misplaced: GaLore has no Fira residual
        (lo.GaLoreAdamW, dict(rank=4, oversample=3), "projector 'rsvd'"),
        (lo.GaLoreAdamW, dict(rank=4, block_order="random"), "projector 'blocks'"),
    ],
)
def test_misspelled_and_misplaced_keys_raise_with_the_likely_option(cls, group, likely):
    w = torch.nn.Parameter(torch.randn(16, 12))
    if likely is None:
        cls([{"params": [w], **group}])
        return
    with pytest.raises(ValueError) as err:
        cls([{"params": [w], **group}])
    msg = str(err.value)
    assert "param group 0" in msg and likely in msg
    assert any(repr(k) in msg for k in group if k != "rank" or "ranks" not in group)


def test_free_form_keys_pass_through_like_torch():
    w = torch.nn.Parameter(torch.randn(16, 12))
    opt = lo.GaLoreAdamW([{"params": [w], "rank": 4, "name": "attn", "tags": ["x"]}])
    assert opt.param_groups[0]["name"] == "attn"
    w.grad = torch.randn_like(w)
    opt.step()


def test_constructor_keys_are_checked_too():
    w = torch.nn.Parameter(torch.randn(16, 12))
    with pytest.raises(TypeError, match="did you mean 'fira_gamma'"):
        lo.FiraAdamW([w], fira_gama=1.1)
    with pytest.raises(TypeError, match="belongs to residual 'fira'"):
        lo.GaLoreAdamW([w], fira_gamma=1.1)


def test_registry_rows_build_their_classes_and_aliases_resolve():
    w = torch.nn.Parameter(torch.randn(32, 24))
    for name, row in METHODS.items():
        cls = row.optimizer_class
        for alias in (name, *row.aliases, name.upper()):
            assert method(alias) is row
        opt = cls([{"params": [w], "rank": 4}]) if name != "frugal" else cls([{"params": [w], "density": 0.25}])
        g = opt.param_groups[0]
        for k, v in {**row.parts, **row.defaults}.items():
            assert g[k] == v, (name, k)
    with pytest.raises(ValueError, match="unknown optimizer 'galor'.*valid"):
        method("galor")


def test_constructor_signature_defaults_equal_the_registry():
    import inspect

    for name, row in METHODS.items():
        sig = inspect.signature(row.optimizer_class.__init__).parameters
        for k, v in row.defaults.items():
            if k in sig and sig[k].default is not inspect.Parameter.empty and k != "lr":
                assert sig[k].default == v, (name, k)


def test_readme_option_tables_equal_the_declarations():
    """The README's option tables are generated from the declarations (``python -m lowrank_optim.options_doc``)."""
    from pathlib import Path

    from lowrank_optim.options_doc import render

    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = "<!-- options:begin -->", "<!-- options:end -->"
    assert start in text and end in text
    assert text.split(start)[1].split(end)[0].strip() == render().strip()


def test_estimate_uses_the_registry_names_and_aliases():
    from lowrank_optim import estimate_state_bytes
    from tests.helpers import TinyNet

    model = TinyNet()
    a = estimate_state_bytes(model, "galore", rank=4)
    assert (
        a == estimate_state_bytes(model, "GaLore-AdamW", rank=4) == estimate_state_bytes(model, "galore_adamw", rank=4)
    )
    assert math.isfinite(a) and a > 0
