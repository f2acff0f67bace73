"""benchmarks.pretrain's options: the parser, the checks that run before any data is touched, the paper recipe,
and the comparison of a run's options with those of the checkpoint it resumes."""

import argparse
import json
import os

import torch

from .cli import Parser, UsageError, check_number, check_writable_dir
from .optimizers import add_optimizer_args, apply_recipe, build_optimizer, extra_kwargs, optimizer_class

PROG = "python -m benchmarks.pretrain"

# options that do not change what is trained (where files go, how often to log / save, the device);
# every other option must match the checkpoint's on --resume unless --override is given
NOT_TRAINING = {
    "output_dir",
    "resume",
    "override",
    "save_every",
    "keep_checkpoints",
    "log_every",
    "eval_every",
    "cache_dir",
    "device",
    "max_tokens",
    "recipe",
    "fsdp",  # how the run is spread over processes: the same training (the checkpoint's format follows it)
}
# options the checkpoint's tensors were built for (shapes, vocabulary, which weights are low-rank): not even
# --override can change them on a resume
STRUCTURAL = {
    "model",
    "optimizer",
    "rank",
    "density",
    "state_bits",
    "target_modules",
    "projector",
    "proj_type",
    "layerwise",
    "data",
    "text_field",
    "val_fraction",
    "tokenizer",
    "tokenizer_train_mb",
}


def build_parser(description=None):
    p = Parser(prog=PROG, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama_tiny", help="config name in benchmarks/configs or a JSON path")
    p.add_argument("--data", default="stdlib", help="stdlib | a text/.jsonl file or directory | hf:NAME[:CONFIG]")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl / hf records")
    p.add_argument("--val-fraction", type=float, default=0.05, help="documents held out, chosen by key hash")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer name; default: byte-level BPE trained on --data")
    p.add_argument(
        "--tokenizer-train-mb",
        type=float,
        default=16,
        help="cap on training text fed to BPE training (keeps it minutes on 2 CPU cores)",
    )
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "lowrank_optim"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="per-device micro batch, in sequences")
    p.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="sequences per optimizer step over all ranks and --grad-accum micro batches, instead of --batch-size "
        "(which it sets to global / (world size x grad accum)): the same training at any world size, so a run "
        "resumes with another number of processes",
    )
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="default 1000 unless --max-tokens is given")
    p.add_argument("--max-tokens", type=int, default=None, help="train tokens; sets --max-steps")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm; 0 disables")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="bf16 = bf16 autocast (fp32 master weights); default bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evals (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=16, help="fixed validation set: this many global batches")
    p.add_argument("--log-every", type=int, default=10, help="print a line every N steps when tqdm is off")
    p.add_argument("--output-dir", default=None, help="default runs/<model>-<optimizer>-seed<seed>")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="keep only the newest N checkpoints")
    p.add_argument(
        "--resume",
        default=None,
        help="checkpoint file, or 'auto' for the newest intact one in --output-dir (fresh start if none)",
    )
    p.add_argument(
        "--override",
        action="store_true",
        help="on --resume, train with this command's options where they differ from the checkpoint's "
        "(default: refuse and list the differences)",
    )
    p.add_argument(
        "--layerwise",
        action="store_true",
        help="update each weight inside backward (lowrank_optim optimizers only; no DDP)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard every transformer block and the root with FSDP2 (fully_shard) instead of DDP; "
        "checkpoints are torch.distributed.checkpoint directories that resume at any world size",
    )
    add_optimizer_args(p)
    return p


def check_values(args):
    """Every numeric option in range (UsageError naming the flag otherwise)."""
    for flag, value in (
        ("--seq-len", args.seq_len),
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
        ("--eval-batches", args.eval_batches),
        ("--keep-checkpoints", args.keep_checkpoints),
        ("--rank", args.rank),
        ("--update-proj-gap", args.update_proj_gap),
    ):
        check_number(flag, value, low=1)
    for flag, value in (
        ("--max-steps", args.max_steps),
        ("--max-tokens", args.max_tokens),
        ("--global-batch", args.global_batch),
    ):
        check_number(flag, value, low=1, allow_none=True)
    for flag, value in (
        ("--eval-every", args.eval_every),
        ("--save-every", args.save_every),
        ("--log-every", args.log_every),
        ("--grad-clip", args.grad_clip),
        ("--weight-decay", args.weight_decay),
    ):
        check_number(flag, value, low=0)
    check_number("--val-fraction", args.val_fraction, 0, 1, low_open=True, high_open=True)
    check_number("--warmup", args.warmup, 0, 1, high_open=True)
    check_number("--min-lr-ratio", args.min_lr_ratio, 0, 1)
    check_number("--tokenizer-train-mb", args.tokenizer_train_mb, low=0, low_open=True)
    check_number("--lr", args.lr, low=0, low_open=True)
    check_number("--eps", args.eps, low=0, low_open=True, allow_none=True)
    check_number("--scale", args.scale, low=0, low_open=True, allow_none=True)
    check_number("--density", args.density, 0, 1, low_open=True, allow_none=True)
    if len(args.betas) != 2:
        raise UsageError(f"--betas takes two numbers (beta1,beta2), got {len(args.betas)}")
    for b in args.betas:
        check_number("--betas", b, 0, 1, high_open=True)
    try:
        extra_kwargs(args)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_optimizer(args, config):
    """Import the optimizer and build it over a meta-device copy of the model (no memory, no data): every option
    the optimizer itself validates is checked before the tokenizer or the data are prepared."""
    try:
        optimizer_class(args.optimizer)
    except ImportError as e:
        raise UsageError(str(e)) from None
    from .model import build_model

    state = torch.get_rng_state()
    with torch.device("meta"):
        model = build_model(config)
    torch.set_rng_state(state)  # build_model seeds torch; leave the caller's RNG alone
    try:
        build_optimizer(args.optimizer, model, args)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--optimizer {args.optimizer}: {e}") from None


