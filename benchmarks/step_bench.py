"""Optimizer step benchmark: step time, state bytes, projector refresh time, 8-bit paths and Triton kernels.

    python -m benchmarks.step_bench --model llama_60m --rank 128 --output benchmarks/results/step_bench_cpu.md

Benchmarks the optimizers on a model config's weight SHAPES (no model, no forward/backward): every parameter gets a
fixed random gradient (seeded), so only the optimizer's own work is timed. Tables:

1. step time + state bytes per optimizer, ratios against torch AdamW (foreach) measured in the same run;
2. projector refresh time per distinct low-rank weight shape, ratio against svd;
3. our low-rank Adam with fp32 vs 8-bit states (and the 8-bit path's torch vs Triton backend on CUDA);
4. CUDA only: each Triton kernel's time and achieved bandwidth vs the device's peak, and our fused 8-bit Adam update
   vs bitsandbytes' CUDA AdamW8bit on the same tensors.

Step timing: the optimizer is built with update_proj_gap = warmup + iters, so step 0 (first basis, state init) is
warm-up, the next `iters` steps are plain steps (their median is "step ms") and step warmup + iters is a steady-state
refresh step ("refresh step ms"). "amortised ms" = ((gap - 1) * step + refresh step) / gap at --update-proj-gap.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections import OrderedDict

import torch

BASELINE = "adamw_foreach"
PROJECTOR_NAMES = ("svd", "rsvd", "dct", "random", "columns", "sst")
# Ours: (module, class, extra low-rank group keys). Each takes the shared group keys rank + update_proj_gap.
OURS = OrderedDict([
    ("galore", ("lowrank_optim.galore", "GaLoreAdamW", dict(scale=0.25, proj_type="std"))),
    ("galore_8bit", ("lowrank_optim.galore", "GaLoreAdamW8bit", dict(scale=0.25, proj_type="std"))),
    ("galore_adafactor", ("lowrank_optim.galore", "GaLoreAdafactor", dict(scale=0.25, proj_type="std"))),
    ("fira", ("lowrank_optim.fira", "FiraAdamW", dict(scale=0.25, proj_type="std"))),
    ("frugal", ("lowrank_optim.frugal", "FrugalAdamW", {})),
    ("dct", ("lowrank_optim.dct", "DCTAdamW", {})),
    ("sst", ("lowrank_optim.sst", "SSTAdamW", {})),
])
# Methods whose projector our --projector flag may replace (the others have their own: columns, dct, sst).
SVD_BASED_OURS = ("galore", "galore_8bit", "galore_adafactor", "fira")
METHODS = ["adamw_foreach", "adamw_fused", "bnb_adamw8bit", "ref_galore", "ref_fira", *OURS]
LABELS = {
    "adamw_foreach": "torch AdamW (foreach)", "adamw_fused": "torch AdamW (fused)",
    "bnb_adamw8bit": "bitsandbytes AdamW8bit", "ref_galore": "galore-torch GaLoreAdamW", "ref_fira": "fira FiraAdamW",
    "galore": "ours GaLoreAdamW", "galore_8bit": "ours GaLoreAdamW8bit", "galore_adafactor": "ours GaLoreAdafactor",
    "fira": "ours FiraAdamW", "frugal": "ours FrugalAdamW", "dct": "ours DCTAdamW", "sst": "ours SSTAdamW",
}
# Peak HBM bandwidth in GB/s by device-name substring; the first match wins, so specific names come first.
PEAK_GBPS = [("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350), ("H200", 4800), ("GH200", 4000),
             ("B200", 8000), ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864),
             ("L40", 864), ("A10G", 600), ("A10", 600), ("L4", 300), ("V100", 900), ("T4", 320),
             ("RTX 4090", 1008), ("RTX 3090", 936)]


# ----------------------------------------------------------------------------- shapes
def parse_shapes(text):
    """'64x32,32x64' -> OrderedDict w0 -> (64, 32), ...; every such weight is a low-rank target."""
    out = OrderedDict()
    for i, item in enumerate(s for s in text.split(",") if s.strip()):
        dims = tuple(int(d) for d in item.lower().split("x"))
        if len(dims) != 2 or min(dims) <= 0:
            raise ValueError(f"--shapes item {item!r}: expected MxN with positive M, N")
        out[f"w{i}.mlp.weight"] = dims
    return out


def _config_shapes(config):
    """LLaMA 2-D weight shapes computed from the config (used when benchmarks.model.weight_shapes is missing)."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = h // config.num_attention_heads * getattr(config, "num_key_value_heads", config.num_attention_heads)
    out = OrderedDict([("model.embed_tokens.weight", (v, h))])
    for i in range(config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out.update({f"{a}.q_proj.weight": (h, h), f"{a}.k_proj.weight": (kv, h), f"{a}.v_proj.weight": (kv, h),
                    f"{a}.o_proj.weight": (h, h), f"{m}.gate_proj.weight": (f, h), f"{m}.up_proj.weight": (f, h),
                    f"{m}.down_proj.weight": (h, f)})
    out["lm_head.weight"] = (v, h)
    return out


def model_shapes(model, layers, include_embeddings):
    """name -> shape of the weights to bench: the first `layers` transformer layers (0 = all) with their RMSNorm
    weights, plus embed_tokens, lm_head and the final norm when include_embeddings."""
    from benchmarks.model import load_config

    config = load_config(model)
    try:
        from benchmarks.model import weight_shapes

        shapes = weight_shapes(config)
    except ImportError:
        shapes = _config_shapes(config)
    n = config.num_hidden_layers if not layers else min(layers, config.num_hidden_layers)
    h = config.hidden_size
    out = OrderedDict()
    for name, shape in shapes.items():
        parts = name.split(".")
        in_layer = "layers" in parts and int(parts[parts.index("layers") + 1]) < n
        if in_layer or (include_embeddings and "layers" not in parts):
            out[name] = tuple(shape)
    for i in range(n):
        out[f"model.layers.{i}.input_layernorm.weight"] = (h,)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (h,)
    if include_embeddings:
        out["model.norm.weight"] = (h,)
    return out, n, config.num_hidden_layers


def is_target(name, shape):
    """GaLore's recipe: 2-D weights of attention and MLP modules are low-rank, everything else dense."""
    module = name.rsplit(".", 1)[0]
    return len(shape) == 2 and ("attn" in module or "mlp" in module)


def lowrank_side(shape):
    """The side the engine projects for proj_type "std" (right for tall, left for wide)."""
    return "right" if shape[0] >= shape[1] else "left"


# ----------------------------------------------------------------------------- timing helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(times):
    return 1e3 * statistics.median(times) if times else None


class Bench:
    """Weights and fixed random gradients on `device`; each optimizer gets fresh copies of the same weights."""

    def __init__(self, shapes, device, seed):
        self.shapes, self.device = shapes, device
        gen = torch.Generator().manual_seed(seed)
        self.weights = OrderedDict((n, (torch.randn(s, generator=gen) * 0.02).to(device)) for n, s in shapes.items())
        self.grads = OrderedDict((n, torch.randn(s, generator=gen).to(device)) for n, s in shapes.items())

    def params(self):
        """(dense, low-rank) fresh parameter lists with .grad set (the gradient tensors are shared, read-only)."""
        dense, low = [], []
        for name, w in self.weights.items():
            p = torch.nn.Parameter(w.clone())
            p.grad = self.grads[name]
            (low if is_target(name, w.shape) else dense).append(p)
        return dense, low


def time_steps(opt, steps, device):
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- optimizers
def _groups(dense, low, lowrank_keys):
    groups = [{"params": dense}] if dense else []
    if low:
        groups.append({"params": low, **lowrank_keys})
    return groups


def build(method, dense, low, args, gap):
    """The optimizer `method` over (dense, low-rank) params; low-rank groups refresh every `gap` steps."""
    lr = args.lr
    if method in ("adamw_foreach", "adamw_fused"):
        return torch.optim.AdamW(dense + low, lr=lr, foreach=method == "adamw_foreach",
                                 fused=True if method == "adamw_fused" else None)
    if method == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(dense + low, lr=lr)
    keys = dict(rank=args.rank, update_proj_gap=gap)
    if method == "ref_galore":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(_groups(dense, low, dict(keys, scale=0.25, proj_type="std")), lr=lr,
                           no_deprecation_warning=True)
    if method == "ref_fira":
        from fira import FiraAdamW

        return FiraAdamW(_groups(dense, low, dict(keys, alpha=0.25, proj_type="std")), lr=lr,
                         no_deprecation_warning=True)
    module, cls_name, extra = OURS[method]
    cls = getattr(importlib.import_module(module), cls_name)
    keys.update(extra)
    if args.projector and method in SVD_BASED_OURS:
        keys["projector"] = args.projector
    kw = {} if method == "galore_adafactor" else {"lr": lr}  # Adafactor keeps its relative-step schedule
    return cls(_groups(dense, low, keys), **kw)


def state_bytes(opt):
    from benchmarks.optimizers import state_bytes as count

    return count(opt)


def lowrank_method(method):
    return method not in ("adamw_foreach", "adamw_fused", "bnb_adamw8bit")


def measure(bench, method, args):
    """One row of table 1 (times in ms), or a row with a `note` when the method cannot run here."""
    row = {"method": method, "label": LABELS[method]}
    dense, low = bench.params()
    probe_gap = args.warmup + args.iters
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation / dense-fallback warnings, once per optimizer
            opt = build(method, dense, low, args, probe_gap)
            has_refresh = lowrank_method(method) and bool(low)
            times = time_steps(opt, probe_gap + (1 if has_refresh and args.refresh_sample else 0), bench.device)
    except Exception as err:  # an import failure, or a mode this torch / device does not support
        row["note"] = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        print(f"[step_bench] {method}: {row['note']}", file=sys.stderr)
        return row
    plain = times[args.warmup:probe_gap]
    refresh = times[probe_gap:]
    row["step_ms"] = median_ms(plain)
    if refresh:
        row["refresh_step_ms"] = 1e3 * refresh[0]
        gap = args.update_proj_gap
        row["amortised_ms"] = ((gap - 1) * row["step_ms"] + row["refresh_step_ms"]) / gap
        if args.include_refresh:  # the mean keeps the refresh step visible (a median would drop it)
            row["step_ms"] = 1e3 * statistics.mean(plain + refresh)
    else:
        row["amortised_ms"] = row["step_ms"]
    row["state_bytes"] = state_bytes(opt)
    if method.endswith("8bit"):
        row["backend"] = resolved_backend(bench.device) if method == "galore_8bit" else "bitsandbytes"
    del opt
    return row


def add_ratios(rows, baseline=BASELINE):
    """step / bytes ratios against the baseline row of the SAME run (None when the baseline did not run)."""
    base = next((r for r in rows if r["method"] == baseline and "step_ms" in r), None)
    for r in rows:
        ok = base is not None and "step_ms" in r
        r["step_vs_adamw"] = r["step_ms"] / base["step_ms"] if ok else None
        r["amortised_vs_adamw"] = r["amortised_ms"] / base["step_ms"] if ok else None
        r["bytes_vs_adamw"] = r["state_bytes"] / base["state_bytes"] if ok and base["state_bytes"] else None
    return rows


def resolved_backend(device):
    """Which backend our 8-bit path uses for tensors on `device` ("auto" resolves per tensor)."""
    from lowrank_optim import quant

    chosen = quant.get_backend()
    if chosen != "auto":
        return chosen
    if device.type != "cuda":
        return "torch"
    from triton_kernels import triton_available

    return "triton" if triton_available() else "torch"


# ----------------------------------------------------------------------------- table 2: projector refresh
def refresh_rows(bench, args):
    from lowrank_optim.projectors import make_projector

    counts = OrderedDict()
    for name, shape in bench.shapes.items():
        if is_target(name, shape) and min(shape) > args.rank:
            counts[shape] = counts.get(shape, 0) + 1
    rows = []
    for shape, count in counts.items():
        side = lowrank_side(shape)
        grad = bench.grads[next(n for n, s in bench.shapes.items() if s == shape)]
        shape_rows = []
        for pname in args.projectors:
            row = {"shape": list(shape), "side": side, "count": count, "projector": pname}
            try:
                proj = make_projector(pname, args.rank, side, shape, seed=0)
                state, times = {}, []
                while len(times) < args.refresh_iters:
                    sync(bench.device)
                    t0 = time.perf_counter()
                    state.update(proj.refresh(state, grad))  # steady state: later refreshes see earlier ones
                    sync(bench.device)
                    dt = time.perf_counter() - t0
                    # the first call builds caches (DCT matrix, ...); one slower than 1 s is its own warm-up
                    if "warm" in row or dt > 1.0:
                        times.append(dt)
                    row["warm"] = True
                row.pop("warm")
                row["refresh_ms"] = median_ms(times)
            except Exception as err:
                row.pop("warm", None)
                row["note"] = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                print(f"[step_bench] projector {pname} {shape}: {row['note']}", file=sys.stderr)
            shape_rows.append(row)
        svd = next((r.get("refresh_ms") for r in shape_rows if r["projector"] == "svd"), None)
        for r in shape_rows:
            r["vs_svd"] = r["refresh_ms"] / svd if svd and r.get("refresh_ms") else None
        rows += shape_rows
    return rows


# ----------------------------------------------------------------------------- table 3: fp32 vs 8-bit states
def bits_rows(bench, args, table1):
    """Our GaLoreAdamW with fp32 vs 8-bit states, taken from table 1; on CUDA the 8-bit path is also measured with
    the backend table 1 did not use (auto picks Triton there), so both torch and Triton appear."""
    from lowrank_optim import quant

    by = {r["method"]: r for r in table1}
    rows = []
    if "galore" in by:
        rows.append(dict(by["galore"], state_bits=32, backend="-"))
    if "galore_8bit" in by:
        used = by["galore_8bit"].get("backend", resolved_backend(bench.device))
        rows.append(dict(by["galore_8bit"], state_bits=8, backend=used))
        if bench.device.type == "cuda" and "step_ms" in by["galore_8bit"]:
            other = "torch" if used == "triton" else "triton"
            previous = quant.get_backend()
            try:
                quant.set_backend(other)
                rows.append(dict(measure(bench, "galore_8bit", args), state_bits=8, backend=other))
            finally:
                quant.set_backend(previous)
        else:
            rows.append({"method": "galore_8bit", "label": LABELS["galore_8bit"], "state_bits": 8,
                         "backend": "triton", "note": "needs CUDA (on CPU Triton only runs in its interpreter)"})
    ref = next((r for r in rows if r["state_bits"] == 32 and "step_ms" in r), None)
    for r in rows:
        ok = ref is not None and "step_ms" in r
        r["step_vs_fp32"] = r["step_ms"] / ref["step_ms"] if ok else None
        r["bytes_vs_fp32"] = r["state_bytes"] / ref["state_bytes"] if ok else None
    return rows


# ----------------------------------------------------------------------------- table 4: Triton kernels (CUDA)
def peak_gbps(device_name):
    return next((gbps for key, gbps in PEAK_GBPS if key.lower() in device_name.lower()), None)


def _wall_ms(fn, reps=3):
    """Median wall time (CPU / Triton interpreter fallback for tests; CUDA uses triton.testing.do_bench)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median_ms(times)


def _cuda_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def kernel_rows(shapes, rank, device, peak, timer=None):
    """Each Triton kernel (next to its torch reference) on the low-rank state / weight tensors of each distinct
    target shape: ms, achieved GB/s (bytes the kernel must move / time) and the fraction of `peak` GB/s."""
    from lowrank_optim import quant
    from triton_kernels import adam8bit, projection, quant8

    timer = timer or (_cuda_ms if device.type == "cuda" else _wall_ms)
    rows = []

    def add(kernel, shape, nbytes, triton_fn, torch_fn, note=""):
        t_ms = timer(triton_fn)
        ref_ms = timer(torch_fn) if torch_fn else None
        gbps = nbytes / (t_ms * 1e-3) / 1e9
        rows.append({"kernel": kernel, "shape": list(shape), "bytes": nbytes, "ms": t_ms, "gbps": gbps,
                     "peak_frac": gbps / peak if peak else None, "torch_ms": ref_ms,
                     "speedup_vs_torch": ref_ms / t_ms if ref_ms else None, "note": note})

    gen = torch.Generator(device="cpu").manual_seed(0)
    distinct = sorted({tuple(s) for n, s in shapes.items() if is_target(n, s) and min(s) > rank})
    for m, n in distinct:
        side = lowrank_side((m, n))
        low_shape = (m, rank) if side == "right" else (rank, n)
        N = low_shape[0] * low_shape[1]
        nb = quant.num_blocks(N)
        x = torch.randn(low_shape, generator=gen).to(device)
        codes, absmax = quant.quantize_blockwise_torch(x, True)
        add("quantize_blockwise", low_shape, 4 * N + N + 4 * nb,
            lambda: quant8.quantize_blockwise_triton(x, True), lambda: quant.quantize_blockwise_torch(x, True))
        add("dequantize_blockwise", low_shape, N + 4 * nb + 4 * N,
            lambda: quant8.dequantize_blockwise_triton(codes, absmax, True),
            lambda: quant.dequantize_blockwise_torch(codes, absmax, True))
        g = torch.randn(low_shape, generator=gen).to(device)
        state = [t.clone() for t in (*quant.zero_state(low_shape, True, device), *quant.zero_state(low_shape, False,
                                                                                                  device))]
        # reads g + 2 code tensors + 2 absmax, writes them back + the fp32 direction
        add("adam8bit_step", low_shape, 4 * N + 2 * (2 * N + 8 * nb) + 4 * N,
            lambda: adam8bit.adam8bit_step_triton(g, *state, 0.9, 0.999, 1e-8),
            lambda: quant.adam8bit_step_torch(g, *state, 0.9, 0.999, 1e-8))
        # projection kernels with an index-based basis (DCT / columns): B is d x d, r rows gathered
        d = n if side == "right" else m
        G = torch.randn(m, n, generator=gen).to(device)
        B = torch.randn(d, d, generator=gen).to(device)
        idx = torch.randperm(d, generator=gen)[:rank].sort().values.to(device)
        low = torch.randn(low_shape, generator=gen).to(device)
        W = torch.randn(m, n, generator=gen).to(device)
        add("project_rows", (m, n), 4 * m * n + 4 * rank * d + 4 * N,
            lambda: projection.project_rows_triton(G, B, idx, side),
            lambda: projection.project_rows_torch(G, B, idx, side))
        add("project_back_apply", (m, n), 8 * m * n + 4 * N + 4 * rank * d,
            lambda: projection.project_back_apply_triton(W, low, B, idx, side, 1e-9, 0.0, 0.25),
            lambda: projection.project_back_apply_torch(W, low, B, idx, side, 1e-9, 0.0, 0.25),
            note="W updated in place (lr 1e-9)")
        P = torch.linalg.qr(torch.randn(d, rank, generator=gen)).Q.to(device)
        add("project_back_apply_dense", (m, n), 8 * m * n + 4 * N + 4 * rank * d,
            lambda: projection.project_back_apply_dense_triton(W, low, P, side, 1e-9, 0.0, 0.25),
            lambda: projection.project_back_apply_dense_torch(W, low, P, side, 1e-9, 0.0, 0.25),
            note="W updated in place (lr 1e-9)")
        rows.append(_vs_bnb(low_shape, g, state, device, timer))
    return rows


def _vs_bnb(shape, g, state, device, timer):
    """Our fused 8-bit Adam moment update (Triton) vs bitsandbytes AdamW8bit.step() on a parameter of the same
    shape and gradient. Both use 256-element blocks with dynamic maps; bnb also writes the parameter."""
    from triton_kernels import adam8bit

    row = {"kernel": "adam8bit_step vs bnb AdamW8bit", "shape": list(shape)}
    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.randn(shape, device=device))
        p.grad = g
        opt = bnb.optim.AdamW8bit([p], lr=1e-9, min_8bit_size=0)
        opt.step()  # creates the 8-bit state
        ours = timer(lambda: adam8bit.adam8bit_step_triton(g, *state, 0.9, 0.999, 1e-8))
        theirs = timer(opt.step)
        row.update(ms=ours, bnb_ms=theirs, speedup_vs_bnb=theirs / ours,
                   note="ours: moments + direction; bnb: moments + parameter update")
    except Exception as err:
        row["note"] = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return row


# ----------------------------------------------------------------------------- output
def machine_info(device):
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            (platform.processor() or platform.machine())}
    try:
        load = os.getloadavg()
        info["loadavg_1_5_15"] = [round(x, 2) for x in load]
    except OSError:
        pass
    return info


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _mib(b):
    return None if b is None else b / 2 ** 20


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
    out = [f"# Optimizer step benchmark: {s['what']}", "",
           f"- command: `{result['command']}`",
           f"- date: {result['date']}",
           f"- machine: {m['platform']}, {m['cpu_count']} CPUs (torch threads {m['torch_threads']}), "
           f"torch {m['torch']}, device {m['device']} ({m['device_name']})"
           + (f", load average {m['loadavg_1_5_15']} at start" if "loadavg_1_5_15" in m else ""),
           f"- weights: {s['n_params']:,} elements in {s['n_tensors']} tensors ({s['n_lowrank']} low-rank targets "
           f"with min side > rank {s['rank']}); {s['scope']}",
           f"- timing: median of {s['iters']} plain steps after {s['warmup']} warm-up step(s); refresh step = one "
           f"steady-state refresh step; amortised at update_proj_gap={s['update_proj_gap']}"
           + ("; step ms INCLUDES the refresh step (mean)" if s["include_refresh"] else ""), ""]
    out += ["## 1. Optimizer step time and state", "",
            _table(["optimizer", "step ms", "refresh step ms", "amortised ms", "state MiB", "step / AdamW",
                    "amortised / AdamW", "state / AdamW", "note"],
                   [[r["label"], r.get("step_ms"), r.get("refresh_step_ms"), r.get("amortised_ms"),
                     _mib(r.get("state_bytes")), r.get("step_vs_adamw"), r.get("amortised_vs_adamw"),
                     r.get("bytes_vs_adamw"), _note(r)] for r in result["step"]]),
            "", "Ratios are against torch AdamW (foreach) in this same run.", ""]
    if result["refresh"]:
        out += ["## 2. Projector refresh time", "",
                _table(["shape", "side", "count", "projector", "refresh ms", "vs svd", "note"],
                       [["x".join(map(str, r["shape"])), r["side"], r["count"], r["projector"], r.get("refresh_ms"),
                         r.get("vs_svd"), r.get("note", "")] for r in result["refresh"]]), ""]
    if result["bits"]:
        out += ["## 3. fp32 vs 8-bit states (ours, GaLoreAdamW)", "",
                _table(["state bits", "8-bit backend", "step ms", "state MiB", "step / fp32", "state / fp32",
                        "note"],
                       [[r["state_bits"], r["backend"], r.get("step_ms"), _mib(r.get("state_bytes")),
                         r.get("step_vs_fp32"), r.get("bytes_vs_fp32"), r.get("note", "")] for r in result["bits"]]),
                ""]
    out += ["## 4. Triton kernels", ""]
    if result["kernels"]:
        peak = result["setup"].get("peak_gbps")
        out += [f"Peak bandwidth used for the fraction: {peak} GB/s.", "",
                _table(["kernel", "shape", "ms", "GB/s", "of peak", "torch ms", "vs torch", "bnb ms", "vs bnb",
                        "note"],
                       [[r["kernel"], "x".join(map(str, r["shape"])), r.get("ms"), r.get("gbps"), r.get("peak_frac"),
                         r.get("torch_ms"), r.get("speedup_vs_torch"), r.get("bnb_ms"), r.get("speedup_vs_bnb"),
                         r.get("note", "")] for r in result["kernels"]]), ""]
    else:
        out += [result.get("kernels_note", "not run"), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama_60m", help="config name in benchmarks/configs or a JSON path")
    p.add_argument("--shapes", default=None, help="bench these MxN weights instead of a model, e.g. 64x32,32x64")
    p.add_argument("--layers", type=int, default=None,
                   help="bench only the first N transformer layers' weights (0 = all); default 1 on CPU, all on CUDA")
    p.add_argument("--include-embeddings", action="store_true", help="also embed_tokens, lm_head, final norm")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--update-proj-gap", type=int, default=200, help="gap the amortised time is computed at")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (the first one builds state and basis)")
    p.add_argument("--iters", type=int, default=10, help="timed plain steps")
    p.add_argument("--no-refresh-sample", dest="refresh_sample", action="store_false",
                   help="skip the timed steady-state refresh step (amortised = step)")
    p.add_argument("--include-refresh", action="store_true",
                   help="step ms = mean over the timed steps INCLUDING the refresh step")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma separated subset of {METHODS}")
    p.add_argument("--projector", default=None,
                   help="projector for OUR GaLore/Fira/Adafactor (default: their svd); references always use svd")
    p.add_argument("--projectors", default=",".join(PROJECTOR_NAMES), help="table 2's projectors ('' skips it)")
    p.add_argument("--refresh-iters", type=int, default=3, help="timed refreshes per projector and shape")
    p.add_argument("--peak-gbps", type=float, default=None, help="device peak bandwidth; default from its name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the Markdown here and a .json next to it")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown --methods {sorted(unknown)}; choose from {METHODS}")
    if BASELINE not in args.methods:  # ratios need the baseline from the same run
        args.methods.insert(0, BASELINE)
    args.projectors = [x for x in args.projectors.split(",") if x]
    if args.warmup < 1 or args.iters < 1:
        p.error("--warmup and --iters must be >= 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.shapes:
        shapes, scope, what = parse_shapes(args.shapes), "custom --shapes (all low-rank targets)", args.shapes
    else:
        layers = args.layers if args.layers is not None else (0 if device.type == "cuda" else 1)
        shapes, n, total = model_shapes(args.model, layers, args.include_embeddings)
        scope = (f"{n} of {total} transformer layers" + (" (subset: --layers)" if n < total else "")
                 + (", with embeddings + lm_head" if args.include_embeddings else ", WITHOUT embeddings / lm_head"))
        what = f"{args.model}, {scope}"
    torch.manual_seed(args.seed)
    bench = Bench(shapes, device, args.seed)
    n_low = sum(1 for n, s in shapes.items() if is_target(n, s) and min(s) > args.rank)
    setup = {"what": what, "scope": scope, "rank": args.rank, "update_proj_gap": args.update_proj_gap,
             "warmup": args.warmup, "iters": args.iters, "include_refresh": args.include_refresh,
             "n_params": sum(w.numel() for w in bench.weights.values()), "n_tensors": len(shapes),
             "n_lowrank": n_low, "projector_override": args.projector, "methods": args.methods}
    result = {"command": "python -m benchmarks.step_bench " + shlex.join(argv),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": machine_info(device), "setup": setup}

    rows = []
    for method in args.methods:
        t0 = time.perf_counter()
        rows.append(measure(bench, method, args))
        print(f"[step_bench] {method}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    result["step"] = add_ratios(rows)
    result["refresh"] = refresh_rows(bench, args) if args.projectors else []
    result["bits"] = bits_rows(bench, args, rows)
    if device.type == "cuda":
        setup["peak_gbps"] = args.peak_gbps or peak_gbps(result["machine"]["device_name"])
        result["kernels"] = kernel_rows(shapes, args.rank, device, setup["peak_gbps"])
    else:
        result["kernels"] = []
        result["kernels_note"] = "Not run: needs CUDA (device here: cpu)."

    text = to_markdown(result)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
