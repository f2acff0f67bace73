"""One-command GPU report: kernel correctness, kernel bandwidth, optimizer step times, LLaMA-7B layer-wise memory.

    python -m benchmarks.gpu_report [--output-dir benchmarks/results/gpu] [--budget-s 360]
    python -m benchmarks.gpu_report --dry-run --output-dir /tmp/report   # CPU, tiny shapes, Triton interpreter

Sections (Markdown ``report.md`` + ``report.json`` in the output directory):
  1. every Triton kernel against its torch reference (``lowrank_optim.kernels.selfcheck``), max error;
  2. each kernel's time and GB/s against the device's peak bandwidth (from the device properties, and a measured
     device-to-device copy), with bitsandbytes' blockwise quantize / dequantize / AdamW8bit step on the same sizes;
  3. the step time of every optimizer on LLaMA-60M / 350M / 1B parameter shapes (read from benchmarks/configs;
     attention and MLP weights low-rank, the rest dense), plus torch's fused AdamW;
  4. the peak memory of a layer-wise 8-bit GaLore step on LLaMA-7B shapes: bf16 weights, GaLoreAdamW8bit wrapped
     in LayerwiseOptimizer, gradients produced one parameter at a time through autograd; measured with 1 and 2
     decoder layers and extrapolated to all layers by the per-layer difference (SVD refreshes of 224 7B matrices
     would not fit the time budget).
Without CUDA (or with ``--dry-run``) the same code runs on CPU with tiny shapes, kernels through TRITON_INTERPRET=1.
Sections 3-4 start no new case once ``--budget-s`` seconds have passed (a case already started finishes; the cases
left out are listed): with the default 360 s the whole run stays within about 8 minutes on an H100.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
RANKS = {"llama_60m": 128, "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024, "llama_micro": 8}


# ----------------------------------------------------------------------------- setup
class Run:
    """Device, sizes and timer of one report."""

    def __init__(self, dry: bool, budget_s: float):
        self.dry = dry
        self.max_vocab = 128 if dry else None
        self.device = torch.device("cpu" if dry else "cuda")
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.skipped: List[str] = []

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.start > self.budget_s:
            self.skipped.append(what)
            return True
        return False

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable, reps: Optional[int] = None, warm: bool = False) -> float:
        """Median milliseconds of ``fn`` (CUDA: triton's do_bench; CPU: wall clock, after one warm-up call unless
        ``warm``)."""
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
        if not warm:
            fn()
        times = []
        for _ in range(reps or (1 if self.dry else 3)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3


def load_shapes(name: str, max_vocab: Optional[int] = None) -> Dict[str, tuple]:
    """Parameter name -> shape of a LLaMA config in benchmarks/configs (the HF LlamaForCausalLM layout); the dry
    run caps the vocabulary (the interpreter runs kernels at about 1 ms per program)."""
    with open(os.path.join(CONFIG_DIR, f"{name}.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], min(cfg["vocab_size"], max_vocab or 1 << 30)
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * (h // cfg["num_attention_heads"])
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes.update(
            {
                pre + "self_attn.q_proj.weight": (h, h),
                pre + "self_attn.k_proj.weight": (kv, h),
                pre + "self_attn.v_proj.weight": (kv, h),
                pre + "self_attn.o_proj.weight": (h, h),
                pre + "mlp.gate_proj.weight": (inter, h),
                pre + "mlp.up_proj.weight": (inter, h),
                pre + "mlp.down_proj.weight": (h, inter),
                pre + "input_layernorm.weight": (h,),
                pre + "post_attention_layernorm.weight": (h,),
            }
        )
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    return shapes


def is_lowrank(name: str, shape) -> bool:
    return len(shape) == 2 and (".self_attn." in name or ".mlp." in name)


# ----------------------------------------------------------------------------- 1. kernel checks
def kernel_checks(run: Run) -> List[dict]:
    from lowrank_optim.kernels import selfcheck

    cases = list(selfcheck.DEFAULT_CASES)
    if not run.dry:  # 16-bit inputs too (the interpreter mishandles bf16)
        for dt in (torch.float16, torch.bfloat16):
            cases += [
                ("quantize_blockwise", (dt,), True),
                ("adam8bit_step", (dt,), "none"),
                ("project_rows", (dt, dt), "right"),
                ("project_back_apply_dense", (dt, torch.float32, dt, None), "left"),
            ]
    rows = []
    for name, dtypes, variant in cases:
        row = {"kernel": name, "dtypes": [str(d).replace("torch.", "") for d in dtypes], "variant": str(variant)}
        try:
            row.update(ok=True, max_error=selfcheck.run(name, run.device, dtypes, variant))
        except Exception as e:  # a failing kernel is a result, not a crash of the report
            row.update(ok=False, max_error=None, error=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 2. bandwidth
def peak_bandwidth(run: Run) -> dict:
    out = {"spec_gb_s": None, "copy_gb_s": None}
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
        if clock_khz and bus_bits:  # double data rate
            out["spec_gb_s"] = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    n = (1 << 28) if not run.dry else (1 << 16)
    src = torch.empty(n, dtype=torch.uint8, device=run.device)
    dst = torch.empty_like(src)
    ms = run.time_ms(lambda: dst.copy_(src))
    out["copy_gb_s"] = 2 * n / ms / 1e6
    return out


def bandwidth(run: Run, peak: dict) -> List[dict]:
    from lowrank_optim import quant
    from lowrank_optim.kernels import adam8bit, projection, quant8

    dev = run.device
    n = (1 << 26) if not run.dry else (1 << 12)
    m, k, r = (4096, 4096, 512) if not run.dry else (32, 48, 16)
    nb = quant.num_blocks(n)
    x = torch.randn(n, device=dev)
    codes, absmax = quant.quantize_blockwise_torch(x, True)
    state = [t.to(dev) for t in (*quant.zero_state((n,), True), *quant.zero_state((n,), False))]
    B = torch.linalg.qr(torch.randn(k, k, device=dev))[0]
    idx = torch.randperm(k)[:r].to(dev)
    P = torch.linalg.qr(torch.randn(k, r, device=dev))[0]
    G, W = torch.randn(m, k, device=dev), torch.randn(m, k, device=dev)
    low = torch.randn(m, r, device=dev)
    mat_bytes = 4 * (m * k + k * r + m * r)
    cases = [
        (
            "quantize_blockwise",
            f"{n:,}",
            5 * n + 4 * nb,
            lambda: quant8.quantize_blockwise_triton(x, True),
            lambda: quant.quantize_blockwise_torch(x, True),
        ),
        (
            "dequantize_blockwise",
            f"{n:,}",
            5 * n + 4 * nb,
            lambda: quant8.dequantize_blockwise_triton(codes, absmax, True),
            lambda: quant.dequantize_blockwise_torch(codes, absmax, True),
        ),
        (
            "adam8bit_step",
            f"{n:,}",
            12 * n + 16 * nb,
            lambda: adam8bit.adam8bit_step_triton(x, *state, 0.9, 0.999, 1e-8),
            lambda: quant.adam8bit_step_torch(x, *state, 0.9, 0.999, 1e-8),
        ),
        (
            "project_rows",
            f"{m}x{k} r={r}",
            mat_bytes,
            lambda: projection.project_rows_triton(G, B, idx, "right"),
            lambda: projection.project_rows_torch(G, B, idx, "right"),
        ),
        (
            "project_back_rows",
            f"{m}x{k} r={r}",
            mat_bytes,
            lambda: projection.project_back_rows_triton(low, B, idx, "right"),
            lambda: projection.project_back_rows_torch(low, B, idx, "right"),
        ),
        (
            "project_back_apply",
            f"{m}x{k} r={r}",
            mat_bytes + 4 * m * k,
            lambda: projection.project_back_apply_triton(W, low, B, idx, "right", 1e-9, 0.0, 0.25),
            lambda: projection.project_back_apply_torch(W, low, B, idx, "right", 1e-9, 0.0, 0.25),
        ),
        (
            "project_back_apply_dense",
            f"{m}x{k} r={r}",
            mat_bytes + 4 * m * k,
            lambda: projection.project_back_apply_dense_triton(W, low, P, "right", 1e-9, 0.0, 0.25),
            lambda: projection.project_back_apply_dense_torch(W, low, P, "right", 1e-9, 0.0, 0.25),
        ),
    ]
    ref_gb_s = peak["spec_gb_s"] or peak["copy_gb_s"]
    rows = []
    for name, size, nbytes, kernel, torch_ref in cases:
        row = {"kernel": name, "size": size, "bytes": nbytes}
        try:
            ms = run.time_ms(kernel)
            row.update(ms=ms, gb_s=nbytes / ms / 1e6, torch_ms=run.time_ms(torch_ref))
            row["pct_peak"] = 100 * row["gb_s"] / ref_gb_s
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    rows += bnb_rows(run, x, n, nb, codes, absmax)
    return rows


def bnb_rows(run: Run, x, n, nb, codes, absmax) -> List[dict]:
    """bitsandbytes on the same sizes: blockwise quantize / dequantize with our map, and one AdamW8bit step on an
    n-element fp32 parameter (which also reads and writes the parameter: 16 bytes per element)."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except Exception as e:  # optional dependency
        return [{"kernel": "bitsandbytes", "error": f"not importable: {e}"[:200]}]
    from lowrank_optim import quant

    qmap = quant.dynamic_map(True, x.device)
    rows = []
    _, qstate = bnbF.quantize_blockwise(x, code=qmap, blocksize=quant.BLOCK)
    p = torch.nn.Parameter(torch.randn(n, device=x.device))
    p.grad = torch.randn_like(p)
    opt = bnb.optim.AdamW8bit([p], lr=1e-3, min_8bit_size=1)
    cases = [
        ("bnb quantize_blockwise", 5 * n + 4 * nb, lambda: bnbF.quantize_blockwise(x, code=qmap, blocksize=256)),
        ("bnb dequantize_blockwise", 5 * n + 4 * nb, lambda: bnbF.dequantize_blockwise(codes, qstate)),
        ("bnb AdamW8bit step", 16 * n + 16 * nb, opt.step),
    ]
    for name, nbytes, fn in cases:
        row = {"kernel": name, "size": f"{n:,}", "bytes": nbytes}
        try:
            ms = run.time_ms(fn)
            row.update(ms=ms, gb_s=nbytes / ms / 1e6)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 3. optimizer steps
