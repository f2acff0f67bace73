"""benchmarks.refresh_bench on tiny settings: every part runs, rows are complete, ratios use the same run."""

import math

from benchmarks import refresh_bench

TINY = [
    "--shapes",
    "48x32,32x48",
    "--ranks",
    "4,8",
    "--repeats",
    "1",
    "--power-model",
    "llama_micro",
    "--power-ranks",
    "4",
    "--power-refreshes",
    "2",
    "--power-gap",
    "1",
    "--bits-cases",
    "40x24x4",
    "--galore-steps",
    "6",
    "--galore-seeds",
    "1",
]


def test_every_part_runs_and_reports(tmp_path):
    out = tmp_path / "refresh.md"
    result = refresh_bench.main([*TINY, "--output", str(out)])
    rows = result["time"]
    assert {(tuple(r["shape"]), r["rank"], r["projector"]) for r in rows} == {
        (s, r, p) for s in ((48, 32), (32, 48)) for r in (4, 8) for p in refresh_bench.TIMED
    }
    for r in rows:
        svd = next(x for x in rows if x["shape"] == r["shape"] and x["projector"] == "svd")
        assert r["ms"] > 0 and math.isclose(r["vs_svd"], r["ms"] / svd["ms"])
    assert {r["side"] for r in rows} == {"left", "right"}
    quality = result["power"]["rows"]
    assert len(quality) == 5 and all(0 < q["mean"] <= 1 + 1e-4 and q["min"] <= q["mean"] for q in quality)
    recon = result["bits"]["reconstruction"]
    assert {(r["side"], r["bits"]) for r in recon} == {(s, b) for s in ("left", "right") for b in (8, 4)}
    assert all(0 < r["rel_err"] < 0.5 and r["bytes_vs_fp32"] < 0.5 for r in recon)
    drift = {(r["projector"], r["bits"]): r["drift"] for r in result["bits"]["galore"]}
    assert drift[("svd", 32)] == 0.0 and drift[("power", 32)] == 0.0 and drift[("svd", 4)] > 0
    text = out.read_text()
    assert "--shapes 48x32,32x48" in text and "| 48x32 | right | 4 |" in text and "## Quantized bases" in text
