"""Every user error of a benchmarks.* entry point: ONE line on stderr, exit status 2, no traceback, found before
any tokenizer training or data preparation (the cache and output directories stay untouched)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from bench_support import make_corpus, one_torch_thread  # noqa: E402,F401 - autouse fixture

from benchmarks import compare, memory, pretrain, step_bench, tune  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus")))


def one_line_exit_2(capsys, main, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def pretrain_argv(corpus, tmp_path, *extra):
    return [
        "--model",
        "llama_micro",
        "--data",
        corpus,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-dir",
        str(tmp_path / "out"),
        "--max-steps",
        "2",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--optimizer", "nope"], "argument --optimizer: invalid choice: 'nope'"),
        (["--model", "llama_nope"], "--model: unknown model config 'llama_nope'"),
        (["--optimizer", "galore", "--rank", "-4"], "--rank must be >= 1, got -4"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "0"], "--lr must be > 0, got 0"),
        (["--betas", "0.9,x"], "argument --betas: '0.9,x' is not comma separated numbers"),
        (["--betas", "0.9,1.5"], "--betas must be in [0, 1), got 1.5"),
        (["--warmup", "1.5"], "--warmup must be in [0, 1), got 1.5"),
        (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
        (
            ["--optimizer", "galore", "--projector", "nope"],
            "--optimizer galore: param group 0: invalid projector 'nope'",
        ),
        (["--optimizer", "galore", "--proj-type", "sideways"], "invalid proj_type 'sideways'"),
        (["--opt-kw", "amsgrad"], "--opt-kw 'amsgrad': expected KEY=VALUE"),
        (["--data", "/no/such/corpus"], "--data /no/such/corpus: no such file or directory"),
        (["--resume", "/no/such/step_00000001.pt"], "--resume /no/such/step_00000001.pt: not an intact checkpoint"),
        (["--device", "cuda"], "--device cuda: no CUDA device is available"),
    ],
)
def test_pretrain_usage_errors(capsys, corpus, tmp_path, extra, message):
    if extra == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    line = one_line_exit_2(capsys, pretrain.main, pretrain_argv(corpus, tmp_path, *extra))
    assert line.startswith("python -m benchmarks.pretrain: error: ") and message in line, line
    assert not (tmp_path / "cache").exists()  # no tokenizer was trained, nothing was tokenized


def test_pretrain_hf_offline_and_unwritable_output(capsys, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    line = one_line_exit_2(capsys, pretrain.main, pretrain_argv(corpus, tmp_path, "--data", "hf:allenai/c4:en"))
    assert "--data hf:allenai/c4:en: the Hugging Face hub is unreachable (HF_DATASETS_OFFLINE=1" in line
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = one_line_exit_2(capsys, pretrain.main, pretrain_argv(corpus, tmp_path, "--output-dir", str(blocker / "out")))
    assert f"--output-dir {blocker / 'out'}: not a writable directory" in line
    assert not (tmp_path / "cache").exists()


def test_compare_and_tune_check_every_run_before_the_first(capsys, corpus, tmp_path):
    out = tmp_path / "cmp"
    base = [
        "--output-dir",
        str(out),
        "--model",
        "llama_micro",
        "--data",
        corpus,
        "--cache-dir",
        str(tmp_path / "c"),
        "--in-process",
    ]
    line = one_line_exit_2(capsys, compare.main, [*base, "--optimizers", "adamw,nope"])
    assert "--optimizers: unknown ['nope']" in line
    line = one_line_exit_2(capsys, compare.main, [*base, "--optimizers", "adamw,galore", "--seeds", "0,x"])
    assert "--seeds '0,x': expected comma separated integers" in line
    # a bad value for one optimizer only: found before adamw's run starts
    line = one_line_exit_2(capsys, compare.main, [*base, "--optimizers", "adamw,galore", "--opt-args", "galore:lr=nan"])
    assert "galore: --lr must be a finite number, got nan" in line
    line = one_line_exit_2(capsys, compare.main, [*base, "--optimizers", "adamw", "--no-such-flag", "1"])
    assert "unrecognized arguments: --no-such-flag 1" in line
    line = one_line_exit_2(capsys, tune.main, [*base, "--optimizer", "galore", "--ranks", "8,x"])
    assert "--ranks '8,x': expected comma separated int values" in line
    line = one_line_exit_2(capsys, tune.main, [*base, "--optimizer", "galore", "--ranks", "8", "--gaps", "10,0"])
    assert "rank8_gap0: --update-proj-gap must be >= 1, got 0" in line
    line = one_line_exit_2(capsys, tune.main, [*base, "--optimizer", "nope"])
    assert "argument --optimizer: invalid choice: 'nope'" in line
    assert not out.exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shapes", "64x"], "--shapes item '64x': expected MxN"),
        (["--methods", "adamw_fused,nope"], "unknown --methods ['nope']"),
        (["--whole-model", "--methods", "galore,nope"], "unknown --methods ['nope']"),
        (["--rank", "-4"], "--rank must be >= 1, got -4"),
        (["--model", "llama_nope"], "--model: unknown model config 'llama_nope'"),
    ],
)
def test_step_bench_usage_errors(capsys, argv, message):
    line = one_line_exit_2(capsys, step_bench.main, argv)
    assert line.startswith("python -m benchmarks.step_bench: error: ") and message in line, line


def test_memory_usage_errors(capsys):
    assert "--model: unknown model config" in one_line_exit_2(capsys, memory.main, ["--model", "llama_nope"])
    assert "--rank must be >= 1" in one_line_exit_2(capsys, memory.main, ["--rank", "0"])


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (
            "pretrain",
            ["--model", "llama_micro", "--rank", "-4", "--optimizer", "galore"],
            "--rank must be >= 1, got -4",
        ),
        ("compare", ["--optimizers", "adamw,nope"], "--optimizers: unknown ['nope']"),
    ],
)
def test_as_a_subprocess(tmp_path, module, argv, message):
    r = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *argv, "--output-dir", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_data_problems_are_one_line_too(capsys, corpus, tmp_path, monkeypatch):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text("just one paragraph")
    line = one_line_exit_2(capsys, pretrain.main, pretrain_argv(str(tiny), tmp_path, "--cache-dir", str(tmp_path)))
    assert "is too small to split into train and validation (1 documents)" in line
    line = one_line_exit_2(capsys, pretrain.main, pretrain_argv(corpus, tmp_path, "--seq-len", "1000000"))
    assert "fewer than one --seq-len 1000000 block" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_exit_2(
        capsys, pretrain.main, pretrain_argv(corpus, tmp_path, "--tokenizer", "no-such-org/no-such-tokenizer")
    )
    assert "--tokenizer no-such-org/no-such-tokenizer:" in line and "unreachable" in line


TORCHRUN_ENV = dict(LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29599")


@pytest.mark.parametrize(
    "world, extra, message",
    [
        (None, ["--fsdp"], "--fsdp needs torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, "),
        (3, ["--fsdp", "--global-batch", "8"], "--global-batch 8 is not divisible by the world size 3 x"),
        (2, ["--global-batch", "6", "--grad-accum", "2"], "world size 2 x --grad-accum 2 = 4: every rank takes"),
        (2, ["--global-batch", "8", "--batch-size", "4"], "--global-batch 8 and --batch-size 4: give one of them"),
        (1, ["--global-batch", "0"], "--global-batch must be >= 1, got 0"),
        (1, ["--fsdp", "--layerwise"], "--fsdp with --layerwise: layer-wise updates run inside backward"),
        (2, ["--fsdp", "--optimizer", "galore_ref"], "--fsdp with --optimizer galore_ref: that package's optimizer"),
    ],
)
def test_pretrain_launch_errors(capsys, corpus, tmp_path, monkeypatch, world, extra, message):
    """Found from torchrun's environment before the process group, the tokenizer or the data."""
    for key in ("RANK", "WORLD_SIZE", *TORCHRUN_ENV):
        monkeypatch.delenv(key, raising=False)
    if world is not None:
        for key, value in dict(TORCHRUN_ENV, RANK="0", WORLD_SIZE=str(world)).items():
            monkeypatch.setenv(key, value)
    line = one_line_exit_2(capsys, pretrain.main, pretrain_argv(corpus, tmp_path, *extra))
    assert line.startswith("python -m benchmarks.pretrain: error: ") and message in line, line
    assert not (tmp_path / "cache").exists()


def test_pretrain_launch_error_is_reported_by_rank_0_only(capsys, corpus, tmp_path, monkeypatch):
    """Under torchrun every rank finds the same mistake: one copy of the line, from rank 0; the others exit 2."""
    for key, value in dict(TORCHRUN_ENV, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as info:
        pretrain.main(pretrain_argv(corpus, tmp_path, "--fsdp", "--global-batch", "7"))
    assert info.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    line = one_line_exit_2(capsys, pretrain.main, pretrain_argv(corpus, tmp_path, "--fsdp", "--global-batch", "7"))
    assert "--global-batch 7 is not divisible by the world size 2" in line
