"""The training loop of benchmarks.pretrain: steps, evals, checkpoints, and the stop on a non-finite loss."""

import contextlib
import json
import math
import sys
import time
import warnings

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import data as D
from . import fsdp
from . import run_options as opts
from .cli import TrainingDiverged


def say(rank, message):
    if rank == 0:
        print(f"[pretrain] {message}", file=sys.stderr, flush=True)


def _barrier(world):
    if world > 1:
        dist.barrier()


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
    batches = [(mine[i : i + args.batch_size], 1.0) for i in range(0, len(mine), args.batch_size)]
    if args.fsdp:  # every forward gathers weights from all ranks: a rank with fewer blocks runs weightless ones
        blocks_of_rank0 = -(-n // world)
        most = -(-blocks_of_rank0 // args.batch_size)
        batches += [(val_blocks[:1], 0.0)] * (most - len(batches))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, weight in batches:
        x = x.to(device)
        with autocast(device, args.dtype):
            loss = model(input_ids=x, labels=x).loss
        total += torch.tensor([loss.item() * len(x), len(x)], dtype=torch.float64, device=device) * weight
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


class Loop:
    """The training loop of one run, from (step, data_pos) to args.max_steps, with evals and checkpoints."""

    def __init__(
        self, args, device, rank, world, ddp_model, model, optimizer, scheduler, train_blocks, val_blocks, log
    ):
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
            raise TrainingDiverged(
                f"step {self.step}: eval loss is {loss}; the run stopped without a summary (try a lower --lr)"
            )
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
            if args.fsdp:  # FSDP2 keeps unsharded gradients until the last micro batch, then reduce-scatters
                self.ddp_model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if world == 1 or last or args.fsdp else self.ddp_model.no_sync()
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
                    "(try a lower --lr, --grad-clip 1.0 or --dtype fp32)"
                )
            grad_norm = None
            if not args.layerwise:  # (layer-wise: the weights were already updated inside the last backward)
                if args.grad_clip > 0:
                    total_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
                    grad_norm = fsdp.scalar(total_norm)  # (a replicated DTensor under --fsdp)
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
            self.record(
                {
                    "step": self.step,
                    "loss": self.loss_value,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens": self.step * self.tokens_per_step,
                    "tokens_per_s": tps,
                    "step_s": dt,
                }
            )
            bar.set_postfix(loss=f"{self.loss_value:.3f}", tok_s=f"{tps:,.0f}")
            bar.update(1)
            if not show_bar and rank == 0 and args.log_every and self.step % args.log_every == 0:
                eta = (args.max_steps - self.step) * (self.train_time - start_time) / (self.step - start_step)
                print(
                    f"step {self.step}/{args.max_steps} loss {self.loss_value:.4f} {tps:,.0f} tok/s eta {eta:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
            if args.eval_every and self.step % args.eval_every == 0:
                self.run_eval()
            if args.save_every and self.step % args.save_every == 0:
                self.save(corpus)
        bar.close()
        if not self.evals or self.evals[-1]["step"] != self.step:
            self.run_eval()

    def save(self, corpus):
        payload = {  # (data_pos counts samples of the global order: it does not depend on the world size)
            "data_pos": self.data_pos,
            "scheduler": self.scheduler.state_dict(),
            "args": opts.training_options(self.args),
            "evals": self.evals,
            "train_time": self.train_time,
            "corpus_hash": corpus.hash,
        }
        if self.args.fsdp:  # every rank writes its shards
            from . import dcp_checkpoint

            args = self.args
            dcp_checkpoint.save(
                args.output_dir,
                self.step,
                self.model,
                self.optimizer,
                payload,
                opts.training_options(args),
                args.keep_checkpoints,
                self.rank,
                self.world,
            )
            return
        if self.rank == 0:
            payload.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
            ckpt.save(
                self.args.output_dir, self.step, payload, opts.training_options(self.args), self.args.keep_checkpoints
            )
        _barrier(self.world)
