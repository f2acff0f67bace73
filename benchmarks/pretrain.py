"""LLaMA pretraining benchmark: `python -m benchmarks.pretrain --model llama_60m --optimizer galore`.

Single process or `torchrun --nproc_per_node N -m benchmarks.pretrain ...` (gloo on CPU, nccl on CUDA).
--batch-size is per device; a step consumes batch_size * grad_accum * world_size blocks of --seq-len tokens.
"""
import contextlib
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

from . import checkpoint as ckpt
from . import data as D
from . import run_options as opts
from .cli import TrainingDiverged, UsageError, entry_point, explicit_dests
from .model import build_model, load_config
from .optimizers import build_optimizer, optimizer_options, state_bytes


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


# ---------------------------------------------------------------- resume


def say(rank, message):
    if rank == 0:
        print(f"[pretrain] {message}", file=sys.stderr, flush=True)


def find_resume(args, rank):
    """(checkpoint path, its checksum-file contents) to resume from, or (None, None) to start fresh."""
    if not args.resume:
        return None, None
    if args.resume != "auto":
        meta, why = ckpt.verify(args.resume)
        if meta is None:
            raise UsageError(f"--resume {args.resume}: not an intact checkpoint: {why}")
        say(rank, f"resuming from {args.resume} (step {meta['step']})")
        return args.resume, meta
    path, meta, skipped = ckpt.newest_intact(args.output_dir)
    for bad, why in skipped:
        say(rank, f"not resuming from {bad}: {why}")
    if path is None:
        say(rank, f"--resume auto: no intact checkpoint in {ckpt.checkpoint_dir(args.output_dir)}; starting fresh")
    else:
        say(rank, f"--resume auto: resuming from {path} (step {meta['step']})")
    return path, meta


def check_resume_options(args, path, meta):
    """The differences between this run's training options and the checkpoint's; refused unless --override."""
    diffs, structural = opts.option_differences(meta.get("args", {}), opts.training_options(args))
    if structural:
        raise UsageError(f"--resume {path}: the checkpoint's state was built for other values of "
                         f"{len(structural)} option(s), which not even --override can change (start a new run "
                         "in another --output-dir):\n  " + "\n  ".join(structural))
    if diffs and not args.override:
        raise UsageError(f"--resume {path}: {len(diffs)} training option(s) differ from the checkpoint's "
                         "(resume with the same options, or pass --override to train with the new ones):\n  "
                         + "\n  ".join(diffs))
    return diffs


def restore(path, model, optimizer, scheduler, override):
    """Load the checkpoint into model / optimizer / scheduler. With --override the param groups keep this run's
    hyperparameters (load_state_dict would bring back the checkpoint's) and the schedule restarts from this
    run's peak lr at the checkpoint's step."""
    inner = optimizer if hasattr(optimizer, "param_groups") else optimizer.optimizer  # layer-wise wrapper
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
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
    opts.check_optimizer(args, config)
    opts.check_data(args)
    return args, config, model_name


@entry_point(opts.PROG)
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, config, model_name = prepare_run(argv)
    rank, world, device = setup_distributed(args)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if rank == 0:
        opts.check_output_dir(args)
        for stale in ckpt.remove_stale_tmp(args.output_dir):
            say(rank, f"removed {stale} (left by an interrupted run)")
    resume_path, meta = find_resume(args, rank)
    overridden = check_resume_options(args, resume_path, meta) if resume_path else []
    global_batch = args.batch_size * args.grad_accum * world
    tokens_per_step = global_batch * args.seq_len

    random.seed(args.seed)
    np.random.seed(args.seed)
    try:
        corpus, tok, train_blocks, val_blocks, timings = prepare_data(
            args, config, args.max_steps * tokens_per_step, rank, world)
    except (ValueError, KeyError, OSError) as e:  # a corpus too small, a missing --text-field, an unreadable file
        raise UsageError(f"--data {args.data}: {str(e).strip(chr(34) + chr(39))}") from None
    model = build_model(config, args.seed).to(device)
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
    summary = {
        "eval_loss": run.evals[-1]["eval_loss"], "eval_ppl": run.evals[-1]["eval_ppl"], "evals": run.evals,
        "final_train_loss": run.loss_value, "steps": run.step, "tokens": run.step * tokens_per_step,
        "tokens_per_s": run_tokens / run_time if run_tokens and run_time else None,
        "train_time_s": run.train_time, "state_bytes": state_bytes(optimizer),
        "peak_mem_bytes": peak_memory_bytes(device),
        "num_params": sum(p.numel() for p in model.parameters()), "model": model_name,
        "config": json.loads(config.to_json_string()), "optimizer": optimizer_options(args.optimizer, args),
        "recipe": args.recipe, "recipe_applied": args.recipe_applied,
        "layerwise": args.layerwise, "corpus": corpus.describe(), "corpus_hash": corpus.hash,
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "id": tok.id},
        "data": {"train_blocks": len(train_blocks), "val_blocks": len(val_blocks), **timings},
        "world_size": world, "global_batch": global_batch, "seq_len": args.seq_len, "device": str(device),
        "dtype": args.dtype, "seed": args.seed, "resumed_from": resume_path, "overridden": overridden,
        "versions": versions(), "args": vars(args),
    }
    if rank == 0:
        path = os.path.join(args.output_dir, "summary.json")
        ckpt.write_json(path, summary)
        tps = summary["tokens_per_s"]
        print(f"summary: {path}\neval loss {summary['eval_loss']:.4f}, ppl {summary['eval_ppl']:.2f}; "
              f"{'-' if tps is None else format(tps, ',.0f')} tokens/s; optimizer state "
              f"{summary['state_bytes'] / 2 ** 20:.2f} MiB ({summary['state_bytes']:,} bytes)", flush=True)
    return summary


