"""benchmarks.pretrain --fsdp: a 2-process torchrun (gloo) run trains what one process trains on the same global
batch, writes torch.distributed.checkpoint checkpoints, and one process resumes them (past a corrupt newest one)
and continues the 2-process run. One torchrun launch; the single-process runs are in this process."""

import json
import os
import shutil
import socket

import pytest
import torch
from torchrun import launch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from bench_support import make_corpus, one_torch_thread  # noqa: F401 - autouse fixture

from benchmarks import checkpoint
from benchmarks.pretrain import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# reading a checkpoint whole into this process is what the tests mean to do
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")


def argv(corpus, out, *extra):
    # global batch 8 = 2 ranks x 2 blocks x 2 micro batches; gap 2: bases are refreshed after the resume too;
    # seq-len 24 leaves 93 validation blocks, evaluated whole: 47 on rank 0, 46 on rank 1
    return [
        "--model",
        "llama_micro",
        "--data",
        corpus,
        "--cache-dir",
        os.path.join(os.path.dirname(corpus), "cache"),
        "--seq-len",
        "24",
        "--global-batch",
        "8",
        "--grad-accum",
        "2",
        "--eval-batches",
        "100",
        "--device",
        "cpu",
        "--log-every",
        "0",
        "--optimizer",
        "galore",
        "--rank",
        "8",
        "--update-proj-gap",
        "2",
        "--max-steps",
        str(STEPS),
        "--save-every",
        "2",
        "--keep-checkpoints",
        "5",
        "--output-dir",
        str(out),
        *extra,
    ]


def losses(run):
    return {e["step"]: e["loss"] for e in map(json.loads, open(run / "log.jsonl")) if "loss" in e}


def sharded_weights(directory, like):
    """The model weights of a DCP checkpoint, read whole into this (non-distributed) process."""
    state = {"model": {k: torch.empty_like(v) for k, v in like.items()}}
    dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return state["model"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def one_rank_torchrun_env(monkeypatch):
    """This process as rank 0 of 1, as torchrun would start it; the process group is destroyed afterwards."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process reference and the 2-process --fsdp run of the same global batch."""
    root = tmp_path_factory.mktemp("fsdp")
    corpus = make_corpus(str(root / "corpus"))
    single = main(argv(corpus, root / "single"))  # also trains the tokenizer the ranks then read from the cache
    launch(2, ["-m", "benchmarks.pretrain", *argv(corpus, root / "fsdp", "--fsdp")], timeout=300)
    return dict(root=root, corpus=corpus, single=single, summary=json.load(open(root / "fsdp" / "summary.json")))


def test_two_ranks_train_what_one_process_trains(runs):
    root, single, sharded = runs["root"], runs["single"], runs["summary"]
    assert sharded["world_size"] == 2 and sharded["global_batch"] == single["global_batch"] == 8
    assert sharded["data"]["val_blocks"] == 93  # an uneven split of the evaluation over the ranks
    a, b = losses(root / "single"), losses(root / "fsdp")
    assert sorted(b) == list(range(1, STEPS + 1))  # one log line per step: only rank 0 writes
    for step in a:  # same samples and maths; only the order of the gradient reduction differs
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert sharded["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    # each rank holds about half of the optimizer state
    per_rank = sharded["state_bytes_per_rank"]
    assert len(per_rank) == 2 and all(0.4 < n / single["state_bytes"] < 0.6 for n in per_rank), per_rank
    full = checkpoint.read(root / "single" / "checkpoints" / f"step_{STEPS:08d}.pt")["model"]
    weights = sharded_weights(root / "fsdp" / "checkpoints" / f"step_{STEPS:08d}", full)
    for k in full:
        torch.testing.assert_close(weights[k], full[k], rtol=1e-4, atol=1e-5)


def test_checkpoints_are_checksummed_directories(runs):
    run = runs["root"] / "fsdp"
    for step in (2, 4):
        path = run / "checkpoints" / f"step_{step:08d}"
        meta, why = checkpoint.verify(path)
        assert why is None and meta["step"] == step and meta["world_size"] == 2
        assert {".metadata", "run.pt", "__0_0.distcp", "__1_0.distcp"} <= set(meta["files"])
        assert checkpoint.read(path / "run.pt")["data_pos"] == step * 8  # a position in the global sample order
    assert checkpoint.list_checkpoints(run) == [str(run / "checkpoints" / f"step_{s:08d}") for s in (2, 4)]


def test_one_process_resumes_past_a_corrupt_checkpoint_and_continues(runs, tmp_path, capsys, one_rank_torchrun_env):
    run = tmp_path / "run"
    shutil.copytree(runs["root"] / "fsdp", run)
    shard = run / "checkpoints" / f"step_{STEPS:08d}" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in rank 1's shard of the newest checkpoint
    shard.write_bytes(bytes(data))
    stale = run / "checkpoints" / "step_00000006.tmp4242"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half written")

    resumed = main(argv(runs["corpus"], run, "--fsdp", "--resume", "auto"))
    err = capsys.readouterr().err
    newest, older = (run / "checkpoints" / f"step_{s:08d}" for s in (STEPS, 2))
    assert f"not resuming from {newest}: checksum mismatch in __1_0.distcp" in err
    assert f"resuming from {older} (step 2)" in err and not stale.exists()
    assert resumed["world_size"] == 1 and resumed["resumed_from"] == str(older)
    a, b = losses(runs["root"] / "fsdp"), losses(run)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in (3, 4):  # the steps after the resume continue the 2-process run
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert resumed["eval_loss"] == pytest.approx(runs["summary"]["eval_loss"], rel=1e-5)
    full = checkpoint.read(runs["root"] / "single" / "checkpoints" / f"step_{STEPS:08d}.pt")["model"]
    two = sharded_weights(runs["root"] / "fsdp" / "checkpoints" / f"step_{STEPS:08d}", full)
    one = sharded_weights(newest, full)  # rewritten by the resumed run
    for k in full:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)


def test_checkpoint_formats_do_not_mix(runs, tmp_path, capsys, one_rank_torchrun_env):
    """An --fsdp checkpoint resumes only with --fsdp, a single-file one only without: one line, status 2, before
    any data preparation."""
    for source, extra, message in (
        ("fsdp", [], "was written by a run with --fsdp (a torch.distributed.checkpoint directory); resume it under"),
        ("single", ["--fsdp"], "was written by a run without --fsdp (a single file); resume it without --fsdp"),
    ):
        run = tmp_path / source
        shutil.copytree(runs["root"] / source, run)
        with pytest.raises(SystemExit) as info:
            main(argv(runs["corpus"], run, "--resume", "auto", "--cache-dir", str(tmp_path / "cache"), *extra))
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert info.value.code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "cache").exists()
