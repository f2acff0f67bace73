"""`python -m benchmarks.memory`: the table is written and its numbers are the estimator's."""

import pytest

pytest.importorskip("transformers")


def test_memory_table(tmp_path):
    from benchmarks.memory import main

    out = tmp_path / "t.md"
    rows = main(["--model", "llama_micro", "--rank", "8", "--output", str(out)])
    by_label = {label: (b, ratio) for label, b, ratio in rows}
    assert by_label["AdamW (fp32 states)"][1] == 1.0
    assert by_label["GaLore 8-bit"][0] < by_label["GaLore (svd)"][0] < by_label["AdamW (fp32 states)"][0]
    text = out.read_text()
    assert "Command: `python -m benchmarks.memory" in text and "| GaLore (svd) |" in text
