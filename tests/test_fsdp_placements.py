"""Sharded parameters in one process (a 1-rank gloo group): what is refused, and that Shard(0) DTensors train
exactly like plain tensors with their state kept as DTensor shards. Multi-rank runs: ``test_fsdp.py``."""

import pytest
import torch

import lowrank_optim as lo

pytestmark = pytest.mark.filterwarnings("ignore:.*trained densely")


def _dtensor(x, mesh, placement):
    from torch.distributed.tensor import distribute_tensor

    return torch.nn.Parameter(distribute_tensor(x, mesh, [placement]))


def test_tensor_parallel_and_replicated_placements_are_refused_naming_the_placement(mesh):
    from torch.distributed.tensor import Replicate, Shard

    for placement, name in ((Shard(1), "Shard(dim=1)"), (Replicate(), "Replicate()")):
        w = _dtensor(torch.randn(8, 4), mesh, placement)
        with pytest.raises(ValueError, match=r"param group 0: a DTensor parameter of shape \(8, 4\) with placements"):
            lo.GaLoreAdamW([{"params": [w], "rank": 2}])
        with pytest.raises(ValueError, match=name.replace("(", r"\(").replace(")", r"\)")):
            lo.FiraAdamW([{"params": [w], "rank": 2}])


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_flattened_parameters_are_refused(mesh, use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(torch.nn.Linear(8, 8), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    with pytest.raises(ValueError, match="param group 0: a parameter flattened by FSDP1 .*fully_shard"):
        lo.GaLoreAdamW([{"params": list(model.parameters()), "rank": 2}])


@pytest.mark.parametrize("name", ["galore", "fira", "galore8bit", "apollo", "adamw"])
def test_shard0_parameters_train_like_plain_ones_with_dtensor_state(mesh, name):
    from torch.distributed.tensor import DTensor, Shard

    cls = lo.method(name).optimizer_class
    torch.manual_seed(0)
    plain = [
        torch.nn.Parameter(torch.randn(12, 8)),
        torch.nn.Parameter(torch.randn(6, 16)),
        torch.nn.Parameter(torch.randn(8)),
    ]
    sharded = [_dtensor(p.detach().clone(), mesh, Shard(0)) for p in plain]

    def groups(ps):
        return [dict(params=ps[:2], rank=3, update_proj_gap=3), dict(params=ps[2:])] if name != "adamw" else ps

    kw = dict(min_8bit_size=16) if name == "galore8bit" else {}
    a, b = cls(groups(plain), lr=1e-2, **kw), cls(groups(sharded), lr=1e-2, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        for p, q in zip(plain, sharded):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g.clone()
            q.grad = _dtensor(g.clone(), mesh, Shard(0)).detach()
        a.step()
        b.step()
    for p, q in zip(plain, sharded):
        torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=1e-6, atol=1e-7)
    for p, q in zip(plain, sharded):
        for k, v in a.state[p].items():
            w = b.state[q][k]
            if isinstance(v, torch.Tensor) and v.dim():
                assert isinstance(w, DTensor) and w.placements == (Shard(0),), k
                torch.testing.assert_close(w.full_tensor(), v, rtol=1e-6, atol=1e-7)
            else:
                assert not isinstance(w, DTensor), k
    assert b.state_bytes() == a.state_bytes()


@pytest.mark.parametrize("version", ["2.4.1", "2.1.0+cu121"])
def test_layerwise_refuses_sharded_parameters_where_fsdp2_runs_no_hooks(mesh, monkeypatch, version):
    from torch.distributed.tensor import Shard

    from lowrank_optim.layerwise import LayerwiseOptimizer

    sharded = _dtensor(torch.randn(8, 4), mesh, Shard(0))
    plain = torch.nn.Parameter(torch.randn(8, 4))
    opt = lo.GaLoreAdamW([{"params": [plain], "rank": 2}, {"params": [sharded], "rank": 2}])
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(RuntimeError, match=r"param group 1 holds a DTensor parameter of shape \(8, 4\).*torch >= 2\.5"):
        LayerwiseOptimizer(opt)
    LayerwiseOptimizer(lo.GaLoreAdamW([{"params": [plain], "rank": 2}])).remove()  # plain parameters: hooks fire


def test_layerwise_takes_sharded_parameters_where_fsdp2_runs_hooks(mesh, monkeypatch):
    from torch.distributed.tensor import Shard

    from lowrank_optim.layerwise import LayerwiseOptimizer

    monkeypatch.setattr(torch, "__version__", "2.5.0")
    LayerwiseOptimizer(lo.GaLoreAdamW([_dtensor(torch.randn(8, 4), mesh, Shard(0))], rank=2)).remove()
