"""LLaMA pretraining benchmark: `python -m benchmarks.pretrain --model llama_60m --optimizer galore`.

Single process or `torchrun --nproc_per_node N -m benchmarks.pretrain ...` (gloo on CPU, nccl on CUDA).
--batch-size is per device; a step consumes batch_size * grad_accum * world_size blocks of --seq-len tokens.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import random
import resource
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from . import data as D
from .model import build_model, load_config
from .optimizers import add_optimizer_args, build_optimizer, optimizer_class, optimizer_options, state_bytes


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrain", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama_tiny", help="config name in benchmarks/configs or a JSON path")
    p.add_argument("--data", default="stdlib", help="stdlib | a text/.jsonl file or directory | hf:NAME[:CONFIG]")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl / hf records")
    p.add_argument("--val-fraction", type=float, default=0.05, help="documents held out, chosen by key hash")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer name; default: byte-level BPE trained on --data")
    p.add_argument("--tokenizer-train-mb", type=float, default=16,
                   help="cap on training text fed to BPE training (keeps it minutes on 2 CPU cores)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "lowrank_optim"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="per-device micro batch, in sequences")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="default 1000 unless --max-tokens is given")
    p.add_argument("--max-tokens", type=int, default=None, help="train tokens; sets --max-steps")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm; 0 disables")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="bf16 = bf16 autocast (fp32 master weights); default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evals (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=16, help="fixed validation set: this many global batches")
    p.add_argument("--log-every", type=int, default=10, help="print a line every N steps when tqdm is off")
    p.add_argument("--output-dir", default=None, help="default runs/<model>-<optimizer>-seed<seed>")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="keep only the newest N checkpoints")
    p.add_argument("--resume", default=None, help="checkpoint file, or 'auto' for the newest in --output-dir")
    p.add_argument("--layerwise", action="store_true",
                   help="update each weight inside backward (lowrank_optim optimizers only; no DDP)")
    add_optimizer_args(p)
    return p


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
        optimizer, lambda s: cosine_with_min_lr(s, warmup, total_steps, args.min_lr_ratio))


def attach_layerwise(optimizer, args):
    """--layerwise hook point: wrap the built optimizer in lowrank_optim's LayerwiseOptimizer, which updates each
    weight from a post-accumulate-grad hook inside backward and frees its gradient at once. The loop then skips
    optimizer.step() and steps the scheduler at accumulation boundaries; --grad-clip becomes per-parameter."""
    try:
        from lowrank_optim.layerwise import LayerwiseOptimizer
    except ImportError as e:
        raise ImportError(f"--layerwise needs lowrank_optim.layerwise, which could not be imported: {e}") from e
    return LayerwiseOptimizer(optimizer, accumulation_steps=args.grad_accum,
                              clip_grad_norm=args.grad_clip if args.grad_clip > 0 else None)


# ---------------------------------------------------------------- distributed / data


def setup_distributed(args):
    """(rank, world_size, device) from torchrun's env vars; one process when WORLD_SIZE is unset."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def _barrier(world):
    if world > 1:
        dist.barrier()


def prepare_data(args, config, total_tokens, rank, world):
    """Corpus -> tokenizer -> cached token streams -> packed blocks. Rank 0 builds the caches first."""
    t0 = time.time()
    corpus = D.load_corpus(args.data, args.text_field, args.val_fraction,
                           max_chars=8 * total_tokens if args.data.startswith("hf:") else None)
    timings = {"corpus_s": time.time() - t0}
    for turn in (0, 1):  # rank 0 trains the tokenizer / tokenizes, then the others read its cache
        if (rank == 0) == (turn == 0):
            t0 = time.time()
            tok = D.hf_tokenizer(args.tokenizer) if args.tokenizer else \
                D.train_bpe(corpus, config.vocab_size, args.cache_dir, args.tokenizer_train_mb)
            timings["tokenizer_s"] = time.time() - t0
            t0 = time.time()
            train, val = D.tokenize_cached(corpus, tok, args.cache_dir)
            timings["tokenize_s"] = time.time() - t0
        _barrier(world)
    if tok.vocab_size > config.vocab_size:  # e.g. an HF tokenizer larger than the config's 32000
        config.vocab_size = tok.vocab_size
    return corpus, tok, D.pack(train, args.seq_len), D.pack(val, args.seq_len), timings


# ---------------------------------------------------------------- checkpoints


def _checkpoints(output_dir):
    return sorted(glob.glob(os.path.join(output_dir, "checkpoints", "step_*.pt")))


def save_checkpoint(args, step, data_pos, model, optimizer, scheduler, extra):
    path = os.path.join(args.output_dir, "checkpoints", f"step_{step:08d}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {"step": step, "data_pos": data_pos, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "args": vars(args),
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, **extra}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save never leaves a truncated checkpoint behind
    for old in _checkpoints(args.output_dir)[:-args.keep_checkpoints]:
        os.remove(old)
    return path


