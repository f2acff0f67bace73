"""Optimizer state per rank under FSDP2 (parameters sharded ``Shard(0)`` over W ranks), from shapes only:

    python -m benchmarks.fsdp_state --output benchmarks/results/fsdp_state.md

Uses ``optimizer.expected_state_bytes(world_size=W, rank=r)`` (what ``lowrank_optim.estimate_state_bytes(...,
world_size=W, process_rank=r)`` returns), which the tests check equals every
rank's measured ``optimizer.state_bytes()`` in sharded runs (``tests/test_fsdp_memory.py``). Each state tensor
with at least one dim is split by rows like ``torch.chunk``; 0-dim counters are held by every rank. The table shows
the fullest rank; the check asks that it hold at most 5% more than an even share (1/W of world 1).
"""

import argparse
import datetime
import os
import platform
import sys
import warnings

import torch

from .cli import Parser, UsageError, check_writable_dir, entry_point, publish
from .model import load_config

METHODS = [  # (label, optimizer name, options; rank None: the model's --models rank)
    ("GaLore", "galore", {}),
    ("Fira", "fira", {}),
    ("GaLore 8-bit", "galore", {"state_bits": 8}),
    ("APOLLO-Mini", "apollo_mini", {"rank": 1}),
    ("AdamW", "adamw", {}),
]
SLACK = 0.05  # the fullest rank may hold up to 5% more than 1/W of world 1


def _pairs(text):
    """'llama_60m:128,llama_1b:512' -> [('llama_60m', 128), ('llama_1b', 512)]."""
    out = []
    for item in text.split(","):
        name, _, rank = item.partition(":")
        if not rank.isdigit() or int(rank) < 1:
            raise UsageError(f"--models: each entry is CONFIG:RANK with RANK an int >= 1, got {item!r}")
        out.append((name, int(rank)))
    return out


def _worlds(text):
    try:
        worlds = [int(w) for w in text.split(",")]
    except ValueError:
        raise UsageError(f"--worlds: a comma-separated list of ints >= 1, got {text!r}") from None
    if any(w < 1 for w in worlds):
        raise UsageError(f"--worlds: a comma-separated list of ints >= 1, got {text!r}")
    return worlds


def rows_for(model, rank, worlds):
    """(label, world, fullest rank's bytes, emptiest rank's bytes, fullest / world-1 bytes, within the bound)."""
    from lowrank_optim.memory import build  # the optimizer estimate_state_bytes measures, built once per method

    rows = []
    for label, name, opts in METHODS:
        kw = dict(opts) if name == "adamw" else {"rank": rank, **opts}
        opt = build(model, name, **kw)
        whole = opt.expected_state_bytes()
        for world in worlds:
            each = [opt.expected_state_bytes(world_size=world, rank=r) for r in range(world)]
            ratio = max(each) / whole
            rows.append((label, world, max(each), min(each), ratio, ratio <= (1 + SLACK) / world))
    return rows


@entry_point("python -m benchmarks.fsdp_state")
def main(argv=None):
    p = Parser(
        prog="python -m benchmarks.fsdp_state",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default="llama_60m:128,llama_1b:512", help="CONFIG:RANK,... (benchmarks/configs)")
    p.add_argument("--worlds", default="1,2,4,8", help="world sizes (ranks sharing the parameters)")
    p.add_argument("--output", default=None, help="also write the Markdown tables here")
    args = p.parse_args(argv)
    models, worlds = _pairs(args.models), _worlds(args.worlds)
    configs = []
    for name, rank in models:
        try:
            configs.append((name, rank, load_config(name)))
        except ValueError as e:
            raise UsageError(f"--models: {e}") from None
    if args.output:
        check_writable_dir("--output", os.path.dirname(os.path.abspath(args.output)))
    from transformers import LlamaForCausalLM

    lines = [
        "# Optimizer state per rank under FSDP2",
        "",
        f"Command: `python -m benchmarks.fsdp_state {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {platform.platform()}, torch {torch.__version__} (shapes only, no device needed)  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        "Every parameter sharded `Shard(0)` over W ranks (`fully_shard`); targets attn,mlp low-rank, embeddings, "
        "norms and lm_head dense in every row. A state tensor with >= 1 dim is split by rows like `torch.chunk`, a "
        "0-dim one (step counts, Fira's and APOLLO's limiter norms) is held by every rank. Bytes are "
        "`estimate_state_bytes(..., world_size=W, process_rank=r)`, equal to each rank's measured `state_bytes()` "
        "(tests/test_fsdp_memory.py). *Fullest rank* is the largest over r; *ratio* = fullest rank / world 1; "
        f"*check*: ratio <= (1 + {SLACK:g}) / W, i.e. at most 5% above an even share.",
    ]
    all_rows = {}
    failures = []
    for name, rank, config in configs:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = rows_for(model, rank, worlds)
        all_rows[name] = rows
        lines += [
            "",
            f"## {name} ({n_params / 1e6:.1f}M parameters), rank {rank} (APOLLO-Mini: rank 1)",
            "",
            "| method | W | fullest rank MiB | emptiest rank MiB | ratio to W=1 | 1/W | check |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for label, world, most, least, ratio, ok in rows:
            lines.append(
                f"| {label} | {world} | {most / 2**20:.2f} | {least / 2**20:.2f} | {ratio:.4f} | {1 / world:.4f} "
                f"| {'ok' if ok else 'FAIL'} |"
            )
            if not ok:
                failures.append((name, label, world, ratio))
    lines += [
        "",
        "Why ranks differ at all: rows split like `torch.chunk` (ceil(rows / W) per rank, the last ranks fewer), the "
        "0-dim counters are on every rank, and a rank-1 left projection (APOLLO-Mini on a wide weight, here "
        "down_proj) has 1 x n moments, one row: all of it on rank 0.",
        "",
        "All rows within the bound." if not failures else "Rows over the bound:",
    ]
    lines += [f"- {n} {label} W={w}: ratio {r:.4f} > {(1 + SLACK) / w:.4f}" for n, label, w, r in failures]
    text = "\n".join(lines) + "\n"
    publish(text, args.output)
    return all_rows


if __name__ == "__main__":
    main()
