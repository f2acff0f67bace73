"""Collectives of the optimizer under FSDP2, per step and per refresh step, beside FSDP2's own traffic for the
same model (its parameter all-gathers in forward and backward, its gradient reduce-scatters), all measured by
counting (``benchmarks/comm_count.py``) on every rank:

    torchrun --standalone --nproc_per_node 2 -m benchmarks.fsdp_traffic --model llama_60m --rank 128 \\
        --output benchmarks/results/fsdp_traffic.md

The model (``fully_shard`` per decoder layer and on the root, fp32, CPU, gloo) takes one forward and backward on
random tokens, counted; its gradients are then kept and every optimizer takes three steps on them with
``update_proj_gap=2``: step 0 computes the first bases, step 1 is a plain step, step 2 a refresh. Only
``optimizer.step()`` is counted for the optimizer rows.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import warnings

import torch
import torch.distributed as dist

from .cli import Parser, UsageError, check_number, check_writable_dir, entry_point, leave_process_group, publish
from .comm_count import CollectiveCounter
from .model import build_model, load_config

METHODS = [  # (label, optimizer name, options)
    ("GaLore (svd)", "galore", {}),
    ("GaLore rsvd", "galore", {"projector": "rsvd"}),
    ("GaLore random", "galore", {"projector": "random"}),
    ("Fira", "fira", {}),
    ("GaLore 8-bit", "galore", {"state_bits": 8}),
    ("AdamW", "adamw", {}),
]
WHERE_FROM = [  # the design of lowrank_optim/sharding.py, which the rows measure
    "Where the optimizer's bytes come from (`lowrank_optim/sharding.py`):",
    "- every step, 2 all-reduces of the 0-dim non-finite flag (every rank skips together);",
    "- fp32 Adam moments and the low-rank route step on each rank's rows: each stored basis is all-gathered for use "
    "(svd, rsvd), a left-side projection P^T G is all-reduced (r x n) and its Adam direction all-gathered back "
    "(r x n); Fira adds one all-reduced norm per matrix; dense AdamW needs nothing;",
    "- a refresh all-gathers each gradient, one owner rank per matrix computes the basis and broadcasts it (with a "
    "small broadcast_object_list of its layout); `rsvd` instead refreshes from each rank's rows: all-reduced "
    "n x k products and all-gathered m x k sketches (k = rank + oversample, several rounds for the power "
    "iterations): (m + n) x k per round instead of the m x n gradient, at 2 ranks about as many bytes; `random` "
    "draws its basis on every rank from the seed: no basis traffic at all, neither per step nor at refreshes;",
    "- 8-bit states (and Adafactor, SST) step on the gathered whole: the parameter, its gradient and every state "
    "tensor (codes, absmax, basis) are all-gathered every step, dense parameters (embeddings, lm_head) included, "
    "which costs about as much as FSDP2's own forward and backward.",
]
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "broadcast_object_list")


def shard_model(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def fsdp_traffic(model, tokens):
    """{"forward": totals, "backward": totals} of one training step's forward and backward."""
    with CollectiveCounter() as fwd:
        loss = model(input_ids=tokens, labels=tokens).loss
    with CollectiveCounter() as bwd:
        loss.backward()
    return {"forward": fwd.totals(), "backward": bwd.totals()}


def optimizer_traffic(model, grads, name, options, subspace_rank):
    """{"step": totals, "refresh": totals} of ``optimizer.step()`` alone: step 1 (plain) and step 2 (refresh)."""
    from lowrank_optim.memory import build

    kw = dict(options) if name == "adamw" else {"rank": subspace_rank, "update_proj_gap": 2, **options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trained densely" notes
        opt = build(model, name, **kw)
    out = {}
    for phase in ("first", "step", "refresh"):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        with CollectiveCounter() as c:
            opt.step()
        out[phase] = c.totals()
    del opt
    gc.collect()
    return out


def measure(config, rank, seq_len, methods):
    """Every row's totals on this rank: [(label, phase, {kind: (calls, bytes)})]."""
    model = shard_model(build_model(config, seed=0))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (1, seq_len), generator=gen)
    rows = [("FSDP2", phase, t) for phase, t in fsdp_traffic(model, tokens).items()]
    grads = [p.grad.detach().clone() for p in model.parameters()]
    for label, name, options in methods:
        for phase, t in optimizer_traffic(model, grads, name, options, rank).items():
            if phase != "first":
                rows.append((label, phase, t))
    return rows, sum(p.numel() * p.element_size() for p in model.parameters())


PHASES = {"forward": "forward", "backward": "backward", "step": "optimizer.step()", "refresh": "refresh step"}


