"""benchmarks.compare and benchmarks.tune end to end on llama_micro, 3 steps, a tiny local corpus."""

import json
import os
import shutil
import sysconfig

import pytest
from bench_support import one_torch_thread  # noqa: E402,F401 - autouse fixture

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
    return [
        "--model",
        "llama_micro",
        "--max-steps",
        "3",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval-batches",
        "1",
        "--data",
        str(data),
        "--cache-dir",
        str(tmp / "cache"),
        "--in-process",
    ]


def test_compare(base_argv, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        *base_argv,
        "--output-dir",
        str(out),
        "--optimizers",
        "adamw,galore",
        "--rank",
        "8",
        "--update-proj-gap",
        "2",
        "--opt-args",
        "galore:lr=0.01,scale=0.25",
    ]
    result = compare.main(argv)
    assert not result["failed"]
    for name in (
        "results.md",
        "results.json",
        "loss.png",
        "ppl.png",
        "memory_vs_ppl.png",
        "adamw/seed0/summary.json",
        "galore/seed0/summary.json",
        "adamw/seed1/summary.json",
        "galore/seed1/summary.json",
    ):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "Command: `python -m benchmarks.compare" in md and "Machine:" in md and "hash `" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert {"adamw", "galore"} <= set(rows)
    data = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert data["adamw"]["eval_ppl_ratio"] == data["adamw"]["state_bytes_ratio"] == 1.0
    assert data["galore"]["state_bytes"] < data["adamw"]["state_bytes"]
    galore = [json.loads((out / f"galore/seed{k}/summary.json").read_text()) for k in (0, 1)]
    assert [s["optimizer"]["lr"] for s in galore] == [0.01, 0.01]  # the override
    assert [s["seed"] for s in galore] == [0, 1] and galore[0]["eval_ppl"] != galore[1]["eval_ppl"]
    # mean and sample std over the two seeds, and the noise verdict of the stated rule
    ppls = [s["eval_ppl"] for s in galore]
    assert data["galore"]["eval_ppls"] == ppls
    assert data["galore"]["eval_ppl"] == pytest.approx(sum(ppls) / 2)
    assert data["galore"]["eval_ppl_std"] == pytest.approx(abs(ppls[0] - ppls[1]) / 2**0.5)
    assert data["adamw"]["ppl_vs_adamw"] == "within noise"
    assert data["galore"]["ppl_vs_adamw"] in ("better", "worse", "within noise")
    assert "± " in md and "2 x pooled std" in md
    # resumable: a second call reuses every summary
    mtime = (out / "galore/seed1/summary.json").stat().st_mtime_ns
    compare.main(argv)
    assert (out / "galore/seed1/summary.json").stat().st_mtime_ns == mtime


def test_opt_args_parsing():
    assert compare.parse_opt_args(["galore,fira:lr=0.01,update_proj_gap=50", "fira:scale=1"]) == {
        "galore": ["--lr", "0.01", "--update-proj-gap", "50"],
        "fira": ["--lr", "0.01", "--update-proj-gap", "50", "--scale", "1"],
    }
    with pytest.raises(ValueError):
        compare.parse_opt_args(["galore-lr=1"])


def test_tune_grid_resumes(base_argv, tmp_path, capsys):
    out = tmp_path / "tune"
    argv = [
        *base_argv,
        "--output-dir",
        str(out),
        "--optimizer",
        "galore",
        "--ranks",
        "4,8",
        "--gaps",
        "2",
        "--lr",
        "0.01",
    ]
    first = tune.main(argv)
    assert first["new_trials"] == 2 and len(first["rows"]) == 2
    assert all(len(r["eval_ppls"]) == 2 for r in first["rows"])  # two seeds per setting by default
    for r in first["rows"]:
        assert r["eval_ppl"] == pytest.approx(sum(r["eval_ppls"]) / 2)
        summary = json.loads((out / "trials" / tune.run_name(r["params"]) / "seed1" / "summary.json").read_text())
        # searched and explicit options win over GaLore's paper recipe; the rest come from it
        assert summary["optimizer"]["rank"] == r["params"]["rank"] and summary["optimizer"]["lr"] == 0.01
        assert summary["optimizer"]["scale"] == 0.25 and set(summary["recipe_applied"]) == {"scale", "warmup"}
    printed = capsys.readouterr().out
    assert "recommended: rank=" in printed and "cheapest within 2% of best" in printed
    assert "best mean ppl: rank=" in printed and "pooled std" in printed
    for name in ("results.md", "results.json", "heatmap.png", "pareto.png", "study.db"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "Command: `python -m benchmarks.tune" in md and md.count("\n| ") == 3  # header + 2 trials
    assert all(r["state_bytes"] > 0 for r in first["rows"])
    again = tune.main(argv)
    assert again["new_trials"] == 0 and len(again["rows"]) == 2
    assert "recommended: rank=" in capsys.readouterr().out


def test_recommend_and_pareto():
    rows = [
        {"eval_ppl": 100.0, "state_bytes": 30},
        {"eval_ppl": 101.0, "state_bytes": 10},
        {"eval_ppl": 110.0, "state_bytes": 5},
    ]
    best, cheap = tune.recommend(rows, 0.02)
    assert best is rows[0] and cheap is rows[1]
    from benchmarks.plots import pareto_front

    assert pareto_front([(30, 100.0), (10, 101.0), (5, 110.0), (20, 105.0)]) == [2, 1, 0]


def test_recommendation_follows_the_noise_rule():
    def row(ppl, std, state):
        return {"eval_ppl": ppl, "eval_ppl_std": std, "state_bytes": state}

    # best beats the runner-up by more than 2 pooled std: recommended
    clear = [row(100.0, 1.0, 30), row(104.0, 1.0, 10)]
    chosen, why = tune.recommend_beyond_noise(clear)
    assert chosen is clear[0] and why == "beats the runner-up beyond noise"
    # within noise: the cheapest setting within noise of the best, and the reason says so
    close = [row(100.0, 2.0, 30), row(101.0, 2.0, 20), row(102.0, 2.0, 10), row(120.0, 2.0, 5)]
    chosen, why = tune.recommend_beyond_noise(close)
    assert chosen is close[2] and "no setting beats the runner-up beyond noise" in why and "3 settings" in why
    # one seed: no noise estimate, said plainly
    chosen, why = tune.recommend_beyond_noise([row(100.0, None, 30), row(101.0, None, 10)])
    assert chosen["eval_ppl"] == 100.0 and "NOT shown to be better" in why


def test_noise_rule_numbers():
    from benchmarks.seeds import mean_std, verdict, within_noise

    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([5.0]) == (5.0, None)
    # pooled std 1: a difference of 1.9 is noise, 2.1 is not
    assert within_noise(10.0, 1.0, 11.9, 1.0) and not within_noise(10.0, 1.0, 12.1, 1.0)
    assert verdict(8.0, 1.0, 10.1, 1.0) == "better" and verdict(12.1, 1.0, 10.0, 1.0) == "worse"
    assert verdict(10.0, None, 10.0, 1.0) == "n/a (1 seed)"