def load_checkpoint(path, model, optimizer, scheduler):
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file; holds projector objects
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def resolve_resume(args):
    if args.resume != "auto":
        return args.resume
    found = _checkpoints(args.output_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------- train / eval


def autocast(device, dtype):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, val_blocks, args, device, rank, world):
    """Mean token loss over the first eval_batches global batches of validation blocks, split across ranks
    (the set depends on the global batch only, so N ranks evaluate what 1 process with N x batch does)."""
    was_training = model.training
    model.eval()
    n = min(len(val_blocks), args.eval_batches * args.batch_size * world)
    mine = val_blocks[:n][rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(mine), args.batch_size):
        x = mine[i:i + args.batch_size].to(device)
        with autocast(device, args.dtype):
            loss = model(input_ids=x, labels=x).loss
        total += torch.tensor([loss.item() * len(x), len(x)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


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


def main(argv=None):
    args = build_parser().parse_args(argv)
    rank, world, device = setup_distributed(args)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    model_name = os.path.splitext(os.path.basename(args.model))[0]
    args.output_dir = args.output_dir or os.path.join("runs", f"{model_name}-{args.optimizer}-seed{args.seed}")
    global_batch = args.batch_size * args.grad_accum * world
    tokens_per_step = global_batch * args.seq_len
    if args.max_tokens is not None:
        args.max_steps = math.ceil(args.max_tokens / tokens_per_step)
    args.max_steps = 1000 if args.max_steps is None else args.max_steps
    if args.layerwise and world > 1:
        raise ValueError("--layerwise updates weights inside backward, before DDP could average the gradients")
    optimizer_class(args.optimizer)  # fail before data preparation if the optimizer cannot be imported

    random.seed(args.seed)
    np.random.seed(args.seed)
    config = load_config(args.model)
    corpus, tok, train_blocks, val_blocks, timings = prepare_data(
        args, config, args.max_steps * tokens_per_step, rank, world)
    model = build_model(config, args.seed).to(device)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = build_optimizer(args.optimizer, model, args)
    scheduler = make_scheduler(optimizer, args.max_steps, args)
    if args.layerwise:  # from here on `optimizer` is the wrapper; its state_dict holds the inner one's
        optimizer = attach_layerwise(optimizer, args)

    step, data_pos, train_time, evals = 0, 0, 0.0, []
    resume_path = resolve_resume(args) if args.resume else None
    if resume_path:
        state = load_checkpoint(resume_path, model, optimizer, scheduler)
        step, data_pos, evals = state["step"], state["data_pos"], state.get("evals", [])
        train_time = state.get("train_time", 0.0)
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
    log = open(os.path.join(args.output_dir, "log.jsonl"), "a" if resume_path else "w") if rank == 0 else None
    sampler = D.BlockSampler(len(train_blocks), args.seed)

    def record(entry):
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    def run_eval():
        loss = evaluate(model, val_blocks, args, device, rank, world)
        evals.append({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))})
        record(evals[-1])
        if rank == 0:
            print(f"step {step}: eval_loss {loss:.4f} ppl {evals[-1]['eval_ppl']:.2f}", file=sys.stderr, flush=True)

    from tqdm.auto import tqdm

    show_bar = rank == 0 and sys.stderr.isatty()
    bar = tqdm(total=args.max_steps, initial=step, disable=not show_bar, unit="step", dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_step, start_time, loss_value = step, train_time, float("nan")  # (train_time counts resumed-from runs)
    while step < args.max_steps:
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            # this rank's shard of the global batch: a fixed slice, so N ranks == 1 process with N x batch
            first = data_pos + (micro * world + rank) * args.batch_size
            x = train_blocks[sampler.indices(first, args.batch_size)].to(device)
            sync = contextlib.nullcontext() if world == 1 or micro == args.grad_accum - 1 else ddp_model.no_sync()
            with sync:
                with autocast(device, args.dtype):
                    loss = ddp_model(input_ids=x, labels=x).loss / args.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = None
        if not args.layerwise:  # (layer-wise: the weights were already updated inside the last backward)
            if args.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
            optimizer.step()
        with warnings.catch_warnings():  # layer-wise updates bypass optimizer.step(), which the scheduler watches
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        loss_value = loss_sum.item()  # also synchronises CUDA, so the step time below is real
        step, data_pos = step + 1, data_pos + global_batch
        dt = time.time() - t0
        train_time += dt
        lr = scheduler.get_last_lr()[0]
        record({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / dt, "step_s": dt})
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
        bar.update(1)
        if not show_bar and rank == 0 and args.log_every and step % args.log_every == 0:
            eta = (args.max_steps - step) * (train_time - start_time) / (step - start_step)
            print(f"step {step}/{args.max_steps} loss {loss_value:.4f} {tokens_per_step / dt:,.0f} tok/s "
                  f"eta {eta:.0f}s", file=sys.stderr, flush=True)
        if args.eval_every and step % args.eval_every == 0:
            run_eval()
        if args.save_every and step % args.save_every == 0:
            if rank == 0:
                save_checkpoint(args, step, data_pos, model, optimizer, scheduler,
                                {"evals": evals, "train_time": train_time, "corpus_hash": corpus.hash})
            _barrier(world)
    bar.close()
    if not evals or evals[-1]["step"] != step:
        run_eval()

    run_tokens, run_time = (step - start_step) * tokens_per_step, train_time - start_time
    summary = {
        "eval_loss": evals[-1]["eval_loss"], "eval_ppl": evals[-1]["eval_ppl"], "evals": evals,
        "final_train_loss": loss_value, "steps": step, "tokens": step * tokens_per_step,
        "tokens_per_s": run_tokens / run_time if run_tokens and run_time else None,
        "train_time_s": train_time, "state_bytes": state_bytes(optimizer), "peak_mem_bytes": peak_memory_bytes(device),
        "num_params": sum(p.numel() for p in model.parameters()), "model": model_name,
        "config": json.loads(config.to_json_string()), "optimizer": optimizer_options(args.optimizer, args),
        "layerwise": args.layerwise, "corpus": corpus.describe(), "corpus_hash": corpus.hash,
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "id": tok.id},
        "data": {"train_blocks": len(train_blocks), "val_blocks": len(val_blocks), **timings},
        "world_size": world, "global_batch": global_batch, "seq_len": args.seq_len, "device": str(device),
        "dtype": args.dtype, "seed": args.seed, "resumed_from": resume_path, "versions": versions(),
        "args": vars(args),
    }
    if rank == 0:
        log.close()
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return summary


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
