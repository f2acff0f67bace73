"""Distributed checkpoints of FSDP2 training, every optimizer (``torch.distributed.checkpoint`` with
``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, the recipe that creates a fresh optimizer's state by one
step at lr 0 with zero gradients).

Three torchrun launches (gloo, CPU) of ``fsdp_checkpoint_worker.py`` run every optimizer at once, one tower each:
4 ranks save at step K and go on to N; 2 ranks do the same, resume from their own checkpoint and from the 4 ranks';
3 ranks resume from the 2 ranks' checkpoint and from their full state dict. The reference is always the run that
never stopped. A one-process optimizer continues from the full state dict here."""

import copy
import os

import pytest
import torch
from torchrun import launch

import lowrank_optim as lo

pytest.importorskip("torch.distributed.fsdp")
import fsdp_checkpoint_worker as worker  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = list(worker.CONFIGS)
# Resumed at another world size, the K..N steps reduce the gradient in another order: final weights within 1e-6
# relative (per tensor, Frobenius) of the run that never stopped. SST re-expresses W through an fp32 SVD of its
# factors at a re-SVD (one after the checkpoint here), whose backward error is ~1e-6 of W: two runs that never stop,
# on 2 and on 3 ranks, differ by up to 9e-7 there already.
RELATIVE = {name: 1e-6 for name in NAMES}
RELATIVE["sst"] = 1e-5


