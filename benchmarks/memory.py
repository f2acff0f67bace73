"""Optimizer-state bytes per method before training, from shapes only (meta-device model, nothing allocated):

    python -m benchmarks.memory --model llama_60m --rank 128 --output benchmarks/results/state_bytes_llama60m.md

Uses ``lowrank_optim.estimate_state_bytes``, which the tests check equals the measured ``optimizer.state_bytes()``.
"""

import argparse
import datetime
import os
import platform
import sys
import warnings

import torch

from .cli import Parser, UsageError, check_number, check_writable_dir, entry_point, publish
from .model import load_config

METHODS = [  # (label, optimizer name, options)
    ("AdamW (fp32 states)", "adamw", {}),
    ("AdamW 8-bit states", "adamw", {"state_bits": 8}),
    ("GaLore (svd)", "galore", {}),
    ("GaLore 8-bit", "galore", {"state_bits": 8}),
    ("GaLore rsvd", "galore", {"projector": "rsvd"}),
    ("GaLore random (seed only)", "galore", {"projector": "random"}),
    ("GaLore Adafactor", "galore_adafactor", {}),
    ("Fira", "fira", {}),
    ("Fira 8-bit", "fira", {"state_bits": 8}),
    ("FRUGAL (columns)", "frugal", {}),
    ("FRUGAL 8-bit", "frugal", {"state_bits": 8}),
    ("DCT-AdamW (indices)", "dct", {}),
    ("DCT-AdamW 8-bit", "dct", {"state_bits": 8}),
    ("SST", "sst", {}),
    ("SST 8-bit", "sst", {"state_bits": 8}),
]


@entry_point("python -m benchmarks.memory")
def main(argv=None):
    p = Parser(
        prog="python -m benchmarks.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="llama_60m")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--target-modules", default="attn,mlp")
    p.add_argument("--output", default=None, help="also write the Markdown table here")
    args = p.parse_args(argv)
    check_number("--rank", args.rank, low=1)
    try:
        config = load_config(args.model)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    if args.output:
        check_writable_dir("--output", os.path.dirname(os.path.abspath(args.output)))
    from transformers import LlamaForCausalLM

    from lowrank_optim import estimate_state_bytes

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = estimate_state_bytes(model, "adamw")
        for label, name, opts in METHODS:
            kw = dict(opts) if name == "adamw" else dict(rank=args.rank, **opts)
            b = estimate_state_bytes(model, name, args.target_modules.split(","), **kw)
            rows.append((label, b, b / base))
    lines = [
        f"# Optimizer-state memory, {args.model} ({n_params / 1e6:.1f}M parameters), rank {args.rank}",
        "",
        f"Command: `python -m benchmarks.memory {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {platform.platform()}, torch {torch.__version__} (shapes only, no device needed)  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Targets: {args.target_modules} (embeddings, norms and lm_head are dense AdamW in every row)",
        "",
        "| method | state MiB | vs AdamW |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {b / 2**20:.1f} | {r:.3f} |" for label, b, r in rows]
    text = "\n".join(lines) + "\n"
    publish(text, args.output)
    return rows


if __name__ == "__main__":
    main()
