"""benchmarks.pretrain tells the truth about a run: resumes refuse changed options (unless --override, which then
really trains with them), checkpoints carry a checksum and `--resume auto` falls back past a corrupt one, the log
is cut back to the resumed step, a NaN loss stops the run with status 3, and the end of a run says where its
summary is."""

import json
import os
import shutil
import sysconfig

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from bench_support import one_torch_thread  # noqa: E402,F401 - autouse fixture

from benchmarks import checkpoint  # noqa: E402
from benchmarks.pretrain import cosine_with_min_lr, main  # noqa: E402

FILES = ["textwrap.py", "bisect.py", "heapq.py", "shlex.py", "fnmatch.py", "glob.py", "copy.py"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for f in FILES:
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], f), d / f)
    return d


def argv(corpus, out, *extra):
    return [
        "--model",
        "llama_micro",
        "--data",
        str(corpus),
        "--cache-dir",
        str(corpus.parent / "cache"),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-batches",
        "1",
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        "--log-every",
        "0",
        "--optimizer",
        "galore",
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--keep-checkpoints",
        "5",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copied by the tests that modify it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    main(argv(corpus, out))
    return out


def copy_run(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def ckpt(run, step):
    return run / "checkpoints" / f"step_{step:08d}.pt"


def log_steps(run):
    return [json.loads(line)["step"] for line in open(run / "log.jsonl") if "loss" in json.loads(line)]


def test_summary_is_announced_and_checkpoints_are_checksummed(finished_run, corpus, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    for step in (2, 4):
        meta, why = checkpoint.verify(ckpt(run, step))
        assert why is None and meta["step"] == step and meta["args"]["optimizer"] == "galore"
        assert checkpoint.read(ckpt(run, step))["step"] == step  # loads with weights_only=True
    main(argv(corpus, run, "--resume", "auto"))  # already at max-steps: resumes and only writes the summary
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert f"summary: {run / 'summary.json'}" in out
    assert f"eval loss {summary['eval_loss']:.4f}, ppl {summary['eval_ppl']:.2f}" in out
    assert f"({summary['state_bytes']:,} bytes)" in out
    assert not list(run.glob("*.tmp*"))


def test_resume_with_other_options_is_refused_listing_each_difference(finished_run, corpus, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    before = (run / "summary.json").read_bytes()
    with pytest.raises(SystemExit) as info:
        main(argv(corpus, run, "--resume", "auto", "--lr", "0.5", "--weight-decay", "0.1", "--seed", "7"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "3 training option(s) differ" in err[-4] and "--override" in err[-4]
    assert [line.strip() for line in err[-3:]] == [  # one line per difference
        "--lr: checkpoint 0.01, this run 0.5",
        "--seed: checkpoint 0, this run 7",
        "--weight-decay: checkpoint 0.0, this run 0.1",
    ]
    # options the saved state's shapes depend on cannot be overridden at all
    with pytest.raises(SystemExit) as info:
        main(argv(corpus, run, "--resume", "auto", "--rank", "4", "--lr", "0.5", "--override"))
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        info.value.code == 2
        and "not even --override" in err[-2]
        and err[-1].strip() == ("--rank: checkpoint 16, this run 4")
    )
    assert (run / "summary.json").read_bytes() == before  # nothing was trained or rewritten


def test_override_trains_with_the_new_options(finished_run, corpus, tmp_path):
    run = copy_run(finished_run, tmp_path)
    s = main(argv(corpus, run, "--resume", str(ckpt(run, 2)), "--lr", "0.05", "--override"))
    assert s["overridden"] == ["--lr: checkpoint 0.01, this run 0.05"] and s["optimizer"]["lr"] == 0.05
    entries = {e["step"]: e for e in map(json.loads, open(run / "log.jsonl")) if "loss" in e}
    # the schedule continues from step 2 with the NEW peak lr (warmup is 0 steps at 10% of 4)
    for step in (3, 4):
        assert entries[step]["lr"] == pytest.approx(0.05 * cosine_with_min_lr(step, 0, 4, 0.1))
    assert entries[2]["lr"] == pytest.approx(0.01 * cosine_with_min_lr(2, 0, 4, 0.1))  # kept from the first run
    assert log_steps(run) == [1, 2, 3, 4]  # steps 3 and 4 of the first run were cut from the log


def test_corrupt_checkpoint_is_refused_and_auto_falls_back(finished_run, corpus, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    data = bytearray(ckpt(run, 4).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    ckpt(run, 4).write_bytes(bytes(data))
    stale = run / "checkpoints" / "step_00000006.pt.tmp4242"
    stale.write_bytes(b"half written")
    with pytest.raises(SystemExit) as info:
        main(argv(corpus, run, "--resume", str(ckpt(run, 4))))
    assert info.value.code == 2 and "checksum mismatch" in capsys.readouterr().err
    s = main(argv(corpus, run, "--resume", "auto"))
    err = capsys.readouterr().err
    assert f"not resuming from {ckpt(run, 4)}: checksum mismatch" in err
    assert f"resuming from {ckpt(run, 2)} (step 2)" in err and not stale.exists()
    assert s["resumed_from"] == str(ckpt(run, 2)) and s["steps"] == 4
    assert log_steps(run) == [1, 2, 3, 4]
    # the resumed run is the uninterrupted one, bit for bit
    a, b = checkpoint.read(ckpt(finished_run, 4))["model"], checkpoint.read(ckpt(run, 4))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_without_checksum_file_is_not_resumed(finished_run, corpus, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    for step in (2, 4):
        os.remove(checkpoint.meta_path(ckpt(run, step)))
    with pytest.raises(SystemExit):
        main(argv(corpus, run, "--resume", str(ckpt(run, 4))))
    assert "checksum file step_00000004.json is missing" in capsys.readouterr().err
    main(argv(corpus, run, "--resume", "auto", "--max-steps", "2", "--save-every", "0"))
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "starting fresh" in err
    assert log_steps(run) == [1, 2]  # a fresh start rewrites the log


def test_nan_loss_stops_with_status_3(corpus, tmp_path, capsys):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as info:
        main(argv(corpus, out, "--optimizer", "adamw", "--lr", "1e30", "--grad-clip", "0", "--save-every", "0"))
    assert info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training loss is nan" in err or "training loss is inf" in err
    assert not (out / "summary.json").exists()
    assert json.loads(open(out / "log.jsonl").readlines()[-1])["diverged"] is True