def check_data(args):
    from . import data as D

    if args.data == "stdlib":
        return
    if args.data.startswith("hf:"):
        reason = D.hub_unreachable_reason()
        if reason:
            raise UsageError(
                f"--data {args.data}: the Hugging Face hub is unreachable ({reason}); "
                "use --data stdlib or a local path instead"
            )
    elif not os.path.exists(os.path.expanduser(args.data)):
        raise UsageError(f"--data {args.data}: no such file or directory")
    if args.tokenizer:
        try:
            D.hf_tokenizer(args.tokenizer)  # local files or the hub; fails fast when the hub is unreachable
        except (OSError, ValueError) as e:
            raise UsageError(f"--tokenizer {args.tokenizer}: {str(e).splitlines()[0]}") from None


def resolve(args, explicit, config, world):
    """Fill the derived options in place (recipe, dtype, output dir, steps) and check everything cheap."""
    args.recipe_applied = apply_recipe(args, explicit, config.hidden_size)
    check_values(args)
    model_name = os.path.splitext(os.path.basename(args.model))[0]
    args.output_dir = args.output_dir or os.path.join("runs", f"{model_name}-{args.optimizer}-seed{args.seed}")
    if args.global_batch is not None:
        args.batch_size = per_device_batch(args, explicit, world)
    global_batch = args.batch_size * args.grad_accum * world
    if args.max_tokens is not None:
        args.max_steps = -(-args.max_tokens // (global_batch * args.seq_len))
    args.max_steps = 1000 if args.max_steps is None else args.max_steps
    if args.layerwise and world > 1:
        raise UsageError("--layerwise updates weights inside backward, before DDP could average the gradients")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return model_name


def per_device_batch(args, explicit, world):
    """--batch-size from --global-batch: an equal slice of every micro batch on each of the `world` ranks."""
    if "batch_size" in explicit:
        raise UsageError(
            f"--global-batch {args.global_batch} and --batch-size {args.batch_size}: give one of them "
            f"(--batch-size is per device, --global-batch over all {world} rank(s) and --grad-accum micro batches)"
        )
    share = world * args.grad_accum
    if args.global_batch % share:
        raise UsageError(
            f"--global-batch {args.global_batch} is not divisible by the world size {world} x --grad-accum "
            f"{args.grad_accum} = {share}: every rank takes an equal slice of each micro batch"
        )
    return args.global_batch // share


def training_options(args):
    """The options that define what is trained, JSON-normalised (tuples become lists) for comparison. A run's
    batch is per device (--batch-size) or global (--global-batch, which sets the per-device size from the world
    size: no training option then, so the run resumes with another number of processes)."""
    opts = {k: v for k, v in vars(args).items() if k not in NOT_TRAINING and k != "recipe_applied"}
    opts.pop("batch_size" if opts.get("global_batch") is not None else "global_batch", None)
    return json.loads(json.dumps(opts, default=str))


def option_differences(saved, current):
    """(['--lr: checkpoint 0.01, this run 0.001', ...] for every training option that differs, the structural
    ones among them)."""
    lines, structural = [], []
    for key in sorted(set(saved) | set(current)):
        if key in NOT_TRAINING or key == "recipe_applied":
            continue
        a, b = saved.get(key, "(unset)"), current.get(key, "(unset)")
        if a != b:
            lines.append(f"--{key.replace('_', '-')}: checkpoint {a!r}, this run {b!r}")
            if key in STRUCTURAL:
                structural.append(lines[-1])
    return lines, structural


def check_output_dir(args):
    check_writable_dir("--output-dir", args.output_dir)
