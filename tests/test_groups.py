"""Param groups from module names."""

import re

import pytest
from helpers import TinyNet

from lowrank_optim.groups import lowrank_param_groups, lowrank_parameter_names


def test_substring_targets():
    names = lowrank_parameter_names(TinyNet(), ["attn", "mlp"])
    assert names == ["attn.weight", "mlp.weight", "mlp2.weight"]


def test_regex_targets():
    assert lowrank_parameter_names(TinyNet(), [r"^mlp\d"]) == ["mlp2.weight"]
    assert lowrank_parameter_names(TinyNet(), [re.compile("attn")]) == ["attn.weight"]
    assert lowrank_parameter_names(TinyNet(), ["re:mlp$"]) == ["mlp.weight"]


def test_all_linear_excludes_lm_head_unless_named():
    names = lowrank_parameter_names(TinyNet(), ["all-linear"])
    assert "lm_head.weight" not in names and "attn.weight" in names
    assert "lm_head.weight" in lowrank_parameter_names(TinyNet(), ["all-linear", "lm_head"])


def test_conv_targets_and_dense_rest():
    model = TinyNet(conv=True)
    groups = lowrank_param_groups(model, ["conv"], rank=4, projector="dct")
    assert groups[0]["params"] == [model.conv.weight] and groups[0]["projector"] == "dct"
    n_dense = sum(len(g["params"]) for g in groups[1:])
    assert n_dense == len(list(model.parameters())) - 1


def test_no_decay_for_norms_and_biases():
    model = TinyNet()
    groups = lowrank_param_groups(model, ["attn"], rank=4, no_decay_norms_and_biases=True, weight_decay=0.1)
    nd = [g for g in groups if g.get("weight_decay") == 0.0][0]["params"]
    ids = {id(p) for p in nd}
    assert id(model.norm.weight) in ids and id(model.attn.bias) in ids and id(model.mlp2.weight) not in ids
    assert groups[0]["weight_decay"] == 0.1


def test_no_match_is_a_clear_error():
    with pytest.raises(ValueError, match="matched no"):
        lowrank_param_groups(TinyNet(), ["transformer.h"])


def test_group_builder_leaves_each_optimizer_its_own_defaults():
    from lowrank_optim import DCTAdamW, FrugalAdamW, GaLoreAdamW

    model = TinyNet()
    galore = GaLoreAdamW(lowrank_param_groups(model, rank=4)).param_groups[0]
    dct = DCTAdamW(lowrank_param_groups(model, rank=4)).param_groups[0]
    assert (galore["update_proj_gap"], galore["scale"]) == (200, 0.25)
    assert (dct["update_proj_gap"], dct["scale"]) == (1, 1.0)  # not GaLore's 200 and 0.25
    frugal = FrugalAdamW(lowrank_param_groups(model, rank=4)).param_groups[0]
    assert frugal["scale"] == 1.0
    assert GaLoreAdamW(lowrank_param_groups(model, rank=4, scale=0.5)).param_groups[0]["scale"] == 0.5


def test_default_rank_is_sized_from_the_model_and_an_all_dense_group_is_loud():
    model = TinyNet(d=24)  # targeted: 40x24, 24x40, 24x24 -> smallest side 24 -> rank 6
    assert lowrank_param_groups(model)[0]["rank"] == 6
    with pytest.warns(UserWarning, match="nothing will be trained low-rank") as record:
        lowrank_param_groups(model, rank=128)
    assert record[0].filename == __file__  # said at the user's line
