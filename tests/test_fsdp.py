"""Every optimizer on a ``fully_shard`` model at 2, 3 (uneven shards) and 4 ranks (one rank holding no row of the
smallest weight) against one process on the same global batch: 20 steps spanning 3 refreshes. Each world size is
one torchrun launch (``fsdp_worker.py``); the tests read its results."""

import json
from pathlib import Path

import pytest
from fsdp_worker import CASES
from torchrun import launch

HERE = Path(__file__).parent
WORLDS = (2, 3, 4)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"fsdp{world}") / "results.json"
    launch(world, [HERE / "fsdp_worker.py", out])
    data = json.loads(out.read_text())
    assert data["world"] == world
    return data["results"]


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_training_equals_one_process(run, case):
    r = run[case]
    assert r["weight_err"] < 1e-5, r
    assert r["state_err"] < 1e-4, r  # every state tensor, gathered, is the one process's (moments, bases)
    assert r["same_keys"], r  # the same keys, equal indices and counters


@pytest.mark.parametrize("case", list(CASES))
def test_state_is_sharded_like_the_parameters(run, case):
    r = run[case]
    world = len(r["rank_bytes"])
    assert r["layout_ok"], r  # every state tensor with a dim is a Shard(0) DTensor; counters stay plain
    # the shards of all ranks add up to the single process's tensors: nothing is held twice ...
    assert sum(r["rank_shard_bytes"]) == r["single_shard_bytes"], r
    # ... and state_bytes() reports this rank's: its shards plus the 0-dim counters every rank keeps
    scalars = r["single_bytes"] - r["single_shard_bytes"]
    assert r["rank_bytes"] == [b + scalars for b in r["rank_shard_bytes"]], r
    assert max(r["rank_bytes"]) < r["single_bytes"] * (1 / world + 0.2), r  # tiny shapes: uneven rows, counters


@pytest.mark.parametrize("case", ["ddp_galore", "ddp_fira"])
def test_ddp_still_equals_one_process(run, case):
    assert run[case]["weight_err"] < 1e-5, run[case]
