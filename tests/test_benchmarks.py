"""Pretraining benchmark: configs, shapes, data pipeline, smoke run, exact resume, DDP equivalence, offline hf:."""

import json
import os
import re
import shutil
import sys
import sysconfig
import time

import pytest
import torch
from torchrun import launch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from bench_support import one_torch_thread  # noqa: E402,F401 - autouse fixture

from benchmarks import checkpoint  # noqa: E402
from benchmarks import data as D  # noqa: E402
from benchmarks.model import build_model, config_names, load_config, weight_shapes  # noqa: E402
from benchmarks.pretrain import cosine_with_min_lr, main  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {  # hidden, intermediate, layers, heads, vocab
    "llama_9m": (128, 352, 4, 4, 32000),
    "llama_20m": (256, 688, 4, 4, 32000),
    "llama_35m": (384, 1024, 6, 8, 32000),
    "llama_60m": (512, 1376, 8, 8, 32000),
    "llama_130m": (768, 2048, 12, 12, 32000),
    "llama_350m": (1024, 2736, 24, 16, 32000),
    "llama_1b": (2048, 5461, 24, 32, 32000),
    "llama_3b": (2560, 6848, 32, 32, 32000),
    "llama_7b": (4096, 11008, 32, 32, 32000),
    "llama_tiny": (256, 688, 4, 4, 8192),
    "llama_micro": (64, 176, 2, 2, 1024),
}
STDLIB_FILES = [
    "argparse.py",
    "textwrap.py",
    "csv.py",
    "bisect.py",
    "heapq.py",
    "string.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "copy.py",
    "json/decoder.py",
    "json/encoder.py",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small, fixed text corpus (a dozen stdlib modules) so tokenizer training takes well under a second."""
    d = tmp_path_factory.mktemp("corpus")
    root = sysconfig.get_paths()["stdlib"]
    for f in STDLIB_FILES:
        shutil.copy(os.path.join(root, f), d / f.replace("/", "_"))
    return str(d)


def micro_argv(data_dir, tmp_path, out, *extra):
    return [
        "--model",
        "llama_micro",
        "--data",
        data_dir,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-batches",
        "2",
        "--output-dir",
        str(tmp_path / out),
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--log-every",
        "0",
        *extra,
    ]


@pytest.mark.parametrize("name", sorted(SIZES))
def test_config_sizes(name):
    c = load_config(name)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == SIZES[name]
    assert c.rms_norm_eps == 1e-6 and c.tie_word_embeddings is False


def test_all_configs_listed():
    assert set(config_names()) == set(SIZES)
    with pytest.raises(ValueError, match="unknown model config"):
        load_config("llama_nope")


def test_weight_shapes_match_real_model():
    config = load_config("llama_60m")
    real = build_model(config, seed=0)
    linear = {f"{n}.weight": tuple(m.weight.shape) for n, m in real.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes = weight_shapes(config)
    assert {n: s for n, s in shapes.items() if n in linear} == linear
    assert shapes == {n: tuple(p.shape) for n, p in real.named_parameters() if p.ndim == 2}
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (1376, 512)
    assert len(weight_shapes(load_config("llama_7b"))) == 2 + 32 * 7  # meta device: instant, no 27 GB


def test_schedule_is_galores():
    assert cosine_with_min_lr(0, 10, 100, 0.1) == 0.0
    assert cosine_with_min_lr(5, 10, 100, 0.1) == 0.5
    assert cosine_with_min_lr(10, 10, 100, 0.1) == 1.0
    assert cosine_with_min_lr(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_stdlib_corpus_split_and_hash():
    a, b = D.stdlib_corpus(), D.stdlib_corpus()
    assert a.num_files > 100 and len(a.val) > 0 and len(a.train) > 10 * len(a.val)
    assert a.hash == b.hash and len(a.hash) == 64
    assert a.train == b.train and a.val == b.val  # the split is a function of the file names only
    assert not any("site-packages" in k for k in a.name.split())


def test_local_corpus_kinds(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i} " * 20}) for i in range(50)))
    c = D.local_corpus(str(tmp_path / "a.jsonl"), text_field="body")
    assert len(c.train) + len(c.val) == 50 and c.val
    (tmp_path / "b.txt").write_text("\n\n".join(f"paragraph {i}" for i in range(40)))
    c2 = D.local_corpus(str(tmp_path / "b.txt"))
    assert len(c2.train) + len(c2.val) == 40 and c2.hash != c.hash
    with pytest.raises(KeyError, match="text-field"):
        D.local_corpus(str(tmp_path / "a.jsonl"))


def test_sampler_deterministic_and_epochs():
    s = D.BlockSampler(10, seed=3)
    first = s.indices(0, 10)
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(D.BlockSampler(10, seed=3).indices(4, 3), first[4:7])
    assert sorted(s.indices(10, 10).tolist()) == list(range(10))  # second epoch: a fresh permutation


def test_smoke_adamw(data_dir, tmp_path):
    s = main(micro_argv(data_dir, tmp_path, "run", "--max-steps", "6", "--eval-every", "3"))
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 32
    assert 1 < summary["eval_ppl"] < 2000 and summary["eval_ppl"] == s["eval_ppl"]
    assert [e["step"] for e in summary["evals"]] == [3, 6]
    n_tensors = len(list(build_model(load_config("llama_micro")).parameters()))
    assert summary["state_bytes"] == 8 * summary["num_params"] + 4 * n_tensors  # exp_avg, exp_avg_sq, fp32 step
    for key in ("tokens_per_s", "peak_mem_bytes", "corpus_hash", "versions", "config", "optimizer"):
        assert summary[key]
    lines = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 7))


def test_max_tokens_and_grad_accum(data_dir, tmp_path):
    s = main(micro_argv(data_dir, tmp_path, "run", "--max-tokens", "700", "--grad-accum", "2"))
    assert s["steps"] == 3 and s["global_batch"] == 8  # ceil(700 / (8 * 32))


def _final_params(run_dir):
    ckpt = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    return checkpoint.read(ckpt)["model"]  # torch.load(weights_only=True)


def _copy_checkpoint(src_dir, dst_dir, step):
    """A checkpoint is its .pt file plus the checksum file beside it."""
    os.makedirs(dst_dir / "checkpoints", exist_ok=True)
    for ext in (".pt", ".json"):
        shutil.copy(src_dir / "checkpoints" / f"step_{step:08d}{ext}", dst_dir / "checkpoints")


@pytest.mark.parametrize("optimizer", ["adamw", "galore_ref"])
def test_resume_is_bitwise_exact(data_dir, tmp_path, optimizer):
    if optimizer == "galore_ref":
        pytest.importorskip("galore_torch")
    # projection refreshed every 2 steps: the resumed run must rebuild the same subspace from restored state
    common = [
        "--max-steps",
        "6",
        "--save-every",
        "3",
        "--keep-checkpoints",
        "5",
        "--optimizer",
        optimizer,
        "--rank",
        "8",
        "--update-proj-gap",
        "2",
    ]
    full = main(micro_argv(data_dir, tmp_path, "full", *common))
    half = tmp_path / "half"
    _copy_checkpoint(tmp_path / "full", half, 3)
    resumed = main(micro_argv(data_dir, tmp_path, "half", *common, "--resume", "auto"))
    assert resumed["resumed_from"].endswith("step_00000003.pt")
    a, b = _final_params(tmp_path / "full"), _final_params(half)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["eval_loss"] == full["eval_loss"]


def test_ddp_two_ranks_equals_single_process(data_dir, tmp_path):
    main(micro_argv(data_dir, tmp_path, "single", "--max-steps", "3", "--batch-size", "4", "--save-every", "3"))
    args = ["-m", "benchmarks.pretrain", *micro_argv(data_dir, tmp_path, "ddp", "--max-steps", "3")]
    args += ["--save-every", "3"]
    args[args.index("--batch-size") + 1] = "2"  # 2 ranks x 2 == 1 process x 4
    launch(2, args, timeout=120)
    a, b = _final_params(tmp_path / "single"), _final_params(tmp_path / "ddp")
    for k in a:  # same samples and maths; only the order of the gradient reduction differs
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    sa, sb = (json.load(open(tmp_path / d / "summary.json")) for d in ("single", "ddp"))
    assert sb["world_size"] == 2 and sa["global_batch"] == sb["global_batch"]
    assert sa["eval_loss"] == pytest.approx(sb["eval_loss"], rel=1e-5)


def test_hf_offline_fails_fast(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t = time.time()
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--model",
                "llama_micro",
                "--data",
                "hf:allenai/c4:en",
                "--cache-dir",
                str(tmp_path),
                "--output-dir",
                str(tmp_path / "out"),
                "--max-steps",
                "1",
            ]
        )
    assert exit_info.value.code == 2
    assert re.search(r"allenai/c4.*(unreachable|OFFLINE)", capsys.readouterr().err)
    assert time.time() - t < 10


def test_hf_tokenizer_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(OSError, match="--tokenizer no-such-org/no-such-tokenizer.*unreachable"):
        D.hf_tokenizer("no-such-org/no-such-tokenizer")
    assert time.time() - t < 10


def test_hf_unreachable_host_fails_fast(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://nonexistent.invalid")
    t = time.time()
    with pytest.raises(ConnectionError, match="hub is unreachable"):
        D.load_corpus("hf:some/dataset")
    assert time.time() - t < 10


def test_optimizer_factory(data_dir, tmp_path):
    from argparse import ArgumentParser

    from benchmarks.optimizers import add_optimizer_args, build_optimizer, state_bytes

    model = build_model(load_config("llama_micro"))
    args = ArgumentParser()
    add_optimizer_args(args)
    ns = args.parse_args(["--lr", "0.01", "--opt-kw", "amsgrad=True", "--rank", "8"])
    opt = build_optimizer("adamw", model, ns)
    assert opt.defaults["amsgrad"] is True and opt.defaults["lr"] == 0.01
    pytest.importorskip("galore_torch")
    ref = build_optimizer("galore_ref", model, ns)
    low = ref.param_groups[1]
    assert low["rank"] == 8 and low["scale"] == 0.25 and len(low["params"]) == 2 * 7
    model(input_ids=torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long)).loss.backward()
    ref.step()
    assert 0 < state_bytes(ref) < 2 * 4 * sum(p.numel() for p in model.parameters())


def test_missing_lowrank_package_is_a_clear_error(monkeypatch, data_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lowrank_optim", None)  # makes `import lowrank_optim` raise ImportError
    t = time.time()
    with pytest.raises(SystemExit) as exit_info:
        main(micro_argv(data_dir, tmp_path, "run", "--optimizer", "fira", "--max-steps", "1"))
    assert exit_info.value.code == 2
    assert "--optimizer fira needs lowrank_optim.FiraAdamW" in capsys.readouterr().err
    assert time.time() - t < 5  # checked before any data preparation


@pytest.mark.parametrize("extra", [[], ["--layerwise"]])
def test_lowrank_galore_smoke(data_dir, tmp_path, extra):
    s = main(
        micro_argv(
            data_dir,
            tmp_path,
            "run",
            "--optimizer",
            "galore",
            "--rank",
            "8",
            "--update-proj-gap",
            "2",
            "--max-steps",
            "4",
            *extra,
        )
    )
    assert s["layerwise"] == bool(extra) and 1 < s["eval_ppl"] < 2000
    assert 0 < s["state_bytes"] < 8 * s["num_params"]  # less than AdamW's two fp32 moments


@pytest.mark.parametrize(
    "optimizer", ["adam8bit", "galore8bit", "galore_adafactor", "fira", "frugal", "dct", "sst", "fira_ref"]
)
def test_every_optimizer_runs_through_pretrain(data_dir, tmp_path, optimizer):
    if optimizer == "fira_ref":
        pytest.importorskip("fira")
    s = main(
        micro_argv(
            data_dir,
            tmp_path,
            "run",
            "--optimizer",
            optimizer,
            "--rank",
            "8",
            "--update-proj-gap",
            "2",
            "--max-steps",
            "3",
        )
    )
    assert 1 < s["eval_ppl"] < 2000 and s["state_bytes"] > 0


@pytest.mark.parametrize("optimizer", ["galore", "fira", "frugal", "dct", "sst", "galore8bit"])
def test_resume_is_bitwise_exact_for_our_optimizers(data_dir, tmp_path, optimizer):
    common = [
        "--max-steps",
        "5",
        "--save-every",
        "3",
        "--keep-checkpoints",
        "5",
        "--optimizer",
        optimizer,
        "--rank",
        "8",
        "--update-proj-gap",
        "2",
    ]
    main(micro_argv(data_dir, tmp_path, "full", *common))
    half = tmp_path / "half"
    _copy_checkpoint(tmp_path / "full", half, 3)
    main(micro_argv(data_dir, tmp_path, "half", *common, "--resume", "auto"))
    a, b = _final_params(tmp_path / "full"), _final_params(half)
    assert all(torch.equal(a[k], b[k]) for k in a)
