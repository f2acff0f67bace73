"""The GPU report's dry run: the same code paths on CPU with tiny shapes (kernels through the Triton interpreter),
writing its Markdown and JSON files."""

import json

import pytest

pytest.importorskip("triton")

from benchmarks import gpu_report  # noqa: E402
from lowrank_optim import quant  # noqa: E402
from lowrank_optim.kernels import interpreter_enabled, selfcheck  # noqa: E402

if not interpreter_enabled():
    pytest.skip("the dry run needs TRITON_INTERPRET=1", allow_module_level=True)


def test_dry_run_writes_a_complete_report(tmp_path):
    backend = quant.get_backend()
    gpu_report.main(["--dry-run", "--output-dir", str(tmp_path)])
    assert quant.get_backend() == backend  # restored
    report = json.loads((tmp_path / "report.json").read_text())
    md = (tmp_path / "report.md").read_text()
    assert report["meta"]["dry_run"] is True and report["skipped"] == []

    checks = report["kernel_checks"]
    assert len(checks) == len(selfcheck.DEFAULT_CASES) and all(c["ok"] for c in checks), checks
    assert {c["kernel"] for c in checks} == set(selfcheck.CHECKS)

    timed = {r["kernel"]: r for r in report["bandwidth"]}
    for name in selfcheck.CHECKS:
        assert timed[name]["ms"] > 0 and timed[name]["gb_s"] > 0 and timed[name]["torch_ms"] > 0, timed[name]
    assert {"bnb quantize_blockwise", "bnb dequantize_blockwise", "bnb AdamW8bit step"} <= set(timed)

    steps = report["optimizer_steps"]
    assert [r["optimizer"] for r in steps] == list(gpu_report.OPTIMIZERS)
    assert all("error" not in r and r["step_ms"] > 0 for r in steps), steps

    slices = report["layerwise"]["slices"]
    assert [s["layers"] for s in slices] == [1, 2]
    assert all(s["grads_left"] == 0 for s in slices)  # layer-wise: every gradient freed inside backward
    assert slices[1]["state_bytes"] > slices[0]["state_bytes"] > 0

    for header in ("## 1. Kernels", "## 2. Kernel bandwidth", "## 3. Optimizer step times", "## 4. Layer-wise"):
        assert header in md
    assert md.count("| llama_micro |") == len(gpu_report.OPTIMIZERS)


def test_shapes_follow_the_configs():
    shapes = gpu_report.load_shapes("llama_60m")
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (512, 1376)
    assert shapes["lm_head.weight"] == (32000, 512)
    assert sum(1 for n in shapes if n.endswith("q_proj.weight")) == 8
    total = sum(a * (b[0] if b else 1) for a, *b in (s for s in shapes.values()))
    assert 55e6 < total < 60e6  # LLaMA-60M: ~58M parameters
    assert gpu_report.load_shapes("llama_micro", max_vocab=128)["lm_head.weight"] == (128, 64)
