"""benchmarks.compare and benchmarks.tune end to end on llama_micro, 3 steps, a tiny local corpus."""
import json
import os
import shutil
import sysconfig

import pytest

from benchmarks import compare, tune

FILES = ["textwrap.py", "bisect.py", "heapq.py", "shlex.py", "fnmatch.py", "glob.py"]


@pytest.fixture(scope="module")
def base_argv(tmp_path_factory):
    """Pretrain flags shared by both tools: a few stdlib modules as corpus, so BPE training takes well under 1 s."""
    tmp = tmp_path_factory.mktemp("ct")
    data = tmp / "corpus"
    data.mkdir()
    for f in FILES:
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], f), data / f)
    return ["--model", "llama_micro", "--max-steps", "3", "--seq-len", "32", "--batch-size", "2",
            "--eval-batches", "1", "--data", str(data), "--cache-dir", str(tmp / "cache"), "--in-process"]


def test_compare(base_argv, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [*base_argv, "--output-dir", str(out), "--optimizers", "adamw,galore", "--rank", "8",
            "--update-proj-gap", "2", "--opt-args", "galore:lr=0.01,scale=0.25"]
    result = compare.main(argv)
    assert not result["failed"]
    for name in ("results.md", "results.json", "loss.png", "ppl.png", "memory_vs_ppl.png",
                 "adamw/summary.json", "galore/summary.json"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "Command: `python -m benchmarks.compare" in md and "Machine:" in md and "hash `" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert {"adamw", "galore"} <= set(rows)
    data = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert data["adamw"]["eval_ppl_ratio"] == data["adamw"]["state_bytes_ratio"] == 1.0
    assert data["galore"]["state_bytes"] < data["adamw"]["state_bytes"]
    assert json.loads((out / "galore/summary.json").read_text())["optimizer"]["lr"] == 0.01  # the override
    # resumable: a second call reuses both summaries
    mtime = (out / "galore/summary.json").stat().st_mtime_ns
    compare.main(argv)
    assert (out / "galore/summary.json").stat().st_mtime_ns == mtime


def test_opt_args_parsing():
    assert compare.parse_opt_args(["galore,fira:lr=0.01,update_proj_gap=50", "fira:scale=1"]) == {
        "galore": ["--lr", "0.01", "--update-proj-gap", "50"],
        "fira": ["--lr", "0.01", "--update-proj-gap", "50", "--scale", "1"]}
    with pytest.raises(ValueError):
        compare.parse_opt_args(["galore-lr=1"])


def test_tune_grid_resumes(base_argv, tmp_path, capsys):
    out = tmp_path / "tune"
    argv = [*base_argv, "--output-dir", str(out), "--optimizer", "galore", "--ranks", "4,8", "--gaps", "2",
            "--lr", "0.01"]
    first = tune.main(argv)
    assert first["new_trials"] == 2 and len(first["rows"]) == 2
    printed = capsys.readouterr().out
    assert "recommended (best ppl): rank=" in printed and "cheapest within 2% of best" in printed
    for name in ("results.md", "results.json", "heatmap.png", "pareto.png", "study.db"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "Command: `python -m benchmarks.tune" in md and md.count("\n| ") == 3  # header + 2 trials
    assert all(r["state_bytes"] > 0 for r in first["rows"])
    again = tune.main(argv)
    assert again["new_trials"] == 0 and len(again["rows"]) == 2
    assert "recommended (best ppl)" in capsys.readouterr().out


def test_recommend_and_pareto():
    rows = [{"eval_ppl": 100.0, "state_bytes": 30}, {"eval_ppl": 101.0, "state_bytes": 10},
            {"eval_ppl": 110.0, "state_bytes": 5}]
    best, cheap = tune.recommend(rows, 0.02)
    assert best is rows[0] and cheap is rows[1]
    from benchmarks.plots import pareto_front
    assert pareto_front([(30, 100.0), (10, 101.0), (5, 110.0), (20, 105.0)]) == [2, 1, 0]
