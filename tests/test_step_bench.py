"""benchmarks.step_bench on tiny shapes: rows exist, times and bytes are positive, ratios use the same run."""

import json
import math

import pytest
import torch
from bench_support import one_torch_thread  # noqa: E402,F401 - autouse fixture

from benchmarks import step_bench
from benchmarks.stepbench import kernels as kernel_tables
from benchmarks.stepbench import timing

FAST = ["--warmup", "1", "--iters", "2", "--refresh-iters", "1", "--rank", "8"]


def _rows(result):
    return {r["method"]: r for r in result["step"]}


def test_shapes_run_with_ratios_against_same_run_baseline(tmp_path):
    out = tmp_path / "bench.md"
    result = step_bench.main(
        [
            "--shapes",
            "64x32,32x64",
            "--methods",
            "adamw_fused,galore,dct,frugal",
            "--projectors",
            "svd,dct,random",
            "--output",
            str(out),
            *FAST,
        ]
    )
    rows = _rows(result)
    assert list(rows) == ["adamw_foreach", "adamw_fused", "galore", "dct", "frugal"]  # baseline added first
    base = rows["adamw_foreach"]
    for name in ("adamw_foreach", "galore", "dct", "frugal"):
        r = rows[name]
        assert r["step_ms"] > 0 and r["amortised_ms"] > 0 and r["state_bytes"] > 0, r
        assert math.isclose(r["step_vs_adamw"], r["step_ms"] / base["step_ms"])
        assert math.isclose(r["bytes_vs_adamw"], r["state_bytes"] / base["state_bytes"])
    assert base["step_vs_adamw"] == 1.0
    # AdamW keeps two fp32 moments per element; a rank-8 projection of 64x32 / 32x64 keeps far fewer
    assert base["state_bytes"] >= 2 * 4 * 2 * 64 * 32
    assert rows["galore"]["state_bytes"] < base["state_bytes"]
    assert rows["galore"]["refresh_step_ms"] > 0
    # table 2: one row per (distinct shape, projector), svd is its own reference
    refresh = result["refresh"]
    assert {(tuple(r["shape"]), r["projector"]) for r in refresh} == {
        (s, p) for s in ((64, 32), (32, 64)) for p in ("svd", "dct", "random")
    }
    assert all(r["refresh_ms"] > 0 for r in refresh)
    assert all(r["vs_svd"] == 1.0 for r in refresh if r["projector"] == "svd")
    # both files, the JSON with the same rows and the command in the Markdown header
    text = out.read_text()
    assert "python -m benchmarks.step_bench --shapes 64x32,32x64" in text and "| ours GaLoreAdamW |" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in saved["step"]] == list(rows)
    assert saved["machine"]["torch"] == torch.__version__


def test_model_config_layers():
    result = step_bench.main(
        ["--model", "llama_micro", "--layers", "1", "--methods", "galore", "--projectors", "", *FAST]
    )
    setup = result["setup"]
    assert "1 of 2 transformer layers" in setup["scope"] and "WITHOUT embeddings" in setup["scope"]
    assert setup["n_tensors"] == 7 + 2 and setup["n_lowrank"] == 7  # q k v o gate up down + two RMSNorms
    assert _rows(result)["galore"]["step_ms"] > 0
    assert result["refresh"] == [] and "needs CUDA" in result["kernels_note"]


def test_8bit_table():
    # 512x256 at rank 16 gives 512x16 moments: >= 4096 elements, so they are stored in 8 bits
    result = step_bench.main(
        ["--shapes", "512x256", "--methods", "galore,galore_8bit", "--projectors", "", *FAST[:-2], "--rank", "16"]
    )
    bits = {(r["state_bits"], r["backend"]): r for r in result["bits"]}
    assert bits[(32, "-")]["step_ms"] > 0 and bits[(8, "torch")]["step_ms"] > 0
    assert bits[(8, "torch")]["state_bytes"] < bits[(32, "-")]["state_bytes"]
    assert math.isclose(
        bits[(8, "torch")]["bytes_vs_fp32"], bits[(8, "torch")]["state_bytes"] / bits[(32, "-")]["state_bytes"]
    )
    assert "needs CUDA" in bits[(8, "triton")]["note"]


def test_failed_method_is_a_noted_row_not_a_crash(monkeypatch):
    from benchmarks.stepbench import optimizers

    real = optimizers.build

    def broken(method, *a):
        if method == "sst":
            raise ImportError("lowrank_optim.sst is being written")
        return real(method, *a)

    monkeypatch.setattr(optimizers, "build", broken)
    result = step_bench.main(["--shapes", "48x40", "--methods", "sst", "--projectors", "", *FAST])
    sst = _rows(result)["sst"]
    assert "skipped: ImportError" in sst["note"] and sst["step_vs_adamw"] is None
    assert "| ours SSTAdamW | - |" in step_bench.to_markdown(result)


