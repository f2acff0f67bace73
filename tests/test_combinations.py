"""Every method x every projector trains a tiny MLP and checkpoints through ``torch.load(weights_only=True)``."""

import copy
import io

import pytest
import torch

from lowrank_optim.dct import DCTAdamW
from lowrank_optim.fira import FiraAdamW
from lowrank_optim.frugal import FrugalAdamW
from lowrank_optim.galore import GaLoreAdafactor, GaLoreAdamW
from lowrank_optim.sst import SSTAdamW

PROJECTORS = ("svd", "rsvd", "random", "dct", "columns", "sst")
METHODS = {
    "galore_adamw": (GaLoreAdamW, {"rank": 4}),
    "galore_adafactor": (GaLoreAdafactor, {"rank": 4}),
    "fira": (FiraAdamW, {"rank": 4}),
    "frugal": (FrugalAdamW, {"density": 0.25}),
    "dct_adamw": (DCTAdamW, {"rank": 4}),
    "sst": (SSTAdamW, {"rank": 4}),
}
CASES = [(m, p) for m in METHODS for p in PROJECTORS] + [("frugal", "blocks")]


def setup(method, projector):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    cls, targeted = METHODS[method]
    targeted = dict(targeted, density=0.5) if projector == "blocks" else targeted

    def make(m):
        groups = [
            {"params": [m[0].bias, m[2].bias]},
            {"params": [m[0].weight, m[2].weight], "update_proj_gap": 5, **targeted},
        ]
        return cls(groups, lr=1e-2, projector=projector)

    return model, make


def batch(step):
    gen = torch.Generator().manual_seed(step % 4)
    x = torch.randn(32, 16, generator=gen)
    return x, torch.sin(x[:, :8]) + 0.1 * x[:, 8:]


def train_step(model, opt, step):
    x, y = batch(step)
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("method,projector", CASES)
def test_trains_and_round_trips(method, projector):
    model, make = setup(method, projector)
    opt = make(model)
    losses = [train_step(model, opt, t) for t in range(15)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-4:]) < sum(losses[:4]), losses  # same 4 batches, compared one cycle to the last

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = copy.deepcopy(model)
    opt2 = make(model2)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for t in range(15, 18):  # crosses the refresh at step 15
        train_step(model, opt, t)
        train_step(model2, opt2, t)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
