"""One torchrun launch of the distributed-checkpoint tests (``test_fsdp_checkpoint.py``).

Every optimizer trains its own tower of a tiny model (two Linear layers each), sharded by FSDP2 (``fully_shard`` per
layer and on the root; gloo, CPU; the same global batch split over the ranks), all in one checkpoint, with the
standard recipe:

    state = {"model": get_model_state_dict(model), "optim.NAME": get_optimizer_state_dict(model, opt_NAME), ...}
    dcp.save(state, checkpoint_id=...)
    # resume: fresh model and optimizers, the same template (torch creates a fresh optimizer's state by one step at
    # lr 0 with zero gradients), dcp.load(state, ...), set_model_state_dict, set_optimizer_state_dict

``--save``: train to step K, save a distributed checkpoint (``--full``: and a full state dict, rank 0,
``torch.save``), go on to step N (the never-stopped run). Fresh models and optimizers then train K..N from a
checkpoint: ``--resume`` this launch's own (same world), ``--load-from W`` world W's (resharded by DCP),
``--load-full-from W`` world W's full state dict, read by every rank and loaded with plain ``load_state_dict`` (each
rank keeps its rows).

Rank 0 writes ``OUT/w{world}.pt``: final weights per scenario, the optimizer state saved at step K and the state
right after each load (full tensors, and how each entry was held: type, dtype, placements, shape)."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import lowrank_optim as lo
from benchmarks.cli import leave_process_group

K, N = 3, 5  # checkpoint after step K, compare at step N
GAP = 2  # bases refresh at steps 0, 2 (before the checkpoint) and 4 (after it); step 3 steps on a loaded basis
GLOBAL_BATCH = 12  # split evenly over 1, 2, 3 or 4 ranks
RANK = 4

# name -> (registry name, options): every optimizer, GaLore with every projector, an adaptive gap
CONFIGS = {
    "galore": ("galore", {}),
    "galore_rsvd": ("galore", {"projector": "rsvd"}),
    "galore_random": ("galore", {"projector": "random"}),
    "galore_dct": ("galore", {"projector": "dct"}),
    "galore_columns": ("galore", {"projector": "columns"}),
    "galore_adaptive_gap": ("galore", {"adaptive_gap": True, "gap_overlap": 0.0}),  # gap 2, then 4: none at step 4
    "galore8bit": ("galore8bit", {"min_8bit_size": 16}),
    "galore_adafactor": ("galore_adafactor", {"lr": None}),
    "fira": ("fira", {}),
    "frugal": ("frugal", {}),
    "dct": ("dct", {}),
    "sst": ("sst", {"sst_round": 2}),  # the factors' re-SVD at the third draw, after the checkpoint
    "apollo": ("apollo", {}),
    "apollo_mini": ("apollo_mini", {}),
    "adamw": ("adamw", {}),
}


class Towers(torch.nn.Module):
    """One tower per optimizer (two Linear layers each: the (24, 16) weight projects its right side, the (8, 24) one
    its left side); independent, so each tower's gradient is that of its own loss."""

    def __init__(self):
        super().__init__()
        self.towers = torch.nn.ModuleDict(
            {
                name: torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))
                for name in CONFIGS
            }
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(torch.nn.functional.mse_loss(tower(x), y) for tower in self.towers.values())


def build_model(mesh=None) -> Towers:
    """The same initial weights on every rank and in one process; each Linear and the root sharded on ``mesh``."""
    torch.manual_seed(0)
    model = Towers()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for tower in model.towers.values():
            for layer in tower:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def build_optimizer(name: str, tower: torch.nn.Module):
    method, options = CONFIGS[name]
    cls = lo.method(method).optimizer_class
    options = {"lr": 1e-2, **options}
    if method == "adamw":
        return cls(tower.parameters(), **options)
    weights = [p for n, p in tower.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in tower.named_parameters() if n.endswith("bias")]
    rank = 1 if method == "apollo_mini" else RANK
    return cls([dict(params=weights, rank=rank, update_proj_gap=GAP), dict(params=biases)], **options)