def size(nbytes: int) -> str:
    """Bytes in the largest unit that keeps them >= 1 (B, KiB, MiB, GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def table(rows):
    fsdp = sum(b for label, _, t in rows if label == "FSDP2" for _, b in t.values())
    head = "| method | counted | " + " | ".join(f"{k} calls | {k} bytes" for k in KINDS) + " | total bytes | vs FSDP2 |"
    lines = [head, "|---|---|" + "---:|" * (2 * len(KINDS) + 2)]
    for label, phase, t in rows:
        cells = []
        for k in KINDS:
            calls, nbytes = t.get(k, (0, 0))
            cells += [str(calls), size(nbytes)]
        total = sum(b for _, b in t.values())
        cells += [size(total), f"{total / fsdp:.4f}"]
        lines.append(f"| {label} | {PHASES[phase]} | " + " | ".join(cells) + " |")
    others = sorted({k for _, _, t in rows for k in t if k not in KINDS})
    return lines, fsdp, others


@entry_point("python -m benchmarks.fsdp_traffic")
def main(argv=None):
    p = Parser(
        prog="torchrun --nproc_per_node W -m benchmarks.fsdp_traffic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="llama_60m", help="config name in benchmarks/configs or a JSON path")
    p.add_argument("--rank", type=int, default=128, help="subspace rank of the low-rank methods")
    p.add_argument("--seq-len", type=int, default=64, help="tokens in the one batch of the FSDP2 rows")
    p.add_argument("--methods", default=None, help="comma-separated labels to run (default: all)")
    p.add_argument("--output", default=None, help="rank 0 writes the Markdown table here")
    p.add_argument("--json", default=None, help="rank 0 writes the rows here: [label, phase, {kind: [calls, bytes]}]")
    args = p.parse_args(argv)
    check_number("--rank", args.rank, low=1)
    check_number("--seq-len", args.seq_len, low=1)
    methods = METHODS
    if args.methods:
        wanted = args.methods.split(",")
        unknown = [m for m in wanted if m not in {label for label, _, _ in METHODS}]
        if unknown:
            raise UsageError(f"--methods: unknown {unknown}; known: {[label for label, _, _ in METHODS]}")
        methods = [m for m in METHODS if m[0] in wanted]
    try:
        config = load_config(args.model)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    for flag, path in (("--output", args.output), ("--json", args.json)):
        if path:
            check_writable_dir(flag, os.path.dirname(os.path.abspath(path)))
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    world, me = dist.get_world_size(), dist.get_rank()
    rows, param_bytes = measure(config, args.rank, args.seq_len, methods)
    every = [None] * world
    dist.all_gather_object(every, rows)
    if me != 0:
        return rows
    same = all(r == every[0] for r in every)
    lines, fsdp, others = table(rows)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(
        [
            f"# Collectives per step under FSDP2: {args.model}, {world} ranks, rank {args.rank}",
            "",
            f"Command: `torchrun --standalone --nproc_per_node {world} -m benchmarks.fsdp_traffic {command}`  ",
            f"Machine: {platform.platform()}, torch {torch.__version__}, CPU, gloo  ",
            f"Date: {datetime.date.today().isoformat()}  ",
            f"Parameters: {param_bytes / 2**20:.1f} MiB fp32; FSDP2 rows: one forward and backward of 1 x "
            f"{args.seq_len} tokens, `fully_shard` per decoder layer and on the root. Optimizer rows: "
            "`optimizer.step()` alone, targets attn,mlp, `update_proj_gap=2` (a plain step, then a refresh).",
            "",
            "Counted on every rank by wrapping torch.distributed's collectives and the functional collectives "
            "DTensor uses (`benchmarks/comm_count.py`). Bytes: the collective's whole tensor on one rank (an "
            "all-gather's gathered output with its padding, a reduce-scatter's input, an all-reduce's or a "
            "broadcast's tensor); on a ring each rank sends about (W-1)/W of that for an all-gather or "
            "reduce-scatter and 2(W-1)/W for an all-reduce. *vs FSDP2*: total over FSDP2's forward + backward "
            f"({fsdp / 2**20:.1f} MiB). "
            + ("Every rank counted the same." if same else "Ranks counted different numbers: rank 0 shown."),
            "",
            *lines,
            "",
            f"Other kinds counted: {', '.join(others) if others else 'none'}.",
            "",
            *WHERE_FROM,
        ]
    )
    publish(text, args.output)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"world": world, "same_on_every_rank": same, "rows": rows}, f)
    return rows


if __name__ == "__main__":
    main()
    leave_process_group()