def _launch(world: int, out, *args: str) -> None:
    launch(world, [os.path.join(REPO, "tests", "fsdp_checkpoint_worker.py"), "--out", out, *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_checkpoint")
    _launch(4, out, "--save")
    _launch(2, out, "--save", "--full", "--resume", "--load-from", "4")
    _launch(3, out, "--load-from", "2", "--load-full-from", "2")
    results = {w: torch.load(out / f"w{w}.pt", weights_only=True) for w in (2, 3, 4)}
    return results, out


def _tower(weights: dict, name: str) -> dict:
    prefix = f"towers.{name}."
    out = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    assert out, name
    return out


def _assert_relative(got: dict, want: dict, tol: float, what: str) -> None:
    for k in want:
        err = ((got[k].double() - want[k].double()).norm() / want[k].double().norm()).item()
        assert err <= tol, f"{what}, {k}: relative error {err:.2e} > {tol:.0e}"


def test_resume_at_the_same_world_size_is_bitwise(runs):
    results, _ = runs
    final = results[2]["final"]
    for name in NAMES:
        got, want = _tower(final["same_world"], name), _tower(final["never_stopped"], name)
        for k in want:
            assert torch.equal(got[k], want[k]), f"{name}, {k}: max diff {(got[k] - want[k]).abs().max():.2e}"


@pytest.mark.parametrize(
    "saved, resumed, scenario",
    [(4, 2, "from_w4"), (2, 3, "from_w2"), (2, 3, "full_from_w2")],
    ids=["dcp 4->2", "dcp 2->3", "full state dict 2->3"],
)
def test_resume_at_another_world_size_continues_as_if_never_stopped(runs, saved, resumed, scenario):
    results, _ = runs
    for name in NAMES:
        got = _tower(results[resumed]["final"][scenario], name)
        want = _tower(results[saved]["final"]["never_stopped"], name)
        _assert_relative(got, want, RELATIVE[name], f"{name} ({scenario})")


@pytest.mark.parametrize(
    "saved, resumed, scenario",
    [(2, 2, "same_world"), (4, 2, "from_w4"), (2, 3, "from_w2"), (2, 3, "full_from_w2")],
    ids=["dcp 2->2", "dcp 4->2", "dcp 2->3", "full state dict 2->3"],
)
def test_loaded_state_is_the_saved_state_sharded_like_its_parameter(runs, saved, resumed, scenario):
    """Every entry comes back exactly (numbers as numbers of their type), each tensor with a dim a Shard(0) DTensor
    of the single-process shape in its saved dtype (int64 indices, uint8 codes), 0-dim tensors plain."""
    results, _ = runs
    saved_state, loaded_state = results[saved]["saved_state"], results[resumed]["loaded_state"][scenario]
    assert set(loaded_state) == set(NAMES)
    for name in NAMES:
        assert set(loaded_state[name]) == set(saved_state[name]), name
        for param, entries in saved_state[name].items():
            got = loaded_state[name][param]
            assert set(got) == set(entries), f"{name}, {param}: keys {sorted(set(got) ^ set(entries))}"
            for key, entry in entries.items():
                where = f"{name}, {param}, {key}"
                kind, dtype, placements, shape = got[key]["held"]
                assert got[key]["held"] == entry["held"], where
                if isinstance(entry["value"], torch.Tensor):
                    assert kind == ("DTensor" if len(shape) else "Tensor"), where
                    assert placements == ("(Shard(dim=0),)" if len(shape) else "None"), where
                    assert torch.equal(got[key]["value"], entry["value"]), where
                else:
                    assert type(got[key]["value"]) is type(entry["value"]) and got[key]["value"] == entry["value"], (
                        where
                    )


def test_full_state_dict_continues_in_one_process(runs):
    """The full state dict (rank 0, torch.save) holds plain tensors: a single-process optimizer of the same
    settings loads it with ``load_state_dict`` and, on the whole global batch, continues as if never stopped."""
    results, out = runs
    whole = torch.load(out / "full_w2.pt", weights_only=True)
    model = worker.build_model()
    model.load_state_dict(whole["model"])
    opts = worker.build_optimizers(model)
    for name, opt in opts.items():
        opt.load_state_dict(whole[name])
        for st in opt.state.values():
            assert all(type(v) is torch.Tensor for v in st.values() if isinstance(v, torch.Tensor)), name
    worker.train(model, opts, worker.K, worker.N)
    final = worker.full_weights(model)
    for name in NAMES:
        want = _tower(results[2]["final"]["never_stopped"], name)
        _assert_relative(_tower(final, name), want, RELATIVE[name], f"{name} (one process)")


# ---------------------------------------------------------------------------------------------------- in process
def test_the_state_created_at_lr_0_has_every_key_later_steps_have():
    """DCP loads a checkpoint into the state a fresh optimizer gets from one step at lr 0 with zero gradients, and
    drops, without a word, any saved key that state lacks: it must hold every key (and number type) training makes.
    That step changes no weight (SST rewrites W as the image of its new factors: equal up to rounding)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    def kinds(opt):
        return [{k: type(v) for k, v in st.items()} for st in opt.state.values()]

    model = worker.build_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    fresh = worker.build_optimizers(model)
    for opt in fresh.values():
        _init_optim_state(opt)
    for k, p in model.named_parameters():
        if k.startswith("towers.sst.") and p.dim() == 2:
            torch.testing.assert_close(p.detach(), before[k], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(p.detach(), before[k]), k
    trained_model = worker.build_model()
    trained = worker.build_optimizers(trained_model)
    worker.train(trained_model, trained, 0, worker.N)
    for name in NAMES:
        assert kinds(fresh[name]) == kinds(trained[name]), name


@pytest.mark.parametrize(
    "relative_step, beta1, zero", [(True, None, 0.0), (True, 0.9, torch.tensor(0.0)), (False, 0.9, 0.0)]
)
def test_adafactor_step_at_lr_0_advances_statistics_and_changes_no_weight(relative_step, beta1, zero):
    """What the checkpoint recipe's state creation needs (with or without the relative step): at lr 0 the weights
    stay, the statistics advance as in an ordinary step, a first moment takes a zero update."""
    lr = None if relative_step else 1e-2

    def make(w, b):
        return lo.GaLoreAdafactor([{"params": [w], "rank": 4}, {"params": [b]}], lr=lr, beta1=beta1, weight_decay=0.1)

    w, b = torch.nn.Parameter(torch.randn(16, 12)), torch.nn.Parameter(torch.randn(12))
    opt = make(w, b)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        w.grad, b.grad = torch.randn(16, 12, generator=gen), torch.randn(12, generator=gen)
        opt.step()
    saved, weights = copy.deepcopy(opt.state_dict()), (w.detach().clone(), b.detach().clone())
    for g in opt.param_groups:
        g["lr"] = zero
    grads = torch.randn(16, 12, generator=gen), torch.randn(12, generator=gen)
    w.grad, b.grad = grads
    opt.step()
    assert torch.equal(w.detach(), weights[0]) and torch.equal(b.detach(), weights[1])
    # an ordinary step from the same state on the same gradient: the same second-moment statistics (they do not
    # depend on lr), and it does move the weights
    w2, b2 = torch.nn.Parameter(weights[0].clone()), torch.nn.Parameter(weights[1].clone())
    twin = make(w2, b2)
    twin.load_state_dict(saved)
    w2.grad, b2.grad = (g.clone() for g in grads)
    twin.step()
    assert not torch.equal(w2.detach(), weights[0])
    for p, q, old in ((w, w2, saved["state"][0]), (b, b2, saved["state"][1])):
        assert opt.state[p]["moment_step"] == old["moment_step"] + 1
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if key in old:
                assert torch.equal(opt.state[p][key], twin.state[q][key]), key
        if beta1 is not None:  # the update it takes is 0 x the computed one: only the decay
            assert torch.equal(opt.state[p]["exp_avg"], old["exp_avg"] * beta1)


# ---------------------------------------------------------------------------------------------------- one rank
def test_sharded_state_that_cannot_be_placed_is_refused_by_name(mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    w = torch.nn.Parameter(distribute_tensor(torch.randn(12, 8), mesh, [Shard(0)]))
    opt = lo.GaLoreAdamW([{"params": [w], "rank": 2}])
    w.grad = distribute_tensor(torch.randn(12, 8), mesh, [Shard(0)])
    opt.step()
    sharded = opt.state_dict()
    plain = lo.GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(12, 8))], "rank": 2}])
    with pytest.raises(
        ValueError, match=r"param group 0, parameter of shape \(12, 8\): saved \w+ is a DTensor .*full_state_dict"
    ):
        plain.load_state_dict(sharded)
    replicated = copy.deepcopy(sharded)
    replicated["state"][0]["exp_avg"] = sharded["state"][0]["exp_avg"].redistribute(mesh, [Replicate()])
    with pytest.raises(ValueError, match=r"saved exp_avg is a DTensor with placements \(Replicate\(\),\).*reshards"):
        opt.load_state_dict(replicated)
    assert torch.equal(opt.state[w]["exp_avg"].full_tensor(), sharded["state"][0]["exp_avg"].full_tensor())
