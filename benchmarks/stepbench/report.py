"""Markdown of the step benchmark's tables."""


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _mib(b):
    return None if b is None else b / 2**20


def _note(row):
    if "note" in row:
        return row["note"]
    return f"8-bit: {row['backend']}" if "backend" in row else ""


def _table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(result):
    m, s = result["machine"], result["setup"]
    out = [
        f"# Optimizer step benchmark: {s['what']}",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}",
        f"- machine: {m['platform']}, {m['cpu_count']} CPUs (torch threads {m['torch_threads']}), "
        f"torch {m['torch']}, device {m['device']} ({m['device_name']})"
        + (f", load average {m['loadavg_1_5_15']} at start" if "loadavg_1_5_15" in m else ""),
        f"- weights: {s['n_params']:,} elements in {s['n_tensors']} tensors ({s['n_lowrank']} low-rank targets "
        f"with min side > rank {s['rank']}); {s['scope']}",
        f"- timing: median of {s['iters']} plain steps after {s['warmup']} warm-up step(s); refresh step = one "
        f"steady-state refresh step; amortised at update_proj_gap={s['update_proj_gap']}"
        + ("; step ms INCLUDES the refresh step (mean)" if s["include_refresh"] else ""),
        "",
    ]
    out += [
        "## 1. Optimizer step time and state",
        "",
        _table(
            [
                "optimizer",
                "step ms",
                "refresh step ms",
                "amortised ms",
                "state MiB",
                "step / AdamW",
                "amortised / AdamW",
                "state / AdamW",
                "note",
            ],
            [
                [
                    r["label"],
                    r.get("step_ms"),
                    r.get("refresh_step_ms"),
                    r.get("amortised_ms"),
                    _mib(r.get("state_bytes")),
                    r.get("step_vs_adamw"),
                    r.get("amortised_vs_adamw"),
                    r.get("bytes_vs_adamw"),
                    _note(r),
                ]
                for r in result["step"]
            ],
        ),
        "",
        "Ratios are against torch AdamW (foreach) in this same run.",
        "",
    ]
    if result["refresh"]:
        out += [
            "## 2. Projector refresh time",
            "",
            _table(
                ["shape", "side", "count", "projector", "refresh ms", "vs svd", "note"],
                [
                    [
                        "x".join(map(str, r["shape"])),
                        r["side"],
                        r["count"],
                        r["projector"],
                        r.get("refresh_ms"),
                        r.get("vs_svd"),
                        r.get("note", ""),
                    ]
                    for r in result["refresh"]
                ],
            ),
            "",
        ]
    if result["bits"]:
        out += [
            "## 3. fp32 vs 8-bit states (ours, GaLoreAdamW)",
            "",
            _table(
                ["state bits", "8-bit backend", "step ms", "state MiB", "step / fp32", "state / fp32", "note"],
                [
                    [
                        r["state_bits"],
                        r["backend"],
                        r.get("step_ms"),
                        _mib(r.get("state_bytes")),
                        r.get("step_vs_fp32"),
                        r.get("bytes_vs_fp32"),
                        r.get("note", ""),
                    ]
                    for r in result["bits"]
                ],
            ),
            "",
        ]
    out += ["## 4. Triton kernels", ""]
    if result["kernels"]:
        peak = result["setup"].get("peak_gbps")
        out += [
            f"Peak bandwidth used for the fraction: {peak} GB/s.",
            "",
            _table(
                ["kernel", "shape", "ms", "GB/s", "of peak", "torch ms", "vs torch", "bnb ms", "vs bnb", "note"],
                [
                    [
                        r["kernel"],
                        "x".join(map(str, r["shape"])),
                        r.get("ms"),
                        r.get("gbps"),
                        r.get("peak_frac"),
                        r.get("torch_ms"),
                        r.get("speedup_vs_torch"),
                        r.get("bnb_ms"),
                        r.get("speedup_vs_bnb"),
                        r.get("note", ""),
                    ]
                    for r in result["kernels"]
                ],
            ),
            "",
        ]
    else:
        out += [result.get("kernels_note", "not run"), ""]
    return "\n".join(out)
