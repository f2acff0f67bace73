"""Run under torchrun (gloo): every optimizer on a ``fully_shard`` model vs one process on the same global batch.

Writes JSON to the path in argv[1] (rank 0): per case the largest relative weight difference, the largest relative
difference of any gathered state tensor, whether every state tensor is a Shard(0) DTensor (0-dim ones plain), and the
state bytes of each rank against the single process's. Read by ``test_fsdp.py``."""

import json
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

import lowrank_optim as lo
from benchmarks.cli import leave_process_group

STEPS, GAP, RANK, BATCH = 20, 7, 4, 12
CASES = {
    "galore": ("galore", {}),
    "galore_rsvd": ("galore", dict(projector="rsvd")),
    "galore_power": ("galore", dict(projector="power")),
    "galore_random": ("galore", dict(projector="random")),
    "galore_dct": ("galore", dict(projector="dct")),
    "galore_columns": ("galore", dict(projector="columns")),
    "galore_rotate": ("galore", dict(subspace_change="rotate")),
    "galore_adaptive_gap": ("galore", dict(adaptive_gap=True, update_proj_gap=3)),
    "galore_basis_8bit": ("galore", dict(basis_bits=8)),
    "galore8bit": ("galore8bit", dict(min_8bit_size=16)),
    "galore_adafactor": ("galore_adafactor", dict(lr=None)),
    "fira": ("fira", {}),
    "fira_random": ("fira", dict(projector="random")),
    "frugal": ("frugal", {}),
    "frugal_blocks": ("frugal", dict(projector="blocks", density=0.5)),
    "dct": ("dct", {}),
    "sst": ("sst", {}),
    "apollo": ("apollo", {}),
    "apollo_mini": ("apollo_mini", {}),
    "adamw": ("adamw", {}),
    "adamw_unfused": ("adamw", dict(fused=False)),
}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 12), torch.nn.Tanh(),
        torch.nn.Linear(12, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3),
    )  # fmt: skip


def make_optimizer(model, name, kw):
    kw = dict(kw)
    cls = lo.method(name).optimizer_class
    lr = kw.pop("lr", 1e-2)
    if name == "adamw":
        return cls(model.parameters(), lr=lr, **kw)
    group = dict(update_proj_gap=kw.pop("update_proj_gap", GAP))
    group.update({"density": kw.pop("density")} if "density" in kw else {"rank": RANK})
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return cls([dict(params=mats, **group), dict(params=rest)], lr=lr, **kw)


def train(name, kw, world, rank, wrap="fsdp"):
    model = make_model()
    if world and wrap == "fsdp":
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m)
        fully_shard(model)
    elif world:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(model, name, kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, 24, generator=gen), torch.randn(BATCH, 3, generator=gen)
        if world:  # this rank's slice of the same global batch; FSDP averages the gradients
            n = BATCH // world
            x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main(out_path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    warnings.simplefilter("ignore")
    results = {}
    for case, (name, kw) in CASES.items():
        model, opt = train(name, kw, world, rank)
        weights = [p.full_tensor() for p in model.parameters()]
        layout_ok = True
        shard_bytes = 0
        states = []
        for p in model.parameters():
            full = {}
            for k, v in opt.state[p].items():
                if isinstance(v, torch.Tensor) and v.dim():
                    layout_ok &= isinstance(v, DTensor) and tuple(v.placements) == (Shard(0),)
                    shard_bytes += v.to_local().numel() * v.element_size()
                    full[k] = v.full_tensor()
                else:
                    layout_ok &= not isinstance(v, DTensor)
                    full[k] = v
            states.append(full)
        per_rank = [None] * world
        dist.all_gather_object(per_rank, (opt.state_bytes(), shard_bytes))
        if rank == 0:
            ref_model, ref_opt = train(name, kw, 0, 0)
            ref_params = list(ref_model.parameters())
            state_err, same_keys = 0.0, True
            single_shard_bytes = 0
            for p, full in zip(ref_params, states):
                ref_state = ref_opt.state[p]
                same_keys &= set(ref_state) == set(full)
                for k, v in ref_state.items():
                    if isinstance(v, torch.Tensor) and v.dim():
                        single_shard_bytes += v.numel() * v.element_size()
                        if v.is_floating_point():
                            state_err = max(state_err, rel(full[k], v))
                        else:
                            same_keys &= bool(torch.equal(full[k], v))
                    elif isinstance(v, torch.Tensor) and v.is_floating_point():
                        state_err = max(state_err, rel(full[k], v))
                    else:
                        same_keys &= full[k] == v
            results[case] = dict(
                weight_err=max(rel(a, b.detach()) for a, b in zip(weights, ref_params)),
                state_err=state_err,
                same_keys=bool(same_keys),
                layout_ok=bool(layout_ok),
                rank_bytes=[b for b, _ in per_rank],
                rank_shard_bytes=[s for _, s in per_rank],
                single_bytes=ref_opt.state_bytes(),
                single_shard_bytes=single_shard_bytes,
            )
        dist.barrier()
        ok = torch.tensor(float(layout_ok))
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if rank == 0:
            results[case]["layout_ok"] = bool(ok)
    for case in ("galore", "fira"):  # DDP: whole parameters on every rank, as before
        model, _ = train(case, {}, world, rank, wrap="ddp")
        if rank == 0:
            ref_model, _ = train(case, {}, 0, 0)
            pairs = zip(model.module.parameters(), ref_model.parameters())
            results["ddp_" + case] = dict(weight_err=max(rel(a.detach(), b.detach()) for a, b in pairs))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(world=world, results=results), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
    leave_process_group()
