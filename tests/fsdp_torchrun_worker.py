"""Run under torchrun (gloo, CPU) by ``test_fsdp_torchrun.py``: FSDP2 (``fully_shard`` per Linear and on the root)
training against single-process training of the same model on the same data; rank 0 writes the results as JSON.

    torchrun --standalone --nproc_per_node 2 tests/fsdp_torchrun_worker.py OUT.json refresh layerwise

Every rank also runs the single-process reference itself (the whole batch, plain parameters), so the comparison
needs no second launch. Collectives a basis refresh issues are recorded where they are issued: ``Spread.gather``,
``Spread.sum_`` and the owner's ``broadcast_result``, while ``refresh_all`` runs."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard

import lowrank_optim as lo
from benchmarks.cli import leave_process_group
from lowrank_optim import route, sharding
from lowrank_optim.layerwise import LayerwiseOptimizer

BATCH, RANK = 12, 4


def make_model():
    torch.manual_seed(0)
    # rows 41 / 13 / 5 shard unevenly over 2 and 3 ranks; 41 x 24 projects on the right, 13 x 41 and 5 x 13 left
    return torch.nn.Sequential(
        torch.nn.Linear(24, 41), torch.nn.Tanh(), torch.nn.Linear(41, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5)
    )


def groups(model, gap, **kw):
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return [dict(params=mats, rank=RANK, update_proj_gap=gap, **kw), dict(params=rest)]


def full(model):
    return [p.full_tensor() if sharding.is_sharded(p) else p.detach().clone() for p in model.parameters()]


def rel_err(a, b):
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))


class Recorder:
    """The collectives issued inside ``refresh_all``: one list of (op, shape) per call that had work."""

    def __init__(self):
        self.calls, self.current = [], None
        refresh_all, broadcast = route.refresh_all, route.broadcast_result
        gather, sum_ = sharding.Spread.gather, sharding.Spread.sum_

        def refresh_all_(opt, due):
            self.current = {"due": [list(it.base.shape) for it in due], "events": []}
            try:
                return refresh_all(opt, due)
            finally:
                if due:
                    self.calls.append(self.current)
                self.current = None

        def gather_(spread, rows, global_rows):
            self._log("gather", [global_rows, *rows.shape[1:]])
            return gather(spread, rows, global_rows)

        def sum__(spread, x):
            self._log("sum", list(x.shape))
            return sum_(spread, x)

        def broadcast_(spread, owner, result, error, device):
            self._log("broadcast", [])
            return broadcast(spread, owner, result, error, device)

        route.refresh_all, sharding.Spread.gather, sharding.Spread.sum_ = refresh_all_, gather_, sum__
        route.broadcast_result = broadcast_

    def _log(self, op, shape):
        if self.current is not None:
            self.current["events"].append([op, shape])


def batches(steps, world, rank):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(BATCH, 24, generator=gen), torch.randn(BATCH, 5, generator=gen)
        if world:  # this rank's share of the batch; FSDP averages the gradients over ranks
            n = BATCH // world
            x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        yield x, y


def train(cls, kw, world, rank, steps, gap, recorder=None, layerwise=None, nosync=False, seen=None, reshard=True):
    """Final weights (whole) after ``steps`` micro-batches; ``layerwise``: LayerwiseOptimizer keywords; ``nosync``:
    FSDP skips the reduce-scatter on every other micro-batch (accumulation the FSDP way); ``reshard``: FSDP's
    ``reshard_after_forward``."""
    model = make_model()
    if world:
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
    opt = cls(groups(model, gap), lr=1e-2, **kw)
    if seen is not None:  # registered before the layer-wise hooks, so it sees the gradient they step on
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda q: seen.append(_grad_layout(q)))
    lw = LayerwiseOptimizer(opt, **layerwise) if layerwise is not None else None
    micro = 2 if nosync or (layerwise or {}).get("accumulation_steps", 1) == 2 else 1
    if recorder is not None:
        recorder.calls.clear()
    for i, (x, y) in enumerate(batches(steps, world, rank)):
        if nosync:
            model.set_requires_gradient_sync(i % 2 == 1)
        (((model(x) - y) ** 2).mean() / micro).backward()
        if lw is None and (i + 1) % micro == 0:
            opt.step()
            opt.zero_grad()
    return full(model)


def _grad_layout(p):
    g = p.grad
    return {
        "param": type(p).__name__,
        "grad": type(g).__name__,
        "placements": [str(x) for x in getattr(g, "placements", ())],
        "local_rows_match": sharding.is_sharded(g) and tuple(g.to_local().shape) == tuple(p.to_local().shape),
    }


REFRESH_CASES = {
    "rsvd": (lo.GaLoreAdamW, dict(projector="rsvd")),
    "columns_norm": (lo.GaLoreAdamW, dict(projector="columns", select="norm")),
    "columns_norm_full": (lo.GaLoreAdamW, dict(projector="columns", select="norm", proj_type="full")),
    "dct": (lo.DCTAdamW, {}),
    "dct_l2_fft": (lo.DCTAdamW, dict(dct_norm="l2", dct_impl="fft")),
    "frugal": (lo.FrugalAdamW, {}),
    "svd": (lo.GaLoreAdamW, {}),  # the gathering path, for contrast
}

FEW_ROWS_CASES = {
    "rsvd": dict(projector="rsvd"),
    "columns_norm_full": dict(projector="columns", select="norm", proj_type="full"),
    "dct_right": dict(projector="dct", proj_type="right"),
    "svd": {},
}

LAYERWISE_CASES = {
    "galore": (lo.GaLoreAdamW, {}),  # new bases gathered, computed by an owner rank, broadcast
    "rsvd": (lo.GaLoreAdamW, dict(projector="rsvd")),  # new bases from each rank's rows
    "galore8bit": (lo.GaLoreAdamW8bit, dict(min_8bit_size=16)),  # the gathered view
}


def refresh_section(results, world, rank):
    recorder = Recorder()
    for name, (cls, kw) in REFRESH_CASES.items():  # 20 steps, refreshes at 0, 7, 14
        ref = train(cls, kw, 0, rank, 20, 7)
        got = train(cls, kw, world, rank, 20, 7, recorder=recorder)
        results["refresh"][name] = {"err": rel_err(got, ref), "calls": list(recorder.calls)}


def layerwise_section(results, world, rank):
    for name, (cls, kw) in LAYERWISE_CASES.items():  # 10 steps, refreshes at 0, 4, 8
        ref = train(cls, kw, 0, rank, 10, 4, layerwise={})
        seen = []
        got = train(cls, kw, world, rank, 10, 4, layerwise={}, seen=seen)
        plain = train(cls, kw, world, rank, 10, 4)
        results["layerwise"][name] = {"err": rel_err(got, ref), "err_vs_step": rel_err(got, plain), "seen": seen}
    cls, kw = LAYERWISE_CASES["galore"]
    two = dict(accumulation_steps=2)
    ref = train(cls, kw, 0, rank, 12, 2, layerwise=two)
    results["accumulation"] = {
        "reduce_every_micro_batch": rel_err(train(cls, kw, world, rank, 12, 2, layerwise=two), ref),
        "reduce_on_last_micro_batch": rel_err(train(cls, kw, world, rank, 12, 2, layerwise={}, nosync=True), ref),
    }
    ref = train(cls, kw, 0, rank, 10, 4, layerwise={})
    results["unsharded_between_forward_and_backward"] = rel_err(
        train(cls, kw, world, rank, 10, 4, layerwise={}, reshard=False), ref
    )
    clipped = dict(clip_grad_norm=0.05)
    ref = train(cls, kw, 0, rank, 10, 4, layerwise=clipped)
    results["clip"] = rel_err(train(cls, kw, world, rank, 10, 4, layerwise=clipped), ref)


def few_rows_section(results, world, rank):
    """A (2, 9) matrix over 3 ranks leaves one rank no rows (distributed by hand: FSDP2's padding aside, the same
    DTensor Shard(0) parameters); 6 steps, refreshes at 0, 2, 4."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    for name, kw in FEW_ROWS_CASES.items():
        torch.manual_seed(0)
        plain = [torch.nn.Parameter(torch.randn(2, 9)), torch.nn.Parameter(torch.randn(9, 2))]
        shards = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
        opts = [lo.GaLoreAdamW([dict(params=ps, rank=1, update_proj_gap=2, **kw)], lr=1e-2) for ps in (plain, shards)]
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p, q in zip(plain, shards):
                g = torch.randn(p.shape, generator=gen)
                p.grad, q.grad = g.clone(), distribute_tensor(g.clone(), mesh, [Shard(0)])
            for opt in opts:
                opt.step()
        rows = [None] * world
        dist.all_gather_object(rows, shards[0].to_local().shape[0])
        err = rel_err([q.full_tensor() for q in shards], [p.detach() for p in plain])
        results["few_rows"][name] = {"err": err, "rows_per_rank": rows}


def main(out, sections):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world": world, "refresh": {}, "layerwise": {}, "few_rows": {}}
    run = {"refresh": refresh_section, "layerwise": layerwise_section, "few_rows": few_rows_section}
    for section in sections:
        run[section](results, world, rank)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    leave_process_group()
