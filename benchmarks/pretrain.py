"""LLaMA pretraining benchmark: `python -m benchmarks.pretrain --model llama_60m --optimizer galore`.

Single process or `torchrun --nproc_per_node N -m benchmarks.pretrain ...` (gloo on CPU, nccl on CUDA): DDP, or
FSDP2 with --fsdp (benchmarks/fsdp.py; checkpoints that resume at another world size). --batch-size is per device;
a step consumes batch_size * grad_accum * world_size blocks of --seq-len tokens (--global-batch sets that number
instead, the same at any world size).
Options not given come from the optimizer's paper recipe (--recipe paper; --recipe none: the flag defaults).

Exit status: 0 done (the last lines say where summary.json went and the headline numbers); 2 a usage error (one
line on stderr, found before any tokenizer training or data preparation where possible), including a --resume
whose checkpoint is corrupt or was trained with other options (listed; --override trains with the new ones);
3 the loss became NaN or infinite. Checkpoints: see benchmarks/checkpoint.py.
"""

import json
import math
import os
import random
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import data as D
from . import fsdp
from . import run_options as opts
from .cli import USAGE_EXIT, UsageError, entry_point, explicit_dests, leave_process_group
from .model import build_model, load_config
from .optimizers import build_optimizer, optimizer_options, state_bytes
from .train_loop import Loop, _barrier, say


def build_parser():
    return opts.build_parser(__doc__)


# ---------------------------------------------------------------- schedule


def cosine_with_min_lr(step, warmup_steps, total_steps, min_lr_ratio):
    """GaLore's schedule: linear warmup from 0, then cosine from 1 down to min_lr_ratio."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer, total_steps, args):
    warmup = int(args.warmup * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_min_lr(s, warmup, total_steps, args.min_lr_ratio)
    )


def attach_layerwise(optimizer, args):
    """--layerwise hook point: wrap the built optimizer in lowrank_optim's LayerwiseOptimizer, which updates each
    weight from a post-accumulate-grad hook inside backward and frees its gradient at once. The loop then skips
    optimizer.step() and steps the scheduler at accumulation boundaries; --grad-clip becomes per-parameter."""
    try:
        from lowrank_optim.layerwise import LayerwiseOptimizer
    except ImportError as e:
        raise ImportError(f"--layerwise needs lowrank_optim.layerwise, which could not be imported: {e}") from e
    return LayerwiseOptimizer(
        optimizer, accumulation_steps=args.grad_accum, clip_grad_norm=args.grad_clip if args.grad_clip > 0 else None
    )


# ---------------------------------------------------------------- distributed / data


def setup_distributed(args):
    """(rank, world_size, device) from torchrun's env vars; one process when WORLD_SIZE is unset."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if (world > 1 or args.fsdp) and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def prepare_data(args, config, total_tokens, rank, world):
    """Corpus -> tokenizer -> cached token streams -> packed blocks. Rank 0 builds the caches first."""
    t0 = time.time()
    corpus = D.load_corpus(
        args.data,
        args.text_field,
        args.val_fraction,
        max_chars=8 * total_tokens if args.data.startswith("hf:") else None,
    )
    timings = {"corpus_s": time.time() - t0}
    for turn in (0, 1):  # rank 0 trains the tokenizer / tokenizes, then the others read its cache
        if (rank == 0) == (turn == 0):
            t0 = time.time()
            tok = (
                D.hf_tokenizer(args.tokenizer)
                if args.tokenizer
                else D.train_bpe(corpus, config.vocab_size, args.cache_dir, args.tokenizer_train_mb)
            )
            timings["tokenizer_s"] = time.time() - t0
            t0 = time.time()
            train, val = D.tokenize_cached(corpus, tok, args.cache_dir)
            timings["tokenize_s"] = time.time() - t0
        _barrier(world)
    if tok.vocab_size > config.vocab_size:  # e.g. an HF tokenizer larger than the config's 32000
        config.vocab_size = tok.vocab_size
    return corpus, tok, D.pack(train, args.seq_len), D.pack(val, args.seq_len), timings


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB; whole-process peak


def versions():
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        out["lowrank_optim"] = version("lowrank-optim")
    except Exception:  # not installed as a distribution: fall back to the package attribute
        try:
            import lowrank_optim

            out["lowrank_optim"] = getattr(lowrank_optim, "__version__", "unknown")
        except Exception as e:  # noqa: BLE001 - the package may be mid-rewrite; record why
            out["lowrank_optim"] = f"unavailable ({type(e).__name__})"
    return out


