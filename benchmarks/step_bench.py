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

Whole-model mode (benchmarks/stepbench/whole_model.py): every parameter of a model, all optimizers interleaved in
the same rounds, ours against the same-run peer and against an estimated floor:

    python -m benchmarks.step_bench --whole-model --model llama_60m --output benchmarks/results/whole_llama60m.md
    python -m benchmarks.step_bench --whole-model --model llama_1b --layers 1

The parts live in benchmarks/stepbench/: shapes, timing, optimizers (build + one optimizer's step measurement),
refresh (table 2), kernels (tables 3 and 4), whole_model, report (Markdown).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time

import torch

from .cli import Parser, UsageError, check_number, check_writable_dir, entry_point, publish
from .stepbench.kernels import bits_rows, kernel_rows, peak_gbps
from .stepbench.optimizers import BASELINE, METHODS, add_ratios, measure
from .stepbench.refresh import PROJECTOR_NAMES, refresh_rows
from .stepbench.report import to_markdown
from .stepbench.shapes import is_target, model_shapes, parse_shapes
from .stepbench.timing import Bench, machine_info
from .stepbench.whole_model import METHODS as WHOLE_METHODS
from .stepbench.whole_model import whole_model_markdown, whole_model_rows


# ----------------------------------------------------------------------------- CLI
def parse_args(argv):
    p = Parser(
        prog="python -m benchmarks.step_bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="llama_60m", help="config name in benchmarks/configs or a JSON path")
    p.add_argument("--shapes", default=None, help="bench these MxN weights instead of a model, e.g. 64x32,32x64")
    p.add_argument(
        "--whole-model",
        action="store_true",
        help="every parameter of --model (embeddings, all layers, head; or --layers N of them), all "
        "optimizers interleaved in the same rounds, ratios to the same-run peer and to a floor",
    )
    p.add_argument("--rounds", type=int, default=20, help="--whole-model: timed interleaved rounds")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="bench only the first N transformer layers' weights (0 = all); default 1 on CPU, all on "
        "CUDA and with --whole-model",
    )
    p.add_argument(
        "--include-embeddings",
        action="store_true",
        help="also embed_tokens, lm_head, final norm (implied by --whole-model without --layers)",
    )
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--update-proj-gap", type=int, default=200, help="gap the amortised time is computed at")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (the first one builds state and basis)")
    p.add_argument("--iters", type=int, default=10, help="timed plain steps")
    p.add_argument(
        "--no-refresh-sample",
        dest="refresh_sample",
        action="store_false",
        help="skip the timed steady-state refresh step (amortised = step)",
    )
    p.add_argument(
        "--include-refresh", action="store_true", help="step ms = mean over the timed steps INCLUDING the refresh step"
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma separated subset of {METHODS} (default all; --whole-model: {WHOLE_METHODS})",
    )
    p.add_argument(
        "--projector",
        default=None,
        help="projector for OUR GaLore/Fira/Adafactor (default: their svd); references always use svd",
    )
    p.add_argument("--projectors", default=",".join(PROJECTOR_NAMES), help="table 2's projectors ('' skips it)")
    p.add_argument("--refresh-iters", type=int, default=3, help="timed refreshes per projector and shape")
    p.add_argument("--peak-gbps", type=float, default=None, help="device peak bandwidth; default from its name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the Markdown here and a .json next to it")
    args = p.parse_args(argv)
    valid = WHOLE_METHODS if args.whole_model else METHODS
    args.methods = [m for m in (args.methods or ",".join(valid)).split(",") if m]
    unknown = set(args.methods) - set(valid)
    if unknown:
        raise UsageError(f"unknown --methods {sorted(unknown)}; choose from {valid}")
    if not args.whole_model and BASELINE not in args.methods:  # ratios need the baseline from the same run
        args.methods.insert(0, BASELINE)
    args.projectors = [x for x in args.projectors.split(",") if x]
    for flag, value in (
        ("--warmup", args.warmup),
        ("--iters", args.iters),
        ("--rounds", args.rounds),
        ("--rank", args.rank),
        ("--update-proj-gap", args.update_proj_gap),
        ("--refresh-iters", args.refresh_iters),
    ):
        check_number(flag, value, low=1)
    check_number("--lr", args.lr, low=0, low_open=True)
    if args.layers is not None:
        check_number("--layers", args.layers, low=0)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    if args.shapes and args.whole_model:
        raise UsageError("--whole-model benches a model config's parameters; it does not take --shapes")
    return args


def select_weights(args, device):
    """(name -> shape, scope sentence, title) of the weights to bench."""
    if args.shapes:
        try:
            return parse_shapes(args.shapes), "custom --shapes (all low-rank targets)", args.shapes
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.whole_model:
        layers, embeddings = (0, True) if args.layers is None else (args.layers, args.include_embeddings)
    else:
        layers = args.layers if args.layers is not None else (0 if device.type == "cuda" else 1)
        embeddings = args.include_embeddings
    try:
        shapes, n, total = model_shapes(args.model, layers, embeddings)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    scope = (
        f"{n} of {total} transformer layers"
        + (" (subset: --layers)" if n < total else "")
        + (", with embeddings + lm_head" if embeddings else ", WITHOUT embeddings / lm_head")
    )
    return shapes, scope, f"{args.model}, {scope}"


@entry_point("python -m benchmarks.step_bench")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    shapes, scope, what = select_weights(args, device)
    if args.output:
        check_writable_dir("--output", os.path.dirname(os.path.abspath(args.output)))
    torch.manual_seed(args.seed)
    bench = Bench(shapes, device, args.seed)
    n_low = sum(1 for n, s in shapes.items() if is_target(n, s) and min(s) > args.rank)
    setup = {
        "what": what,
        "scope": scope,
        "rank": args.rank,
        "update_proj_gap": args.update_proj_gap,
        "warmup": args.warmup,
        "iters": args.iters,
        "include_refresh": args.include_refresh,
        "n_params": sum(w.numel() for w in bench.weights.values()),
        "n_tensors": len(shapes),
        "n_lowrank": n_low,
        "projector_override": args.projector,
        "methods": args.methods,
    }
    result = {
        "command": "python -m benchmarks.step_bench " + shlex.join(argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "setup": setup,
    }

    if args.whole_model:
        setup["rounds"] = args.rounds
        result["rows"], result["pairs"], result["floor"] = whole_model_rows(bench, args)
        text = whole_model_markdown(result)
    else:
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

    publish(text, args.output)
    if args.output:
        with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
