"""Worker for ``test_fsdp_memory.py``, one process per rank under ``torchrun --nproc_per_node W``: trains a tiny
model sharded with FSDP2 (``fully_shard`` per Linear and on the root) a few steps with each method, and writes this
rank's measured ``optimizer.state_bytes()`` and ``expected_state_bytes(world_size=W, rank=r)`` to
``<out>/rank<r>.json``, with the relative error of the trained weights against one process's run.

    torchrun --standalone --nproc_per_node 3 tests/fsdp_memory_worker.py OUT_DIR
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import lowrank_optim as lo
from benchmarks.cli import leave_process_group

# name -> (optimizer name, options, subspace rank); shapes below give uneven row splits and empty shards at 4 ranks
CASES = {
    "galore": ("galore", {}, 4),
    "galore_basis8": ("galore", {"basis_bits": 8}, 4),
    "galore_basis4": ("galore", {"basis_bits": 4}, 4),
    "fira": ("fira", {}, 4),
    "galore8bit": ("galore8bit", {"min_8bit_size": 16}, 4),
    "apollo_mini": ("apollo_mini", {}, 1),
    "frugal": ("frugal", {}, 4),
    "dct": ("dct", {}, 4),
    "sst": ("sst", {}, 4),
    "galore_adafactor": ("galore_adafactor", {"lr": None}, 4),
    "adamw": ("adamw", {}, None),
}
STEPS = 3  # with update_proj_gap 2: a first basis and a refresh


def model_fn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6)
    )


def optimizer_for(model, name, options, rank):
    cls = lo.method(name).optimizer_class
    kw = {"lr": 1e-2, **options}
    if rank is None:
        return cls(model.parameters(), **kw)
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return cls([dict(params=mats, rank=rank, update_proj_gap=2), dict(params=rest)], **kw)


def train(name, world, rank, sharded):
    """The model and optimizer after ``STEPS`` steps; sharded: each rank takes its 4 rows of the batch (FSDP2
    averages the gradients), else one process takes the whole batch."""
    model = model_fn()
    if sharded:
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m)
        fully_shard(model)
    opt = optimizer_for(model, *CASES[name])
    gen = torch.Generator().manual_seed(1)
    rows = slice(4 * rank, 4 * rank + 4) if sharded else slice(None)
    for _ in range(STEPS):
        x, y = torch.randn(4 * world, 24, generator=gen), torch.randn(4 * world, 6, generator=gen)
        loss = ((model(x[rows]) - y[rows]) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def run_case(name, world, rank):
    model, opt = train(name, world, rank, sharded=True)
    plain, _ = train(name, world, rank, sharded=False)
    err = max(
        float((p.full_tensor() - q.detach()).norm() / q.detach().norm())
        for p, q in zip(model.parameters(), plain.parameters())
    )
    return {
        "measured": opt.state_bytes(),
        "expected": opt.expected_state_bytes(world_size=world, rank=rank),
        "weights_rel_err": err,  # against one process: the sharded run trained the same model
    }


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trained densely" notes
        for name in CASES:
            results[name] = run_case(name, world, rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
    leave_process_group()