# ---------------------------------------------------------------- resume


def find_resume(args, rank):
    """(checkpoint path, its checksum-file contents) to resume from, or (None, None) to start fresh."""
    if not args.resume:
        return None, None
    if args.resume != "auto":
        meta, why = ckpt.verify(args.resume)
        if meta is None:
            raise UsageError(f"--resume {args.resume}: not an intact checkpoint: {why}")
        check_resume_format(args, args.resume)
        say(rank, f"resuming from {args.resume} (step {meta['step']})")
        return args.resume, meta
    path, meta, skipped = ckpt.newest_intact(args.output_dir)
    for bad, why in skipped:
        say(rank, f"not resuming from {bad}: {why}")
    if path is None:
        say(rank, f"--resume auto: no intact checkpoint in {ckpt.checkpoint_dir(args.output_dir)}; starting fresh")
        return None, None
    check_resume_format(args, path)
    say(rank, f"--resume auto: resuming from {path} (step {meta['step']})")
    return path, meta


def check_resume_format(args, path):
    """An --fsdp run resumes from --fsdp checkpoints (directories) only, and any other run from files only."""
    sharded = ckpt.is_sharded(path)
    if sharded != args.fsdp:
        how = "under torchrun with --fsdp" if sharded else "without --fsdp"
        raise UsageError(
            f"--resume {args.resume}: {path} was written by a run {'with' if sharded else 'without'} --fsdp "
            f"(a {'torch.distributed.checkpoint directory' if sharded else 'single file'}); resume it {how}"
        )


def check_resume_options(args, path, meta):
    """The differences between this run's training options and the checkpoint's; refused unless --override."""
    diffs, structural = opts.option_differences(meta.get("args", {}), opts.training_options(args))
    if structural:
        raise UsageError(
            f"--resume {path}: the checkpoint's state was built for other values of "
            f"{len(structural)} option(s), which not even --override can change (start a new run "
            "in another --output-dir):\n  " + "\n  ".join(structural)
        )
    if diffs and not args.override:
        raise UsageError(
            f"--resume {path}: {len(diffs)} training option(s) differ from the checkpoint's "
            "(resume with the same options, or pass --override to train with the new ones):\n  " + "\n  ".join(diffs)
        )
    return diffs