def make_optimizer(name: str, lowrank, dense, rank: int, device):
    import lowrank_optim as lo

    gap = 10_000  # no refresh while timing: the first step computes the subspace
    groups = [{"params": lowrank, "rank": rank, "update_proj_gap": gap}, {"params": dense}]
    if name == "torch AdamW (fused)":
        return torch.optim.AdamW(lowrank + dense, lr=1e-3, fused=device.type == "cuda")
    if name == "FrugalAdamW":
        return lo.FrugalAdamW([{"params": lowrank, "density": 0.25}, {"params": dense}], lr=1e-3, update_proj_gap=gap)
    if name == "DCTAdamW":
        return lo.DCTAdamW(groups, lr=1e-3)
    if name == "SSTAdamW":
        return lo.SSTAdamW([{"params": lowrank, "rank": rank}, {"params": dense}], lr=1e-3)
    if name == "GaLoreAdafactor":
        return lo.GaLoreAdafactor(groups, lr=1e-3)
    return getattr(lo, name)(groups, lr=1e-3)


OPTIMIZERS = (
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "FiraAdamW",
    "FrugalAdamW",
    "DCTAdamW",
    "SSTAdamW",
    "GaLoreAdafactor",
    "torch AdamW (fused)",
)


def optimizer_steps(run: Run, models) -> List[dict]:
    rows = []
    for model in models:
        shapes = load_shapes(model, run.max_vocab)
        gen = torch.Generator(device=run.device).manual_seed(0)  # drawn on the device: 1B shapes are large
        params = {}
        for n, shape in shapes.items():
            params[n] = torch.nn.Parameter(torch.randn(shape, generator=gen, device=run.device) * 0.02)
            params[n].grad = torch.randn(shape, generator=gen, device=run.device) * 1e-3
        lowrank = [p for n, p in params.items() if is_lowrank(n, p.shape)]
        dense = [p for n, p in params.items() if not is_lowrank(n, p.shape)]
        for name in OPTIMIZERS:
            if run.over_budget(f"step time {name} on {model}"):
                continue
            row = {"model": model, "optimizer": name, "params": sum(p.numel() for p in params.values())}
            try:
                opt = make_optimizer(name, lowrank, dense, RANKS[model], run.device)
                run.sync()
                start = time.perf_counter()
                opt.step()  # includes the first subspace computation
                run.sync()
                row["first_step_ms"] = (time.perf_counter() - start) * 1e3
                if run.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(run.device)
                row["step_ms"] = run.time_ms(opt.step, warm=True)  # the first step warmed up
                if run.device.type == "cuda":
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
                del opt
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
        del params, lowrank, dense
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- 4. layer-wise 7B memory
def layerwise_slice(run: Run, model: str, layers: int) -> dict:
    """Peak / resident memory of two layer-wise GaLoreAdamW8bit steps on the embedding, ``layers`` decoder
    layers and the head of ``model`` (bf16 weights; gradients made one parameter at a time through autograd)."""
    from lowrank_optim import GaLoreAdamW8bit, LayerwiseOptimizer

    shapes = {
        n: s
        for n, s in load_shapes(model, run.max_vocab).items()
        if ".layers." not in n or int(n.split(".layers.")[1].split(".")[0]) < layers
    }
    dev = run.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    params = {
        n: torch.nn.Parameter(torch.empty(s, dtype=torch.bfloat16, device=dev).normal_(0, 0.02))
        for n, s in shapes.items()
    }
    lowrank = [p for n, p in params.items() if is_lowrank(n, p.shape)]
    dense = [p for n, p in params.items() if not is_lowrank(n, p.shape)]
    opt = GaLoreAdamW8bit(
        [{"params": lowrank, "rank": RANKS[model], "update_proj_gap": 200, "scale": 0.25}, {"params": dense}], lr=1e-3
    )
    lw = LayerwiseOptimizer(opt)
    start = time.perf_counter()
    for _ in range(2):  # the first step computes the subspaces; the second is a plain step
        for p in reversed(list(params.values())):
            torch.autograd.backward(p, grad_tensors=torch.randn_like(p) * 1e-3)  # the hook updates p, frees grad
    run.sync()
    state_bytes = sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
    )
    out = {
        "layers": layers,
        "seconds": time.perf_counter() - start,
        "state_bytes": state_bytes,
        "weight_bytes": sum(p.numel() * p.element_size() for p in params.values()),
        "grads_left": sum(p.grad is not None for p in params.values()),
    }
    if dev.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base
        out["resident_bytes"] = torch.cuda.memory_allocated(dev) - base
    del lw, opt, params, lowrank, dense
    return out