def build_optimizers(model) -> dict:
    return {name: build_optimizer(name, model.towers[name]) for name in CONFIGS}


def batch(step: int, rank: int = 0, world: int = 1):
    """This rank's share of the step's global batch."""
    gen = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 16, generator=gen), torch.randn(GLOBAL_BATCH, 8, generator=gen)
    start, stop = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
    return x[start:stop], y[start:stop]


def train(model, opts: dict, start: int, stop: int, rank: int = 0, world: int = 1) -> None:
    for step in range(start, stop):
        model(*batch(step, rank, world)).backward()  # FSDP2 averages the ranks' gradients
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)


def full_weights(model) -> dict:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()
    }


def state_record(opts: dict, model) -> dict:
    """name -> parameter name -> key -> {"held": (type, dtype, placements, shape), "value": full value}."""
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for name, opt in opts.items():
        for p, st in opt.state.items():
            entries = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    held = (type(v).__name__, str(v.dtype), str(getattr(v, "placements", None)), tuple(v.shape))
                    value = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                else:
                    held, value = (type(v).__name__, None, None, None), v
                entries[k] = {"held": held, "value": value}
            out.setdefault(name, {})[names[p]] = entries
    return out


def main() -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", action="store_true", help="train to K, save (DCP), go on to N")
    parser.add_argument("--full", action="store_true", help="with --save: a full state dict too")
    parser.add_argument("--resume", action="store_true", help="load this launch's own checkpoint (same world)")
    parser.add_argument("--load-from", type=int, action="append", default=[], help="load world W's checkpoint")
    parser.add_argument("--load-full-from", type=int, action="append", default=[], help="W's full state dict")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = {"world": world, "final": {}, "saved_state": {}, "loaded_state": {}}

    def state_of(model, opts) -> dict:
        out = {"model": get_model_state_dict(model)}
        out.update({f"optim.{name}": get_optimizer_state_dict(model, opt) for name, opt in opts.items()})
        return out

    def resume(scenario: str, checkpoint: str = None, full: str = None) -> None:
        model = build_model(mesh)
        opts = build_optimizers(model)
        if checkpoint is not None:
            state = state_of(model, opts)  # the template: each optimizer's state created by one step at lr 0
            dcp.load(state, checkpoint_id=checkpoint)
            set_model_state_dict(model, state["model"])
            for name, opt in opts.items():
                set_optimizer_state_dict(model, opt, state[f"optim.{name}"])
        else:  # every rank reads the whole file; each optimizer keeps its rows of every state tensor
            whole = torch.load(full, weights_only=True)
            set_model_state_dict(model, whole["model"], options=StateDictOptions(full_state_dict=True))
            for name, opt in opts.items():
                opt.load_state_dict(whole[name])
        results["loaded_state"][scenario] = state_record(opts, model)
        train(model, opts, K, N, rank, world)
        results["final"][scenario] = full_weights(model)

    if args.save:
        model = build_model(mesh)
        opts = build_optimizers(model)
        train(model, opts, 0, K, rank, world)
        dcp.save(state_of(model, opts), checkpoint_id=os.path.join(args.out, f"dcp_w{world}"))
        results["saved_state"] = state_record(opts, model)
        if args.full:
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 holds it
            whole = {"model": get_model_state_dict(model, options=full)}
            whole.update({name: get_optimizer_state_dict(model, opt, options=full) for name, opt in opts.items()})
            if rank == 0:
                torch.save(whole, os.path.join(args.out, f"full_w{world}.pt"))
        train(model, opts, K, N, rank, world)
        results["final"]["never_stopped"] = full_weights(model)
    if args.resume:
        resume("same_world", checkpoint=os.path.join(args.out, f"dcp_w{world}"))
    for source in args.load_from:
        resume(f"from_w{source}", checkpoint=os.path.join(args.out, f"dcp_w{source}"))
    for source in args.load_full_from:
        resume(f"full_from_w{source}", full=os.path.join(args.out, f"full_w{source}.pt"))
    if rank == 0:
        torch.save(results, os.path.join(args.out, f"w{world}.pt"))


if __name__ == "__main__":
    main()
    leave_process_group()
