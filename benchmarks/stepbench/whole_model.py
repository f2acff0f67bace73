"""Whole-model step comparison (`python -m benchmarks.step_bench --whole-model`): every parameter of a model config,
all optimizers stepped in the same interleaved rounds, medians, ratios against the peer measured in the same run,
and each optimizer's ratio to an estimated floor.

Interleaving: round k steps every optimizer once, starting at a rotating position, so a slow phase of a shared
machine hits all optimizers alike. Rounds 0 .. warmup-1 are warm-up (round 0 computes the first bases and the
state), the next `rounds` rounds are plain steps (their median is "step ms"), and the last round is a steady-state
refresh step of the low-rank optimizers (built with update_proj_gap = warmup + rounds). "amortised ms" =
((gap - 1) * step + refresh step) / gap at --update-proj-gap.

Floor: per low-rank weight (m x n, rank r) the two projection matmuls, 4*m*n*r flops, at the GFLOP/s of the
fastest of 9 runs of a matmul of that weight's shape on this device, plus every dense element at the per-element
speed of torch's fused AdamW in this run. The low-rank weights' own elementwise update is not counted, so this is
a lower bound.
Dense-only optimizers' floor is fused AdamW's own time.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

from .optimizers import LABELS, build, lowrank_method, state_bytes
from .shapes import is_target, lowrank_side
from .timing import _cuda_ms, _wall_ms, median_ms, sync

METHODS = [
    "adamw_foreach",
    "adamw_fused",
    "bnb_adamw8bit",
    "ref_galore",
    "ref_fira",
    "galore",
    "galore_8bit",
    "fira",
    "frugal",
    "dct",
    "sst",
    "galore_adafactor",
    "galore_power",
    "apollo",
    "apollo_mini",
    "ours_dense",
    "ours_dense_unchecked",
]
# (ours, the peer it is compared with in the same run)
PAIRS = [
    ("galore", "ref_galore"),
    ("fira", "ref_fira"),
    ("galore_8bit", "bnb_adamw8bit"),
    ("ours_dense", "adamw_fused"),
    ("ours_dense_unchecked", "adamw_fused"),
]
DENSE_ONLY = ("adamw_foreach", "adamw_fused", "bnb_adamw8bit", "ours_dense", "ours_dense_unchecked")


def _skip(row, err):
    row["note"] = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    print(f"[step_bench] {row['method']}: {row['note']}", file=sys.stderr)


def interleaved_times(bench, methods, args):
    """{method: [seconds per step, in round order]} and the rows of the methods that could not run."""
    probe_gap = args.warmup + args.rounds
    opts, rows = {}, {m: {"method": m, "label": LABELS[m]} for m in methods}
    for m in methods:
        dense, low = bench.params()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opts[m] = build(m, dense, low, args, probe_gap)
        except Exception as err:  # an import failure, or a mode this torch / device does not support
            _skip(rows[m], err)
    times = {m: [] for m in opts}
    for r in range(probe_gap + 1):
        live = [m for m in methods if m in opts]
        shift = r % len(live) if live else 0
        for m in live[shift:] + live[:shift]:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sync(bench.device)
                    t0 = time.perf_counter()
                    opts[m].step()
                    sync(bench.device)
                times[m].append(time.perf_counter() - t0)
            except Exception as err:
                _skip(rows[m], err)
                del opts[m], times[m]
    for m, opt in opts.items():
        rows[m]["state_bytes"] = state_bytes(opt)
    return times, rows


def matmul_gflops(shape, rank, device, timer):
    """GFLOP/s of the projection matmul of one (m, n) weight at `rank` on `device` (2*m*n*r flops)."""
    m, n = shape
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(m, n, generator=gen).to(device)
    if lowrank_side(shape) == "right":
        p = torch.randn(n, rank, generator=gen).to(device)
        ms = timer(lambda: g @ p)
    else:
        p = torch.randn(rank, m, generator=gen).to(device)
        ms = timer(lambda: p @ g)
    return 2 * m * n * rank / (ms * 1e-3) / 1e9


def floor_estimate(bench, rank, fused_ms, timer):
    """(low-rank part ms, dense part ms, {shape: GFLOP/s}) of the floor; None parts when unmeasurable."""
    total = sum(w.numel() for w in bench.weights.values())
    low_shapes = [tuple(s) for n, s in bench.shapes.items() if is_target(n, s) and min(s) > rank]
    gflops = {s: matmul_gflops(s, rank, bench.device, timer) for s in sorted(set(low_shapes))}
    low_ms = sum(4 * s[0] * s[1] * rank / (gflops[s] * 1e9) * 1e3 for s in low_shapes)
    dense_elements = total - sum(s[0] * s[1] for s in low_shapes)
    dense_ms = fused_ms * dense_elements / total if fused_ms else None
    return low_ms, dense_ms, gflops


def whole_model_rows(bench, args):
    methods = args.methods
    times, rows = interleaved_times(bench, methods, args)
    probe_gap, gap = args.warmup + args.rounds, args.update_proj_gap
    for m, t in times.items():
        row = rows[m]
        row["step_ms"] = median_ms(t[args.warmup : probe_gap])
        row["rounds"] = len(t)
        if lowrank_method(m):
            row["refresh_step_ms"] = 1e3 * t[probe_gap]
            row["amortised_ms"] = ((gap - 1) * row["step_ms"] + row["refresh_step_ms"]) / gap
        else:
            row["amortised_ms"] = row["step_ms"]
    fused = rows.get("adamw_fused", {}).get("step_ms")
    timer = _cuda_ms if bench.device.type == "cuda" else (lambda fn: _wall_ms(fn, reps=9, best=True))
    low_ms, dense_ms, gflops = floor_estimate(bench, args.rank, fused, timer)
    floor = {
        "lowrank_ms": low_ms,
        "dense_ms": dense_ms,
        "fused_adamw_ms": fused,
        "matmul_gflops": {"x".join(map(str, s)): g for s, g in gflops.items()},
        "lowrank_total_ms": None if dense_ms is None else low_ms + dense_ms,
    }
    for m in methods:
        row = rows[m]
        ref = fused if m in DENSE_ONLY else floor["lowrank_total_ms"]
        row["floor_ms"] = ref
        row["vs_floor"] = row["amortised_ms"] / ref if ref and "amortised_ms" in row else None
    pairs = []
    for ours, peer in PAIRS:
        a, b = rows.get(ours, {}), rows.get(peer, {})
        ok = "step_ms" in a and "step_ms" in b
        pairs.append(
            {
                "ours": ours,
                "peer": peer,
                "label": f"{LABELS[ours]} / {LABELS[peer]}",
                "step_ratio": a["step_ms"] / b["step_ms"] if ok else None,
                "amortised_ratio": a["amortised_ms"] / b["amortised_ms"] if ok else None,
                "state_ratio": a["state_bytes"] / b["state_bytes"] if ok and b["state_bytes"] else None,
            }
        )
    return [rows[m] for m in methods], pairs, floor


def whole_model_markdown(result):
    from .report import _fmt, _mib, _table

    m, s, f = result["machine"], result["setup"], result["floor"]
    lines = [
        f"# Whole-model optimizer step: {s['what']}",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}",
        f"- machine: {m['platform']}, {m['cpu_count']} CPUs (torch threads {m['torch_threads']}), torch "
        f"{m['torch']}, device {m['device']} ({m['device_name']})",
        f"- weights: {s['n_params']:,} elements in {s['n_tensors']} tensors, {s['n_lowrank']} low-rank "
        f"targets at rank {s['rank']}; every optimizer stepped once per round, {s['warmup']} warm-up + "
        f"{s['rounds']} timed rounds + 1 refresh round, interleaved; medians; amortised at "
        f"update_proj_gap={s['update_proj_gap']}",
        "",
        "## Step time, state, floor",
        "",
        _table(
            [
                "optimizer",
                "step ms (median)",
                "refresh step ms",
                "amortised ms",
                "state MiB",
                "floor ms",
                "amortised / floor",
                "note",
            ],
            [
                [
                    r["label"],
                    r.get("step_ms"),
                    r.get("refresh_step_ms"),
                    r.get("amortised_ms"),
                    _mib(r.get("state_bytes")),
                    r.get("floor_ms"),
                    r.get("vs_floor"),
                    r.get("note", ""),
                ]
                for r in result["rows"]
            ],
        ),
        "",
        "## Ours against the peer measured in the same run",
        "",
        _table(
            ["pair", "step ratio", "amortised ratio", "state ratio"],
            [[p["label"], p["step_ratio"], p["amortised_ratio"], p["state_ratio"]] for p in result["pairs"]],
        ),
        "",
        "## Floor",
        "",
        f"Low-rank floor = sum over low-rank weights of 4*m*n*r flops at the best measured matmul GFLOP/s of that "
        f"shape ({_fmt(f['lowrank_ms'])} ms) + the dense elements at fused AdamW's per-element speed "
        f"({_fmt(f['dense_ms'])} ms) = {_fmt(f['lowrank_total_ms'])} ms. Dense-only rows (torch AdamW, "
        f"bitsandbytes, ours dense) use fused AdamW's time ({_fmt(f['fused_adamw_ms'])} ms). The low-rank "
        "weights' own elementwise update is not in the floor, so it is a lower bound.",
        "",
        _table(["weight shape", "matmul GFLOP/s"], [[k, v] for k, v in f["matmul_gflops"].items()]),
        "",
    ]
    return "\n".join(lines)
