"""Per-rank optimizer state under FSDP2: on every rank of a sharded run (2, 3 and 4 ranks, gloo on CPU, tiny
model with ``fully_shard`` per Linear and on the root), the measured ``state_bytes()`` equals
``expected_state_bytes(world_size=W, rank=r)`` exactly, for every method. The shapes split unevenly and leave
ranks with no rows (6 rows over 4 ranks, a rank-4 subspace over 3). One torchrun launch per world size
(``fsdp_memory_worker.py``); the weights it trained are checked against one process's run too."""

import json
import os

import pytest
import torch
from fsdp_memory_worker import CASES
from torchrun import launch

import lowrank_optim as lo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "fsdp_memory_worker.py")
WORLDS = (2, 3, 4)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    """Each rank's results (``fsdp_memory_worker.py``) from one launch of ``request.param`` ranks."""
    world, out = request.param, tmp_path_factory.mktemp(f"fsdp_memory_{request.param}")
    launch(world, [WORKER, out])
    results = []
    for r in range(world):
        with open(out / f"rank{r}.json") as f:
            results.append(json.load(f))
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_each_ranks_state_bytes_equal_the_estimate(ranks, case):
    got = [(r[case]["measured"], r[case]["expected"]) for r in ranks]
    assert all(measured == expected for measured, expected in got), got


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_run_trains_like_one_process(ranks, case):
    assert ranks[0][case]["weights_rel_err"] < 1e-5


def test_per_rank_estimate_in_closed_form():
    """AdamW on a 7 x 10 weight over 4 ranks: ceil(7 / 4) = 2 rows on ranks 0-2, 1 on rank 3; two fp32 moments
    of those rows and the 0-dim fp32 step count on every rank."""
    with torch.device("meta"):
        model = torch.nn.Linear(10, 7, bias=False)
    got = [lo.estimate_state_bytes(model, "adamw", world_size=4, process_rank=r) for r in range(4)]
    assert got == [2 * 2 * 10 * 4 + 4] * 3 + [2 * 1 * 10 * 4 + 4]
    assert lo.estimate_state_bytes(model, "adamw") == 2 * 7 * 10 * 4 + 4


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(world_size=0), "world_size must be an int >= 1, got 0"),
        (dict(world_size=2.0), "world_size must be an int >= 1, got 2.0"),
        (dict(world_size=4, rank=4), r"rank must be an int in \[0, world_size=4\), got 4"),
        (dict(world_size=2, rank=-1), r"rank must be an int in \[0, world_size=2\), got -1"),
    ],
)
def test_bad_world_or_rank_is_refused_by_name(kw, message):
    opt = lo.GaLoreAdamW([torch.nn.Parameter(torch.zeros(4, 3))])
    with pytest.raises(ValueError, match=message):
        opt.expected_state_bytes(**kw)


def test_estimator_names_process_rank():
    with torch.device("meta"):
        model = torch.nn.Linear(10, 7)
    with pytest.raises(ValueError, match=r"process_rank must be an int in \[0, world_size=2\), got 2"):
        lo.estimate_state_bytes(model, "adamw", world_size=2, process_rank=2)
