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


def test_fsdp_state_table(tmp_path):
    """`python -m benchmarks.fsdp_state`: per-rank bytes against a closed form. AdamW holds 8 bytes per element
    (split over ranks) and one 4-byte step count per parameter (on every rank): over 2 ranks, the two ranks
    together hold world 1's bytes plus one more count per parameter."""
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.fsdp_state import main
    from benchmarks.model import load_config

    out = tmp_path / "f.md"
    rows = main(["--models", "llama_micro:8", "--worlds", "1,2", "--output", str(out)])["llama_micro"]
    with torch.device("meta"):
        params = list(LlamaForCausalLM(load_config("llama_micro")).parameters())
    adamw = {world: (most, least) for label, world, most, least, _, _ in rows if label == "AdamW"}
    assert adamw[1] == (8 * sum(p.numel() for p in params) + 4 * len(params),) * 2
    assert sum(adamw[2]) == adamw[1][0] + 4 * len(params)
    assert all(ok for *_, ok in rows)
    text = out.read_text()
    assert "Command: `python -m benchmarks.fsdp_state" in text and "| GaLore 8-bit | 2 |" in text
