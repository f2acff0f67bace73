"""Plotting helpers shared by benchmarks.compare and benchmarks.tune (matplotlib, headless)."""

import json
import os

import matplotlib

matplotlib.use("Agg")  # no display on the benchmark machines
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2.0**20


def read_log(run_dir):
    """(train steps, train losses, eval steps, eval ppls) from a pretrain run's log.jsonl."""
    steps, losses, esteps, ppls = [], [], [], []
    path = os.path.join(run_dir, "log.jsonl")
    if os.path.exists(path):
        for line in open(path):
            entry = json.loads(line)
            if "loss" in entry:
                steps.append(entry["step"])
                losses.append(entry["loss"])
            if "eval_ppl" in entry:
                esteps.append(entry["step"])
                ppls.append(entry["eval_ppl"])
    return steps, losses, esteps, ppls


def ema(values, beta=0.9):
    """Bias-corrected exponential moving average (what TensorBoard's smoothing shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves(runs, loss_path, ppl_path, smooth=0.9):
    """Two PNGs from {label: run_dir}: smoothed training loss and validation perplexity vs step."""
    loss_fig, loss_ax = plt.subplots(figsize=(7, 4.5))
    ppl_fig, ppl_ax = plt.subplots(figsize=(7, 4.5))
    for label, run_dir in runs.items():
        steps, losses, esteps, ppls = read_log(run_dir)
        if steps:
            loss_ax.plot(steps, ema(losses, smooth), label=label, lw=1.2)
        if esteps:
            ppl_ax.plot(esteps, ppls, marker="o", ms=3, label=label, lw=1.2)
    loss_ax.set(xlabel="step", ylabel=f"training loss (EMA {smooth})", title="Training loss")
    ppl_ax.set(xlabel="step", ylabel="validation perplexity", yscale="log", title="Validation perplexity")
    for ax in (loss_ax, ppl_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    return save(loss_fig, loss_path), save(ppl_fig, ppl_path)


def pareto_front(points):
    """Indices of the points (memory, ppl) no other point beats on both (ties: the lower ppl), by memory."""
    front, best = [], float("inf")
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1])):
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def memory_vs_ppl(labels, mem_bytes, ppls, path, title, front=False):
    """Scatter of optimizer state (MiB) vs final perplexity, each point labelled; optionally the Pareto front."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mib = [m / MIB for m in mem_bytes]
    ax.scatter(mib, ppls, zorder=3)
    for x, y, label in zip(mib, ppls, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if front and ppls:
        idx = pareto_front(list(zip(mib, ppls)))
        ax.step([mib[i] for i in idx], [ppls[i] for i in idx], where="post", color="C3", lw=1.2, zorder=2)
        ax.scatter(
            [mib[i] for i in idx],
            [ppls[i] for i in idx],
            s=90,
            facecolors="none",
            edgecolors="C3",
            label="Pareto front",
            zorder=4,
        )
        ax.legend(fontsize=8)
    ax.set(xlabel="optimizer state (MiB)", ylabel="final validation perplexity", title=title)
    ax.grid(alpha=0.3)
    return save(fig, path)


def heatmap(rows, cols, values, path, row_label, col_label, title):
    """values[i][j] (None: no trial) over rows x cols, annotated."""
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 3, 0.8 * len(rows) + 2))
    data = [[float("nan") if v is None else v for v in row] for row in values]
    im = ax.imshow(data, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            dark = v is not None and im.norm(v) > 0.5  # viridis_r: high ppl is dark, so write white on it
            ax.text(
                j, i, "-" if v is None else f"{v:.1f}", ha="center", va="center", color="w" if dark else "k", fontsize=9
            )
    ax.set(xlabel=col_label, ylabel=row_label, title=title)
    fig.colorbar(im, ax=ax, label="eval ppl")
    return save(fig, path)
