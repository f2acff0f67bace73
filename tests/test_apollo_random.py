"""random_style="apollo": the random projector reproduces apollo-torch's projection matrices bit for bit (seed,
seed schedule over refreshes, shape, scaling) and its projection of a gradient."""

import pytest
import torch

from lowrank_optim.projectors import make_projector
from lowrank_optim.projectors.random import apollo_next_seed

apollo_torch = pytest.importorskip("apollo_torch")
from apollo_torch.random_projector import GradientProjector  # noqa: E402


def side_of(shape, proj_type):
    """apollo-torch's side rule (the same as the engine's side_for)."""
    tall = shape[0] >= shape[1]
    return {"std": "right" if tall else "left", "reverse_std": "left" if tall else "right"}.get(proj_type, proj_type)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_basis_and_projection_equal_apollo_over_two_refreshes(shape, proj_type):
    rank, gap, index = 6, 3, 4  # apollo-torch seeds parameter k (1-based) with k; our engine passes k - 1
    ref = GradientProjector(rank, update_proj_gap=gap, scale=1.0, proj_type=proj_type, seed=index)
    side = side_of(shape, proj_type)
    ours = make_projector("random", rank, side, shape, seed=index - 1, random_style="apollo")
    state = {"proj_refreshes": 0}
    gen = torch.Generator().manual_seed(0)
    seen = []
    for it in range(2 * gap + 1):  # refreshes at iterations 0, gap, 2 gap
        grad = torch.randn(*shape, generator=gen)
        if it % gap == 0:
            state = {**state, **ours.refresh(state, grad)}
        want = ref.project(grad, it)
        basis = ours.basis(state, side)
        expected = ref.ortho_matrix if side == "left" else ref.ortho_matrix.t()
        assert torch.equal(basis, expected)
        assert torch.equal(ours.project(state, grad), want)
        seen.append(basis.clone())
    assert state["proj_refreshes"] == 3
    assert not torch.equal(seen[0], seen[gap]) and torch.equal(seen[0], seen[gap - 1])
    assert basis.shape == ((shape[0], rank) if side == "left" else (shape[1], rank))


def test_seed_schedule_is_apollos():
    proj = make_projector("random", 4, "left", (30, 20), seed=6, random_style="apollo")
    assert proj.apollo_seed(1) == 7
    assert proj.apollo_seed(3) == apollo_torch.random_projector.next_seed(apollo_torch.random_projector.next_seed(7))
    assert apollo_next_seed(7) == apollo_torch.random_projector.next_seed(7)


def test_matrices_equal_those_inside_apollo_adamw():
    """Through apollo-torch's optimizer: parameter k (1-based over every group) gets the matrices our projector
    draws with the engine's per-parameter seed k - 1 (group seed 0)."""
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(8)),
        torch.nn.Parameter(torch.randn(40, 24)),
        torch.nn.Parameter(torch.randn(24, 40)),
    ]
    groups = [
        {"params": params[:1]},
        {
            "params": params[1:],
            "rank": 4,
            "update_proj_gap": 2,
            "scale": 1.0,
            "proj_type": "std",
            "proj": "random",
            "scale_type": "channel",
        },
    ]
    opt = apollo_torch.APOLLOAdamW(groups, lr=1e-2)
    ours = {
        i: make_projector("random", 4, side_of(tuple(p.shape), "std"), tuple(p.shape), seed=i, random_style="apollo")
        for i, p in enumerate(params)
        if i
    }
    for step in range(3):  # refreshes at steps 0 and 2
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for i, proj in ours.items():
            state = {"proj_refreshes": step // 2 + 1}
            ref = opt.state[params[i]]["projector"].ortho_matrix
            assert torch.equal(proj.basis(state, proj.side), ref if proj.side == "left" else ref.t())


def test_apollo_style_has_no_full_side_and_a_checked_style():
    with pytest.raises(ValueError, match="full"):
        make_projector("random", 4, "full", (30, 20), random_style="apollo")
    with pytest.raises(ValueError, match="random_style"):
        make_projector("random", 4, "left", (30, 20), random_style="gaussian")
