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