def restore(path, model, optimizer, scheduler, override):
    """Load the checkpoint into model / optimizer / scheduler. With --override the param groups keep this run's
    hyperparameters (load_state_dict would bring back the checkpoint's) and the schedule restarts from this
    run's peak lr at the checkpoint's step."""
    inner = optimizer if hasattr(optimizer, "param_groups") else optimizer.optimizer  # layer-wise wrapper
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    if ckpt.is_sharded(path):
        from . import dcp_checkpoint

        state = dcp_checkpoint.load(path, model, optimizer)
    else:
        state = ckpt.load(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if override:
        for group, options in zip(inner.param_groups, fresh):
            group.update(options)
        scheduler.base_lrs = [g["initial_lr"] for g in inner.param_groups]
        lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(inner.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
    return state


# ---------------------------------------------------------------- main


def prepare_run(argv):
    """Parse and check everything that does not need the data: bad input fails here, in seconds."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = explicit_dests(parser, argv)
    try:
        config = load_config(args.model)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_name = opts.resolve(args, explicit, config, world)
    fsdp.check_launch(args)
    opts.check_optimizer(args, config)
    opts.check_data(args)
    return args, config, model_name


def start_output_dir(args, rank):
    opts.check_output_dir(args)
    for stale in ckpt.remove_stale_tmp(args.output_dir):
        say(rank, f"removed {stale} (left by an interrupted run)")


def start_output(args, rank):
    """(resume path, its checksum-file contents, overridden option lines) after checking the output directory."""
    start_output_dir(args, rank)
    path, meta = find_resume(args, rank)
    return path, meta, check_resume_options(args, path, meta) if path else []


@entry_point(opts.PROG)
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, config, model_name = prepare_run(argv)
    except UsageError:
        if int(os.environ.get("RANK", "0")) != 0:  # every rank finds the same mistake: rank 0 alone reports it
            raise SystemExit(USAGE_EXIT) from None
        raise
    rank, world, device = setup_distributed(args)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.fsdp:  # rank 0 reads the output directory and checkpoints once; every rank gets its verdict
        resume_path, meta, overridden = fsdp.rank0_decides(lambda: start_output(args, rank), rank)
    else:
        if rank == 0:
            start_output_dir(args, rank)
        resume_path, meta = find_resume(args, rank)
        overridden = check_resume_options(args, resume_path, meta) if resume_path else []
    global_batch = args.batch_size * args.grad_accum * world
    tokens_per_step = global_batch * args.seq_len

    random.seed(args.seed)
    np.random.seed(args.seed)
    try:
        corpus, tok, train_blocks, val_blocks, timings = prepare_data(
            args, config, args.max_steps * tokens_per_step, rank, world
        )
    except (ValueError, KeyError, OSError) as e:  # a corpus too small, a missing --text-field, an unreadable file
        raise UsageError(f"--data {args.data}: {str(e).strip(chr(34) + chr(39))}") from None
    model = build_model(config, args.seed).to(device)
    if args.fsdp:
        ddp_model = model = fsdp.shard_model(model, device, world)
    else:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = build_optimizer(args.optimizer, model, args)
    scheduler = make_scheduler(optimizer, args.max_steps, args)
    if args.layerwise:  # from here on `optimizer` is the wrapper; its state_dict holds the inner one's
        optimizer = attach_layerwise(optimizer, args)

    step, data_pos, train_time, evals = 0, 0, 0.0, []
    if resume_path:
        state = restore(resume_path, model, optimizer, scheduler, bool(overridden))
        step, data_pos, evals = state["step"], state["data_pos"], state["evals"]
        train_time = state["train_time"]
    log_path = os.path.join(args.output_dir, "log.jsonl")
    if rank == 0 and resume_path:
        dropped = ckpt.truncate_log(log_path, step)
        if dropped:
            say(rank, f"dropped {dropped} log entries past step {step} from {log_path}")
    log = open(log_path, "a" if resume_path else "w") if rank == 0 else None
    try:
        run = Loop(args, device, rank, world, ddp_model, model, optimizer, scheduler, train_blocks, val_blocks, log)
        run.step, run.data_pos, run.train_time, run.evals = step, data_pos, train_time, evals
        run.train(corpus)
    finally:
        if log is not None:
            log.close()

    run_tokens, run_time = (run.step - step) * tokens_per_step, run.train_time - train_time
    if args.fsdp:
        memory = fsdp.memory_summary(optimizer, peak_memory_bytes(device), world)
    else:
        memory = {"state_bytes": state_bytes(optimizer), "peak_mem_bytes": peak_memory_bytes(device)}
    summary = {
        "eval_loss": run.evals[-1]["eval_loss"],
        "eval_ppl": run.evals[-1]["eval_ppl"],
        "evals": run.evals,
        "final_train_loss": run.loss_value,
        "steps": run.step,
        "tokens": run.step * tokens_per_step,
        "tokens_per_s": run_tokens / run_time if run_tokens and run_time else None,
        "train_time_s": run.train_time,
        **memory,
        "num_params": sum(p.numel() for p in model.parameters()),  # (a DTensor's numel is the whole weight's)
        "model": model_name,
        "config": json.loads(config.to_json_string()),
        "optimizer": optimizer_options(args.optimizer, args),
        "recipe": args.recipe,
        "recipe_applied": args.recipe_applied,
        "layerwise": args.layerwise,
        "corpus": corpus.describe(),
        "corpus_hash": corpus.hash,
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "id": tok.id},
        "data": {"train_blocks": len(train_blocks), "val_blocks": len(val_blocks), **timings},
        "world_size": world,
        "global_batch": global_batch,
        "seq_len": args.seq_len,
        "device": str(device),
        "dtype": args.dtype,
        "seed": args.seed,
        "resumed_from": resume_path,
        "overridden": overridden,
        "versions": versions(),
        "args": vars(args),
    }
    if rank == 0:
        path = os.path.join(args.output_dir, "summary.json")
        ckpt.write_json(path, summary)
        tps = summary["tokens_per_s"]
        print(
            f"summary: {path}\neval loss {summary['eval_loss']:.4f}, ppl {summary['eval_ppl']:.2f}; "
            f"{'-' if tps is None else format(tps, ',.0f')} tokens/s; optimizer state "
            f"{summary['state_bytes'] / 2**20:.2f} MiB ({summary['state_bytes']:,} bytes)",
            flush=True,
        )
    return summary


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    leave_process_group()