class Loop:
    """The training loop of one run, from (step, data_pos) to args.max_steps, with evals and checkpoints."""

    def __init__(self, args, device, rank, world, ddp_model, model, optimizer, scheduler, train_blocks, val_blocks,
                 log):
        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.ddp_model, self.model, self.optimizer, self.scheduler = ddp_model, model, optimizer, scheduler
        self.train_blocks, self.val_blocks, self.log = train_blocks, val_blocks, log
        self.global_batch = args.batch_size * args.grad_accum * world
        self.tokens_per_step = self.global_batch * args.seq_len
        self.sampler = D.BlockSampler(len(train_blocks), args.seed)
        self.step = self.data_pos = 0
        self.train_time, self.evals, self.loss_value = 0.0, [], float("nan")

    def record(self, entry):
        if self.log is not None:
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()

    def run_eval(self):
        loss = evaluate(self.model, self.val_blocks, self.args, self.device, self.rank, self.world)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"step {self.step}: eval loss is {loss}; the run stopped without a summary "
                                   "(try a lower --lr)")
        self.evals.append({"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))})
        self.record(self.evals[-1])
        say(self.rank, f"step {self.step}: eval_loss {loss:.4f} ppl {self.evals[-1]['eval_ppl']:.2f}")

    def forward_backward(self):
        """Loss of this step's global batch (mean over ranks), gradients accumulated."""
        args, world, rank = self.args, self.world, self.rank
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(args.grad_accum):
            # this rank's shard of the global batch: a fixed slice, so N ranks == 1 process with N x batch
            first = self.data_pos + (micro * world + rank) * args.batch_size
            x = self.train_blocks[self.sampler.indices(first, args.batch_size)].to(self.device)
            last = micro == args.grad_accum - 1
            sync = contextlib.nullcontext() if world == 1 or last else self.ddp_model.no_sync()
            with sync:
                with autocast(self.device, args.dtype):
                    loss = self.ddp_model(input_ids=x, labels=x).loss / args.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        return loss_sum.item()

    def train(self, corpus):
        from tqdm.auto import tqdm

        args, rank = self.args, self.rank
        show_bar = rank == 0 and sys.stderr.isatty()
        bar = tqdm(total=args.max_steps, initial=self.step, disable=not show_bar, unit="step", dynamic_ncols=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start_step, start_time = self.step, self.train_time  # (train_time counts resumed-from runs)
        while self.step < args.max_steps:
            t0 = time.time()
            self.loss_value = self.forward_backward()
            if not math.isfinite(self.loss_value):  # checked before the update reaches the weights
                self.record({"step": self.step + 1, "loss": self.loss_value, "diverged": True})
                raise TrainingDiverged(
                    f"step {self.step + 1}: training loss is {self.loss_value}; the run stopped without a summary "
                    "(try a lower --lr, --grad-clip 1.0 or --dtype fp32)")
            grad_norm = None
            if not args.layerwise:  # (layer-wise: the weights were already updated inside the last backward)
                if args.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip).item()
                self.optimizer.step()
            with warnings.catch_warnings():  # layer-wise updates bypass optimizer.step(), which the scheduler watches
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the step time below includes the update
            self.step, self.data_pos = self.step + 1, self.data_pos + self.global_batch
            dt = time.time() - t0
            self.train_time += dt
            tps = self.tokens_per_step / dt
            self.record({"step": self.step, "loss": self.loss_value, "lr": self.scheduler.get_last_lr()[0],
                         "grad_norm": grad_norm, "tokens": self.step * self.tokens_per_step, "tokens_per_s": tps,
                         "step_s": dt})
            bar.set_postfix(loss=f"{self.loss_value:.3f}", tok_s=f"{tps:,.0f}")
            bar.update(1)
            if not show_bar and rank == 0 and args.log_every and self.step % args.log_every == 0:
                eta = (args.max_steps - self.step) * (self.train_time - start_time) / (self.step - start_step)
                print(f"step {self.step}/{args.max_steps} loss {self.loss_value:.4f} {tps:,.0f} tok/s "
                      f"eta {eta:.0f}s", file=sys.stderr, flush=True)
            if args.eval_every and self.step % args.eval_every == 0:
                self.run_eval()
            if args.save_every and self.step % args.save_every == 0:
                self.save(corpus)
        bar.close()
        if not self.evals or self.evals[-1]["step"] != self.step:
            self.run_eval()

    def save(self, corpus):
        if self.rank == 0:
            payload = {"data_pos": self.data_pos, "model": self.model.state_dict(),
                       "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                       "args": opts.training_options(self.args), "evals": self.evals, "train_time": self.train_time,
                       "corpus_hash": corpus.hash}
            ckpt.save(self.args.output_dir, self.step, payload, opts.training_options(self.args),
                      self.args.keep_checkpoints)
        _barrier(self.world)


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
