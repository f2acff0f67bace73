"""`torchrun -m benchmarks.fsdp_traffic` on llama_micro, 2 ranks: the counted collectives against closed forms
from the model's shapes (the design in ``lowrank_optim/sharding.py``): FSDP2 gathers every parameter in forward
and reduce-scatters every gradient in backward; AdamW's step only all-reduces its non-finite flag; GaLore's step
gathers each basis (and each left-side direction, after all-reducing the projection); its refresh also gathers
each gradient and broadcasts each new basis from its owner; a random basis is drawn on every rank."""

import json
import os

import pytest
import torch
from torchrun import launch

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = 8


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_traffic")
    args = ["-m", "benchmarks.fsdp_traffic", "--model", "llama_micro", "--rank", RANK, "--seq-len", 8]
    args += ["--methods", "GaLore (svd),GaLore random,AdamW", "--output", out / "t.md", "--json", out / "t.json"]
    launch(2, args)
    with open(out / "t.json") as f:
        data = json.load(f)
    assert data["world"] == 2 and data["same_on_every_rank"]
    rows = {(label, phase): {k: tuple(v) for k, v in t.items()} for label, phase, t in data["rows"]}
    return rows, (out / "t.md").read_text()


def _shapes():
    from transformers import LlamaForCausalLM

    from benchmarks.model import load_config

    with torch.device("meta"):
        model = LlamaForCausalLM(load_config("llama_micro"))
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    targeted = [s for name, s in params.items() if len(s) == 2 and ("self_attn" in name or "mlp" in name)]
    return params, targeted


def test_fsdp2_gathers_every_parameter_and_reduce_scatters_every_gradient(counted):
    rows, _ = counted
    params, _ = _shapes()
    total = 4 * sum(torch.Size(s).numel() for s in params.values())  # fp32; every first dim is even: no padding
    assert rows[("FSDP2", "forward")]["all_gather"][1] == total
    assert rows[("FSDP2", "backward")]["reduce_scatter"] == (3, total)  # 2 layers and the root


def test_adamw_step_only_all_reduces_its_flag(counted):
    rows, _ = counted
    for phase in ("step", "refresh"):
        t = rows[("AdamW", phase)]
        assert set(t) == {"all_reduce"} and t["all_reduce"][1] == 4 * t["all_reduce"][0]  # 0-dim fp32 flags


def test_galore_collectives_in_closed_form(counted):
    rows, _ = counted
    _, targeted = _shapes()
    flags = rows[("AdamW", "step")]["all_reduce"][0]
    left = [(m, n) for m, n in targeted if m < n]  # projected from the left: P^T G (r x n) summed over ranks
    basis = sum(4 * RANK * (m if m < n else n) for m, n in targeted)
    low_left = sum(4 * RANK * n for _, n in left)
    step = rows[("GaLore (svd)", "step")]
    assert step == {
        "all_gather": (len(targeted) + len(left), basis + low_left),
        "all_reduce": (flags + len(left), 4 * flags + low_left),
    }
    refresh = rows[("GaLore (svd)", "refresh")]
    grads = sum(4 * m * n for m, n in targeted)
    assert refresh["all_gather"] == (2 * len(targeted) + len(left), basis + low_left + grads)
    assert refresh["broadcast"] == (len(targeted), basis)
    assert refresh["broadcast_object_list"][0] == len(targeted)
    for phase in ("step", "refresh"):
        assert rows[("GaLore random", phase)] == {
            "all_gather": (len(left), low_left),
            "all_reduce": (flags + len(left), 4 * flags + low_left),
        }


def test_table_is_written(counted):
    _, text = counted
    assert "Command: `torchrun --standalone --nproc_per_node 2 -m benchmarks.fsdp_traffic" in text
    assert "| FSDP2 | forward |" in text and "| GaLore (svd) | refresh step |" in text
