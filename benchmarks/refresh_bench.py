"""Projector refresh benchmark: time per refresh, power-iteration quality, and quantized-basis accuracy.

    python -m benchmarks.refresh_bench --output benchmarks/results/refresh_bench_cpu.md

Parts (``--parts``, comma-separated, default all):

* ``time``: median wall time of one ``refresh`` of svd / rsvd / power / dct on LLaMA-1B weight shapes (``--shapes``,
  ``--ranks``), projected on the side GaLore's "std" rule picks, with ratios to svd measured in the same run. The
  svd projector takes the full SVD whatever the rank (then truncates), so it is timed once per shape and its
  median serves both ranks. power is timed on its steady-state (warm) refresh: the state holds the basis of a
  previous gradient (G plus 10% noise); its first refresh is a randomized SVD (rsvd's cost).
* ``power``: how much of the top-r gradient energy each projector captures on a real gradient sequence: a LLaMA
  (``--power-model``) trained with AdamW on a synthetic token stream, every attention/MLP gradient taken every
  ``--power-gap`` steps. Each projector refreshes on that sequence (warm starts from its previous basis); score
  = ||P^T G||_F^2 / ||U_r^T G||_F^2 (1 = as good as the exact SVD), over every refresh but the first.
* ``bits``: the relative error of P P^T G with 8- and 4-bit bases against the fp32 basis on low-rank-plus-noise
  matrices, and the drift of 100 GaLore steps (projector-level loop: Adam on P^T G, moments kept across
  refreshes, gap 20) on a least-squares problem, against the same run with fp32 bases.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Dict, List

import torch

from lowrank_optim.projectors import make_projector

LLAMA_1B_SHAPES = "2048x2048,2048x5461,5461x2048"
TIMED = ("svd", "rsvd", "power", "power x2", "dct")  # "power x2": power_iters=2 beside the default


def parse_shapes(text: str):
    return [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s]


def std_side(shape) -> str:
    return "right" if shape[0] >= shape[1] else "left"


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def machine_info() -> Dict:
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
    }
    try:
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


# --- part 1: refresh time -----------------------------------------------------------------------------------------
def time_refreshes(shapes, ranks, repeats: int, power_iters: int) -> List[Dict]:
    variants = {
        "rsvd": ("rsvd", {}),
        "power": ("power", {"power_iters": power_iters}),
        "power x2": ("power", {"power_iters": 2}),
        "dct": ("dct", {}),
    }
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        grad = torch.randn(*shape, generator=gen)
        previous = grad + 0.1 * grad.norm() / grad.numel() ** 0.5 * torch.randn(*shape, generator=gen)
        side = std_side(shape)
        svd = make_projector("svd", min(ranks), side, shape)
        svd_ms = median_ms(lambda: svd.refresh({"proj_refreshes": 0}, grad), repeats)
        for rank in ranks:
            for name in TIMED:
                if name == "svd":
                    ms = svd_ms
                else:
                    proj_name, opts = variants[name]
                    proj = make_projector(proj_name, rank, side, shape, **opts)
                    state = {"proj_refreshes": 0}
                    if proj_name == "power":  # time the warm path: a previous basis is in the state
                        state.update(proj.refresh(state, previous))
                    proj.refresh(state, grad)  # warm-up (not timed; svd's own first call is part of its median)
                    ms = median_ms(lambda: proj.refresh(state, grad), repeats)
                rows.append(
                    {
                        "shape": list(shape),
                        "rank": rank,
                        "side": side,
                        "projector": name,
                        "ms": ms,
                        "vs_svd": ms / svd_ms,
                    }
                )
                print(f"time {shape} r={rank} {name}: {ms:.0f} ms ({ms / svd_ms:.3f} x svd)", flush=True)
    return rows


# --- part 2: power-iteration quality on a real gradient sequence --------------------------------------------------
def gradient_sequence(model_name: str, refreshes: int, gap: int, seed: int = 0):
    """{weight name: [G at steps 0, gap, 2 gap, ...]} from AdamW training of a LLaMA on a learnable token stream
    (a fixed random bigram table: the next token is one of 4 successors of the current one)."""
    from benchmarks.model import build_model, linear_weight_names, load_config

    config = load_config(model_name)
    model = build_model(config, seed)
    names = linear_weight_names(model)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, config.vocab_size, (config.vocab_size, 4), generator=gen)
    seqs = {name: [] for name in names}
    for step in range(refreshes * gap):
        tok = torch.randint(0, config.vocab_size, (8, 1), generator=gen)
        cols = [tok]
        for _ in range(63):
            pick = torch.randint(0, 4, (8, 1), generator=gen)
            cols.append(successors[cols[-1].squeeze(1)].gather(1, pick))
        batch = torch.cat(cols, dim=1)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        if step % gap == 0:
            for name in names:
                seqs[name].append(params[name].grad.detach().clone())
        opt.step()
    return seqs, loss.item()


def captured_energy(grad, basis, which, top):
    low = basis.t() @ grad if which == "left" else grad @ basis
    return float(low.square().sum()) / top


def power_quality(model_name: str, ranks, refreshes: int, gap: int) -> Dict:
    seqs, final_loss = gradient_sequence(model_name, refreshes, gap)
    variants = [
        ("stale (no update)", "power", None),
        ("power, 1 iter", "power", 1),
        ("power, 2 iters", "power", 2),
        ("power, 3 iters", "power", 3),
        ("rsvd (defaults)", "rsvd", None),
    ]
    rows = []
    for rank in ranks:
        scores = {label: [] for label, _, _ in variants}
        times = {label: [] for label, _, _ in variants}
        for grads in seqs.values():
            shape = tuple(grads[0].shape)
            if min(shape) <= rank:
                continue
            side = std_side(shape)
            tops = []
            for g in grads:
                s = torch.linalg.svdvals(g)
                tops.append(float(s[:rank].square().sum()))
            for label, proj_name, iters in variants:
                opts = {"power_iters": iters} if iters else {}
                proj = make_projector(proj_name, rank, side, shape, **opts)
                state = {"proj_refreshes": 0}
                for k, g in enumerate(grads):
                    if k == 0 or iters is not None or proj_name != "power":
                        start = time.perf_counter()
                        state = {**state, **proj.refresh(state, g)}
                        if k:
                            times[label].append(time.perf_counter() - start)
                    if k:  # the first refresh is a randomized SVD for every power variant
                        scores[label].append(captured_energy(g, proj.basis(state, side), side, tops[k]))
        for label, _, _ in variants:
            vals = scores[label]
            rows.append(
                {
                    "rank": rank,
                    "variant": label,
                    "mean": statistics.mean(vals),
                    "min": min(vals),
                    "n": len(vals),
                    "ms": 1e3 * statistics.median(times[label]) if times[label] else None,
                }
            )
            print(f"power r={rank} {label}: mean {rows[-1]['mean']:.4f} min {rows[-1]['min']:.4f}", flush=True)
    shapes = sorted({tuple(g[0].shape) for g in seqs.values()})
    return {
        "rows": rows,
        "model": model_name,
        "weights": len(seqs),
        "shapes": shapes,
        "final_loss": final_loss,
        "refreshes": refreshes,
        "gap": gap,
    }


# --- part 3: quantized bases ----------------------------------------------------------------------------------------
def low_rank_plus_noise(m, n, r, gen, noise=0.05):
    u = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    return (u * torch.linspace(10, 1, r)) @ v.t() + noise * torch.randn(m, n, generator=gen)


def reconstruction_errors(cases) -> List[Dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for m, n, r in cases:
        grad = low_rank_plus_noise(m, n, r, gen)
        for side in ("left", "right"):
            ref = make_projector("svd", r, side, (m, n))
            s_ref = {"proj_refreshes": 0, **ref.refresh({"proj_refreshes": 0}, grad)}
            exact = ref.project_back(s_ref, ref.project(s_ref, grad))
            for bits in (8, 4):
                proj = make_projector("svd", r, side, (m, n), basis_bits=bits)
                state = {"proj_refreshes": 0, **proj.refresh({"proj_refreshes": 0}, grad)}
                approx = proj.project_back(state, proj.project(state, grad))
                basis = proj.basis(state, side)
                rows.append(
                    {
                        "shape": [m, n],
                        "rank": r,
                        "side": side,
                        "bits": bits,
                        "rel_err": float((approx - exact).norm() / exact.norm()),
                        "orth_err": float((basis.t() @ basis - torch.eye(r)).abs().max()),
                        "bytes_vs_fp32": proj.expected_state_bytes() / ref.expected_state_bytes(),
                    }
                )
    return rows


def galore_least_squares(
    projector: str,
    bits: int,
    steps=100,
    gap=20,
    shape=(128, 96),
    rank=16,
    seed=0,
    lr=1e-2,
    scale=0.25,
    betas=(0.9, 0.999),
    eps=1e-8,
):
    """GaLore-Adam on min_W E||X W^T - Y||^2 (Y = X W*^T), projector-level: returns (W, final loss, W0)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    target = low_rank_plus_noise(m, n, 24, gen, noise=0.1)
    target *= 3.0 / target.norm()  # ||W*|| = 3: 100 steps of lr 1e-2 cover most of the way from W_0 ~ 0
    w = 0.01 * torch.randn(m, n, generator=gen)
    w0 = w.clone()
    proj = make_projector(projector, rank, std_side(shape), shape, seed=seed, basis_bits=bits)
    state = {"proj_refreshes": 0}
    m1 = v1 = None
    loss = None
    for t in range(steps):
        x = torch.randn(32, n, generator=gen)
        resid = x @ w.t() - x @ target.t()
        loss = float(resid.square().sum(1).mean())
        grad = 2.0 / x.shape[0] * resid.t() @ x
        if t % gap == 0:
            state = {**state, **proj.refresh(state, grad)}
        low = proj.project(state, grad)
        if m1 is None:
            m1, v1 = torch.zeros_like(low), torch.zeros_like(low)
        m1.mul_(betas[0]).add_(low, alpha=1 - betas[0])
        v1.mul_(betas[1]).addcmul_(low, low, value=1 - betas[1])
        m_hat = m1 / (1 - betas[0] ** (t + 1))
        v_hat = v1 / (1 - betas[1] ** (t + 1))
        w -= lr * scale * proj.project_back(state, m_hat / (v_hat.sqrt() + eps))
    return w, loss, w0