def layerwise_7b(run: Run, model: str) -> dict:
    with open(os.path.join(CONFIG_DIR, f"{model}.json"), encoding="utf-8") as f:
        total_layers = json.load(f)["num_hidden_layers"]
    one = layerwise_slice(run, model, 1)
    two = layerwise_slice(run, model, 2)
    out = {"model": model, "layers_total": total_layers, "slices": [one, two]}
    if "peak_bytes" in two:
        per_layer = two["resident_bytes"] - one["resident_bytes"]
        out["per_layer_resident_bytes"] = per_layer
        out["estimated_peak_gib"] = (two["peak_bytes"] + (total_layers - 2) * per_layer) / 2**30
    return out


# ----------------------------------------------------------------------------- output
def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# GPU report",
        "",
        f"{meta['date']}; device: {meta['device']}; torch {meta['torch']}, "
        f"triton {meta['triton']}; dry run: {meta['dry_run']}; wall time {meta['seconds']:.0f} s",
        "",
    ]
    lines += [
        "## 1. Kernels against their torch references",
        "",
        "| kernel | dtypes | variant | ok | max error |",
        "|---|---|---|---|---|",
    ]
    for r in report["kernel_checks"]:
        err = _fmt(r["max_error"]) if r["ok"] else r["error"].replace("|", "/")
        lines.append(f"| {r['kernel']} | {', '.join(map(str, r['dtypes']))} | {r['variant']} | {r['ok']} | {err} |")
    peak = report["peak_bandwidth"]
    lines += [
        "",
        "## 2. Kernel bandwidth",
        "",
        f"peak: {_fmt(peak['spec_gb_s'], '.0f')} GB/s from the device "
        f"properties, {_fmt(peak['copy_gb_s'], '.0f')} GB/s measured copy",
        "",
        "| kernel | size | ms | GB/s | % of peak | torch path ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["bandwidth"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r.get('size', '-')} | error: {r['error'].replace('|', '/')} | | | |")
            continue
        lines.append(
            f"| {r['kernel']} | {r['size']} | {_fmt(r['ms'])} | {_fmt(r['gb_s'], '.1f')} | "
            f"{_fmt(r.get('pct_peak'), '.0f')} | {_fmt(r.get('torch_ms'))} |"
        )
    lines += [
        "",
        "## 3. Optimizer step times",
        "",
        "| model | optimizer | step ms | first step ms | peak GiB |",
        "|---|---|---|---|---|",
    ]
    for r in report["optimizer_steps"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['optimizer']} | error: {r['error'].replace('|', '/')} | | |")
        else:
            lines.append(
                f"| {r['model']} | {r['optimizer']} | {_fmt(r['step_ms'])} | {_fmt(r['first_step_ms'])} | "
                f"{_fmt(r.get('peak_mem_gib'))} |"
            )
    lw = report.get("layerwise")
    lines += ["", "## 4. Layer-wise 8-bit GaLore step memory", ""]
    if lw and "error" not in lw:
        lines += [
            f"model {lw['model']} ({lw['layers_total']} layers), bf16 weights, GaLoreAdamW8bit in LayerwiseOptimizer:",
            "",
            "| decoder layers | peak GiB | resident GiB | state MiB | seconds |",
            "|---|---|---|---|---|",
        ]
        for s in lw["slices"]:
            peak_gib = s["peak_bytes"] / 2**30 if "peak_bytes" in s else None
            res_gib = s["resident_bytes"] / 2**30 if "resident_bytes" in s else None
            lines.append(
                f"| {s['layers']} | {_fmt(peak_gib)} | {_fmt(res_gib)} | {s['state_bytes'] / 2**20:.1f} | "
                f"{s['seconds']:.1f} |"
            )
        lines += ["", f"estimated peak with all {lw['layers_total']} layers: {_fmt(lw.get('estimated_peak_gib'))} GiB"]
    else:
        lines.append(f"not run: {lw.get('error') if lw else 'over budget'}")
    if report["skipped"]:
        lines += ["", "Left out (time budget): " + "; ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter (default without CUDA)"
    )
    parser.add_argument(
        "--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu")
    )
    parser.add_argument("--budget-s", type=float, default=360.0, help="no new step/memory case after this")
    args = parser.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    if dry:  # before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from lowrank_optim import quant
    from lowrank_optim.kernels import interpreter_enabled, triton_available

    if not triton_available() or (dry and not interpreter_enabled()):
        raise SystemExit("the report needs triton (and TRITON_INTERPRET=1 set before triton is imported for --dry-run)")
    run = Run(dry, args.budget_s)
    previous, threads = quant.get_backend(), torch.get_num_threads()
    # the optimizer steps use the kernels: self-checked with torch fallback on CUDA, forced through the interpreter
    quant.set_backend("triton" if dry else "auto")
    if dry:  # tiny ops: one thread avoids OpenMP stalls on a shared CPU (dry-run times are not measurements)
        torch.set_num_threads(1)
    try:
        checks = kernel_checks(run)
        peak = peak_bandwidth(run)
        report = {"kernel_checks": checks, "peak_bandwidth": peak, "bandwidth": bandwidth(run, peak)}
        small = ["llama_micro"] if dry else ["llama_60m", "llama_350m"]
        report["optimizer_steps"] = optimizer_steps(run, small)
        big = "llama_micro" if dry else "llama_7b"
        try:
            report["layerwise"] = None if run.over_budget("layer-wise 7B memory") else layerwise_7b(run, big)
        except Exception as e:
            report["layerwise"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        if not dry:
            report["optimizer_steps"] += optimizer_steps(run, ["llama_1b"])
    finally:
        quant.set_backend(previous)
        torch.set_num_threads(threads)
    import triton

    report["skipped"] = run.skipped
    report["meta"] = {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "device": torch.cuda.get_device_name(run.device) if not dry else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dry_run": dry,
        "seconds": time.perf_counter() - run.start,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
