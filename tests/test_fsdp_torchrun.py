"""FSDP2 over 2 and 3 ranks (torchrun, gloo, CPU; uneven row shards) against single-process training: new bases
computed from each rank's rows without gathering the gradient (rsvd, columns by norm, right-side DCT), and
layer-wise updates inside backward. One launch per world size runs ``fsdp_torchrun_worker.py``; its JSON is read
here."""

import json
import os

import pytest
import torch.distributed as dist
from torchrun import launch

pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:
    pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "fsdp_torchrun_worker.py")
TOL = 1e-5
RANK, OVERSAMPLE, POWER_ITERS = 4, 10, 2  # the worker's rank; rsvd's defaults
SHAPES = [(41, 24), (13, 41), (5, 13)]  # the worker's matrices: 41 x 24 projects on the right, the others left


def _launch(world, sections, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"fsdp_world{world}") / "results.json"
    launch(world, [WORKER, out, *sections])
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _launch(2, ["refresh", "layerwise"], tmp_path_factory)


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    return _launch(3, ["refresh", "few_rows"], tmp_path_factory)


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def run(request):
    return request.getfixturevalue(f"world{request.param}")


def _right(shape):
    return shape[0] >= shape[1]  # the engine's default side: project the smaller dimension


def _gradient_gathers(call):
    return [e for e in call["events"] if e[0] == "gather" and tuple(e[1]) in SHAPES]


# ---------------------------------------------------------------------------------------------------- refreshes
@pytest.mark.parametrize("case", ["rsvd", "columns_norm", "columns_norm_full", "dct", "dct_l2_fft", "frugal", "svd"])
def test_fsdp_training_with_refreshes_equals_one_process(run, case):
    res = run["refresh"][case]
    assert len(res["calls"]) == 3  # 20 steps, a new basis at 0, 7 and 14
    assert res["err"] < TOL, res["err"]


def test_rsvd_refresh_sums_small_products_and_never_gathers_the_gradient(run):
    """Per parameter: (1 + power_iters) all-gathers of the m x k sketch, power_iters all-reduces of n x k and one
    of k x n (k = rank + oversample, at most min(m, n)); no gradient gather, no broadcast."""
    expected = []
    for m, n in SHAPES:
        k = min(RANK + OVERSAMPLE, m, n)
        expected += [["gather", [m, k]]] + [["sum", [n, k]], ["gather", [m, k]]] * POWER_ITERS + [["sum", [k, n]]]
    for call in run["refresh"]["rsvd"]["calls"]:
        assert call["due"] == [list(s) for s in SHAPES]
        assert call["events"] == expected


@pytest.mark.parametrize("case", ["columns_norm", "columns_norm_full"])
def test_columns_by_norm_refresh_is_one_all_reduce_of_scores(run, case):
    full = case == "columns_norm_full"
    expected = [["sum", [m + n if full else (n if _right((m, n)) else m)]] for m, n in SHAPES]
    for call in run["refresh"][case]["calls"]:
        assert call["events"] == expected


@pytest.mark.parametrize("case", ["dct", "dct_l2_fft"])
def test_dct_ranks_right_side_coefficients_from_rows_and_gathers_for_the_left_side(run, case):
    """A right-side DCT acts along rows: one all-reduce of n scores. A left-side one mixes all rows: the gradient is
    gathered and the owner's indices broadcast, as before."""
    right = [s for s in SHAPES if _right(s)]
    left = [s for s in SHAPES if not _right(s)]
    expected = [["sum", [right[0][1]]]] + [["gather", list(s)] for s in left] + [["broadcast", []]] * len(left)
    for call in run["refresh"][case]["calls"]:
        assert call["events"] == expected


def test_seeded_column_choice_needs_no_collective(run):
    assert all(call["events"] == [] for call in run["refresh"]["frugal"]["calls"])


def test_the_record_sees_gradient_gathers_where_they_happen(run):
    """The contrast that makes the assertions above meaningful: svd gathers every gradient and broadcasts."""
    for call in run["refresh"]["svd"]["calls"]:
        assert [tuple(e[1]) for e in _gradient_gathers(call)] == SHAPES
        assert [e for e in call["events"] if e[0] == "broadcast"] == [["broadcast", []]] * len(SHAPES)


@pytest.mark.parametrize("case", ["rsvd", "columns_norm_full", "dct_right", "svd"])
def test_a_rank_without_rows_of_a_matrix_steps_with_the_others(world3, case):
    res = world3["few_rows"][case]
    assert res["rows_per_rank"] == [1, 1, 0]
    assert res["err"] < TOL, res["err"]


# ---------------------------------------------------------------------------------------------------- layer-wise
def test_fsdp_runs_post_accumulate_grad_hooks_on_sharded_parameters_with_sharded_gradients(world2):
    seen = world2["layerwise"]["galore"]["seen"]
    assert len(seen) == 10 * 6  # every parameter, every backward
    sharded = {"param": "DTensor", "grad": "DTensor", "placements": ["S(0)"], "local_rows_match": True}
    assert all(s == sharded for s in seen)


@pytest.mark.parametrize("case", ["galore", "rsvd", "galore8bit"])
def test_layerwise_under_fsdp_equals_one_process_and_the_ordinary_step(world2, case):
    res = world2["layerwise"][case]
    assert res["err"] < TOL, res["err"]  # single-process layer-wise
    assert res["err_vs_step"] < TOL, res["err_vs_step"]  # FSDP2 with optimizer.step() after backward


@pytest.mark.parametrize("how", ["reduce_every_micro_batch", "reduce_on_last_micro_batch"])
def test_layerwise_accumulation_under_fsdp(world2, how):
    """accumulation_steps=2 with FSDP reducing every micro-batch, or accumulation_steps=1 with FSDP skipping the
    reduce-scatter on the first (the hooks then fire once per window): both equal one process with 2 micro-batches."""
    assert world2["accumulation"][how] < TOL


def test_layerwise_clipping_under_fsdp_clips_by_the_whole_gradient_norm(world2):
    assert world2["clip"] < TOL


def test_layerwise_under_fsdp_without_resharding_after_forward(world2):
    assert world2["unsharded_between_forward_and_backward"] < TOL