def galore_drift(projectors=("svd", "power"), seeds=(0, 1, 2), steps=100) -> List[Dict]:
    rows = []
    for name in projectors:
        for bits in (32, 8, 4):
            drifts, losses = [], []
            for seed in seeds:
                w_ref, _, w0 = galore_least_squares(name, 32, steps=steps, seed=seed)
                w, loss, _ = galore_least_squares(name, bits, steps=steps, seed=seed)
                drifts.append(float((w - w_ref).norm() / (w_ref - w0).norm()))
                losses.append(loss)
            rows.append(
                {
                    "projector": name,
                    "bits": bits,
                    "drift": statistics.mean(drifts),
                    "max_drift": max(drifts),
                    "loss": statistics.mean(losses),
                }
            )
            print(f"galore {name} bits={bits}: drift {rows[-1]['drift']:.4f} loss {rows[-1]['loss']:.4f}", flush=True)
    return rows


# --- report ---------------------------------------------------------------------------------------------------------
def render(result: Dict, argv: List[str]) -> str:
    info = result["machine"]
    lines = [
        "# Projector refresh benchmark",
        "",
        f"- command: `python -m benchmarks.refresh_bench {shlex.join(argv)}`",
        f"- date: {result['date']}",
        f"- machine: {info['platform']}, {info['cpu_count']} CPUs (torch threads {info['torch_threads']}), "
        f"torch {info['torch']}, {info['processor']}, load average {info.get('loadavg_1_5_15')} at start",
        "",
    ]
    if "time" in result:
        lines += [
            "## Refresh time (median of %d, ms; ratio to svd in the same run)" % result["repeats"],
            "",
            "| shape | side | rank | " + " | ".join(TIMED) + " | " + " | ".join(f"{p}/svd" for p in TIMED[1:]) + " |",
            "|---" * (3 + 2 * len(TIMED) - 1) + "|",
        ]
        by = {}
        for row in result["time"]:
            by.setdefault((tuple(row["shape"]), row["rank"], row["side"]), {})[row["projector"]] = row
        for (shape, rank, side), r in by.items():
            lines.append(
                f"| {shape[0]}x{shape[1]} | {side} | {rank} | "
                + " | ".join(f"{r[p]['ms']:.0f}" for p in TIMED)
                + " | "
                + " | ".join(f"{r[p]['vs_svd']:.3f}" for p in TIMED[1:])
                + " |"
            )
        lines += [
            "",
            f"power: warm refresh (a previous basis in the state) with power_iters={result['power_iters']}; "
            "power x2: the same with power_iters=2; svd: one full SVD per shape (rank-independent), its "
            "median serves both ranks; the others after one untimed warm-up call.",
            "",
        ]
    if "power" in result:
        pq = result["power"]
        lines += [
            f"## Captured top-r energy on a real gradient sequence ({pq['model']}, {pq['weights']} weights, "
            f"shapes {', '.join(f'{a}x{b}' for a, b in pq['shapes'])}, {pq['refreshes']} refreshes every "
            f"{pq['gap']} AdamW steps, final loss {pq['final_loss']:.3f})",
            "",
            "||P^T G||^2 / ||U_r^T G||^2 over every refresh but the first (1 = exact SVD); ms = median "
            "refresh time on these small shapes.",
            "",
            "| rank | variant | mean | min | refreshes | ms |",
            "|---|---|---|---|---|---|",
        ]
        for row in pq["rows"]:
            ms = "-" if row["ms"] is None else f"{row['ms']:.1f}"
            lines.append(
                f"| {row['rank']} | {row['variant']} | {row['mean']:.4f} | {row['min']:.4f} | {row['n']} | {ms} |"
            )
        lines.append("")
    if "bits" in result:
        lines += [
            "## Quantized bases: ||P P^T G - P32 P32^T G|| / ||P32 P32^T G|| (svd basis, low-rank + noise)",
            "",
            "| shape | rank | side | bits | rel. error | max abs(P^T P - I) | bytes vs fp32 |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in result["bits"]["reconstruction"]:
            lines.append(
                f"| {row['shape'][0]}x{row['shape'][1]} | {row['rank']} | {row['side']} | {row['bits']} | "
                f"{row['rel_err']:.4f} | {row['orth_err']:.4f} | {row['bytes_vs_fp32']:.3f} |"
            )
        g = result["bits"]
        lines += [
            "",
            f"## {g['steps']} GaLore steps on least squares (128x96, ||W*|| = 3, W_0 = 0.01 N(0, 1), "
            f"rank 16, gap 20, lr 1e-2, scale 0.25; {g['seeds']} seeds)",
            "",
            f"drift = ||W_bits - W_fp32|| / ||W_fp32 - W_0|| after {g['steps']} steps (mean, max over seeds); "
            "loss = final minibatch loss (mean).",
            "",
            "| projector | basis bits | drift | max drift | final loss |",
            "|---|---|---|---|---|",
        ]
        for row in result["bits"]["galore"]:
            lines.append(
                f"| {row['projector']} | {row['bits']} | {row['drift']:.4f} | {row['max_drift']:.4f} | "
                f"{row['loss']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="time,power,bits")
    parser.add_argument("--shapes", default=LLAMA_1B_SHAPES)
    parser.add_argument("--ranks", default="128,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--power-iters",
        type=int,
        default=None,
        help="power's iterations in the time part (default: the projector's default)",
    )
    parser.add_argument("--power-model", default="llama_tiny")
    parser.add_argument("--power-ranks", default="32,64")
    parser.add_argument("--power-refreshes", type=int, default=8)
    parser.add_argument("--power-gap", type=int, default=25)
    parser.add_argument("--bits-cases", default="256x128x32,1024x512x64,512x1376x128")
    parser.add_argument("--galore-steps", type=int, default=100)
    parser.add_argument("--galore-seeds", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    parts = set(args.parts.split(","))
    unknown = parts - {"time", "power", "bits"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; valid: time, power, bits")
    from lowrank_optim.projectors import PROJECTORS

    power_iters = args.power_iters or PROJECTORS["power"].options["power_iters"][0]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "repeats": args.repeats,
        "power_iters": power_iters,
    }
    if "time" in parts:
        result["time"] = time_refreshes(
            parse_shapes(args.shapes), [int(r) for r in args.ranks.split(",")], args.repeats, power_iters
        )
    if "power" in parts:
        result["power"] = power_quality(
            args.power_model, [int(r) for r in args.power_ranks.split(",")], args.power_refreshes, args.power_gap
        )
    if "bits" in parts:
        cases = [tuple(int(d) for d in c.split("x")) for c in args.bits_cases.split(",")]
        seeds = tuple(range(args.galore_seeds))
        result["bits"] = {
            "reconstruction": reconstruction_errors(cases),
            "steps": args.galore_steps,
            "seeds": len(seeds),
            "galore": galore_drift(seeds=seeds, steps=args.galore_steps),
        }
    text = render(result, argv)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as fh:
            fh.write(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
