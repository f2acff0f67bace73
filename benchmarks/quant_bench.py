"""8-bit state on CPU: our torch path against bitsandbytes' CPU implementation, same process, same tensors.

    python -m benchmarks.quant_bench [--sizes 16777216 4194304] [--reps 7] [--output FILE.md]

Per size (a 2-D parameter of ``size / 1024`` x 1024 elements, fp32):
  * quantize / dequantize: ``lowrank_optim.quant`` (torch path) vs ``bitsandbytes.functional`` with the same map
    and block size (the same format);
  * optimizer step: ``GaLoreAdamW8bit`` on the parameter as a dense group (8-bit AdamW) vs
    ``bitsandbytes.optim.AdamW8bit``; both update the weights (bias correction, weight decay);
  * the 8-bit update alone: ``quant.adam8bit_step`` plus the decay and weight update (two in-place ops), without
    the optimizer's bookkeeping, against the same bitsandbytes step; and ``quant.adam8bit_step`` alone (moments
    and direction, no weight update).
Times are medians of ``--reps`` runs after one warm-up; ratio = ours / bitsandbytes (below 1: ours is faster).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from lowrank_optim import GaLoreAdamW8bit, quant


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_size(numel: int, reps: int):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    gen = torch.Generator().manual_seed(0)
    shape = (numel // 1024, 1024)
    x = torch.randn(shape, generator=gen)
    qmap = quant.dynamic_map(True)
    codes, absmax = quant.quantize_blockwise_torch(x, True)
    _, bnb_state = bnbF.quantize_blockwise(x, code=qmap, blocksize=quant.BLOCK)
    rows = [
        (
            "quantize",
            median_ms(lambda: quant.quantize_blockwise_torch(x, True), reps),
            median_ms(lambda: bnbF.quantize_blockwise(x, code=qmap, blocksize=quant.BLOCK), reps),
        ),
        (
            "dequantize",
            median_ms(lambda: quant.dequantize_blockwise_torch(codes, absmax, True), reps),
            median_ms(lambda: bnbF.dequantize_blockwise(codes, bnb_state), reps),
        ),
    ]
    ours_p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
    bnb_p = torch.nn.Parameter(ours_p.detach().clone())
    ours_p.grad = torch.randn(shape, generator=gen)
    bnb_p.grad = ours_p.grad.clone()
    ours = GaLoreAdamW8bit([ours_p], lr=1e-3)
    theirs = bnb.optim.AdamW8bit([bnb_p], lr=1e-3)
    bnb_ms = median_ms(theirs.step, reps)
    rows.append(("AdamW 8-bit optimizer step", median_ms(ours.step, reps), bnb_ms))
    state = [*quant.zero_state(shape, True), *quant.zero_state(shape, False)]
    weight = ours_p.detach()

    def update_only():  # the 8-bit part alone: moments, direction, decoupled decay, weight update
        direction = quant.adam8bit_step(ours_p.grad, *state, 0.9, 0.999, 1e-8)
        weight.mul_(1 - 1e-3 * 1e-2)
        weight.add_(direction, alpha=-1e-3)

    rows.append(("8-bit Adam update alone (ours) vs bnb step", median_ms(update_only, reps), bnb_ms))
    moments_ms = median_ms(lambda: quant.adam8bit_step(ours_p.grad, *state, 0.9, 0.999, 1e-8), reps)
    rows.append(("moments + direction only (quant.adam8bit_step) vs bnb step", moments_ms, bnb_ms))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16 * 2**20, 4 * 2**20])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--output", default=None, help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); medians of "
        f"{args.reps} reps; load average at start {os.getloadavg()[0]:.1f} (other processes share the CPU)",
        "",
        "| elements | operation | ours (ms) | bitsandbytes (ms) | ours / bnb |",
        "|---|---|---|---|---|",
    ]
    for numel in args.sizes:
        for op, ours_ms, bnb_ms in bench_size(numel, args.reps):
            lines.append(f"| {numel:,} | {op} | {ours_ms:.1f} | {bnb_ms:.1f} | {ours_ms / bnb_ms:.2f}x |")
            print(lines[-1], flush=True)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