def test_peak_lookup():
    assert kernel_tables.peak_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert kernel_tables.peak_gbps("NVIDIA H100 PCIe") == 2000
    assert kernel_tables.peak_gbps("NVIDIA H200") == 4800
    assert kernel_tables.peak_gbps("Some CPU") is None


def test_kernel_table_runs_through_the_interpreter():
    """The CUDA-only table's code path, with the Triton interpreter and a wall-clock timer on CPU."""
    from lowrank_optim.kernels import interpreter_enabled, triton_available

    if not (triton_available() and interpreter_enabled()):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    rows = kernel_tables.kernel_rows(
        {"w.mlp.weight": (300, 40)}, 8, torch.device("cpu"), peak=100.0, timer=lambda fn: timing._wall_ms(fn, reps=1)
    )
    kernels = {r["kernel"]: r for r in rows}
    assert set(kernels) >= {
        "quantize_blockwise",
        "dequantize_blockwise",
        "adam8bit_step",
        "project_rows",
        "project_back_apply",
        "project_back_apply_dense",
    }
    for name, r in kernels.items():
        if "ms" in r:
            assert r["ms"] > 0 and (name.startswith("adam8bit_step vs") or r["gbps"] > 0), r


def test_whole_model_interleaved_with_peers_and_floor(tmp_path):
    out = tmp_path / "whole.md"
    result = step_bench.main(
        [
            "--whole-model",
            "--model",
            "llama_micro",
            "--rank",
            "8",
            "--warmup",
            "1",
            "--rounds",
            "2",
            "--update-proj-gap",
            "50",
            "--output",
            str(out),
        ]
    )
    rows = {r["method"]: r for r in result["rows"]}
    setup = result["setup"]
    # every parameter of llama_micro: embeddings, 2 layers x (7 matrices + 2 norms), final norm, head
    assert setup["n_tensors"] == 2 + 2 * 9 + 1 and "with embeddings + lm_head" in setup["scope"]
    assert setup["n_params"] == sum(p.numel() for p in _micro_model().parameters())
    assert list(rows) == step_bench.WHOLE_METHODS
    for name, r in rows.items():
        if "note" in r:  # a peer package missing here is a noted row, never a crash
            assert r["note"].startswith("skipped:") and name in ("bnb_adamw8bit", "ref_galore", "ref_fira"), r
            continue
        assert r["rounds"] == 1 + 2 + 1 and r["step_ms"] > 0 and r["state_bytes"] > 0  # interleaved rounds
        assert math.isclose(r["vs_floor"], r["amortised_ms"] / r["floor_ms"])
        if name in ("adamw_foreach", "adamw_fused", "bnb_adamw8bit", "ours_dense", "ours_dense_unchecked"):
            assert r["amortised_ms"] == r["step_ms"] and r["floor_ms"] == rows["adamw_fused"]["step_ms"]
        else:
            assert r["amortised_ms"] == pytest.approx((49 * r["step_ms"] + r["refresh_step_ms"]) / 50)
    # low-rank state is smaller than AdamW's; our dense group keeps AdamW's two moments
    assert rows["galore"]["state_bytes"] < rows["adamw_foreach"]["state_bytes"]
    assert rows["ours_dense"]["state_bytes"] >= 8 * setup["n_params"]
    pairs = {(p["ours"], p["peer"]): p for p in result["pairs"]}
    assert set(pairs) == {
        ("galore", "ref_galore"),
        ("fira", "ref_fira"),
        ("galore_8bit", "bnb_adamw8bit"),
        ("ours_dense", "adamw_fused"),
        ("ours_dense_unchecked", "adamw_fused"),
    }
    p = pairs[("ours_dense", "adamw_fused")]
    assert math.isclose(p["step_ratio"], rows["ours_dense"]["step_ms"] / rows["adamw_fused"]["step_ms"])
    floor = result["floor"]
    assert (
        floor["lowrank_ms"] > 0
        and floor["dense_ms"] > 0
        and set(floor["matmul_gflops"]) == {"64x64", "176x64", "64x176"}
    )
    assert floor["lowrank_total_ms"] == pytest.approx(floor["lowrank_ms"] + floor["dense_ms"])
    text = out.read_text()
    assert "python -m benchmarks.step_bench --whole-model --model llama_micro" in text and "4*m*n*r" in text
    assert "| ours GaLoreAdamW / galore-torch GaLoreAdamW |" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in saved["rows"]] == list(rows) and saved["machine"]["torch"] == torch.__version__


def test_whole_model_one_layer_of_a_config():
    result = step_bench.main(
        [
            "--whole-model",
            "--model",
            "llama_micro",
            "--layers",
            "1",
            "--rank",
            "8",
            "--methods",
            "adamw_fused,galore",
            "--warmup",
            "1",
            "--rounds",
            "1",
        ]
    )
    assert result["setup"]["n_tensors"] == 9 and "WITHOUT embeddings" in result["setup"]["scope"]
    assert [r["method"] for r in result["rows"]] == ["adamw_fused", "galore"]


def _micro_model():
    from benchmarks.model import build_model, load_config

    return build_model(load_config("llama_micro"))
