"""Every `python -m benchmarks.<x> ...` command in README.md runs as written (exit 0), with tiny overrides appended
(argparse keeps the last value: llama_micro, 2 steps, a few stdlib files as corpus). Commands come from the fenced
bash blocks and from inline code spans; they run in-process in a temporary working directory, so the README's
relative output paths (runs/...) land there."""

import importlib
import os
import re
import shlex

import pytest

pytest.importorskip("transformers")

from bench_support import make_corpus, one_torch_thread  # noqa: E402,F401 - autouse fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = re.compile(r"python -m (benchmarks\.\w+)(.*)")


def readme_commands():
    """[(module, argv)] of every benchmarks command in README.md, in order, without repeats."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    pieces = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pieces += block.replace("\\\n", " ").splitlines()
    pieces += re.findall(r"(?<!`)`(python -m benchmarks\.[^`]+)`", text)  # inline code spans
    out = []
    for piece in pieces:
        for part in piece.split("&&"):
            m = COMMAND.match(part.strip())
            if m and (m.group(1), m.group(2).strip()) not in [(a, " ".join(b)) for a, b in out]:
                out.append((m.group(1), shlex.split(m.group(2))))
    return out


def test_readme_lists_every_entry_point():
    modules = {module for module, _ in readme_commands()}
    assert modules == {
        "benchmarks.pretrain",
        "benchmarks.compare",
        "benchmarks.tune",
        "benchmarks.step_bench",
        "benchmarks.memory",
        "benchmarks.fsdp_state",
        "benchmarks.quant_bench",
        "benchmarks.gpu_report",
    }
    fenced = [argv for module, argv in readme_commands() if module == "benchmarks.tune"]
    assert any("--output-dir" not in argv for argv in fenced)  # the tuning command runs without one


def tiny_overrides(module, corpus, cache):
    train = [
        "--model",
        "llama_micro",
        "--max-steps",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval-batches",
        "1",
        "--data",
        corpus,
        "--cache-dir",
        cache,
        "--log-every",
        "0",
    ]
    return {
        "benchmarks.pretrain": [*train, "--save-every", "1"],
        "benchmarks.compare": [*train, "--optimizers", "adamw,galore", "--in-process"],
        "benchmarks.tune": [*train, "--ranks", "4", "--gaps", "2", "--in-process"],
        "benchmarks.step_bench": [
            "--model",
            "llama_micro",
            "--rank",
            "8",
            "--warmup",
            "1",
            "--iters",
            "1",
            "--rounds",
            "1",
            "--refresh-iters",
            "1",
            "--projectors",
            "svd",
        ],
        "benchmarks.memory": ["--model", "llama_micro", "--rank", "8"],
        "benchmarks.fsdp_state": ["--models", "llama_micro:8", "--worlds", "1,2"],
        "benchmarks.quant_bench": ["--sizes", "4096", "--reps", "1"],
        "benchmarks.gpu_report": ["--dry-run", "--output-dir", "runs/gpu_dry"],
    }[module]


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    corpus = make_corpus(str(tmp_path / "corpus"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for module, argv in readme_commands():
        main = importlib.import_module(module).main
        full = [*argv, *tiny_overrides(module, corpus, str(tmp_path / "cache"))]
        try:
            main(full)
        except SystemExit as e:  # --help exits 0; anything else is a failing README command
            assert e.code == 0, (module, full, capsys.readouterr().err[-2000:])
    # the README's output paths were written where the commands say (relative to the working directory)
    for path in (
        "runs/quickstart/summary.json",
        "runs/fira/summary.json",
        "runs/compare/results.md",
        "runs/tune-galore/results.md",
        "runs/step_bench_llama60m.md",
        "runs/whole_model_llama60m.md",
    ):
        assert (work / path).stat().st_size > 0, path
    assert "--resume auto: resuming from" in capsys.readouterr().err  # the second fira command resumed
