"""DCTAdamW: one shared DCT matrix per size, index-only state, rotation math, fft == matmul."""

import pytest
import torch

from lowrank_optim.dct import DCTAdamW
from lowrank_optim.projectors import dct as dct_mod
from lowrank_optim.projectors.dct import dct_matrix

SHAPES = ((24, 40), (40, 24), (32, 32), (40, 40))


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) * 0.3 for s in SHAPES]
    data = [(torch.randn(48, s[1], generator=gen), torch.randn(48, s[0], generator=gen)) for s in SHAPES]

    def loss_fn(ws):
        return sum(((torch.tanh(x @ w.t()) - y) ** 2).mean() for w, (x, y) in zip(ws, data))

    return init, loss_fn


def train(steps=20, **kw):
    init, loss_fn = problem()
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = DCTAdamW([{"params": params, "rank": 6}], lr=1e-2, **kw)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return params, opt, losses


def test_defaults_and_aliases():
    w = torch.nn.Parameter(torch.randn(16, 24))
    opt = DCTAdamW([{"params": [w], "rank": 4}])
    d = opt.defaults
    assert (d["projector"], d["update_proj_gap"], d["subspace_change"], d["dct_norm"], d["dct_impl"]) == (
        "dct",
        1,
        "keep",
        "l1",
        "matmul",
    )
    assert DCTAdamW([w], rank=4, rotate_subspace=True).defaults["subspace_change"] == "rotate"
    assert (
        DCTAdamW([{"params": [w], "rank": 4, "rotate_subspace": True}]).param_groups[0]["subspace_change"] == "rotate"
    )
    with pytest.raises(ValueError, match="rotate_subspace"):
        DCTAdamW([w], rank=4, rotate_subspace=True, subspace_change="reset")


def test_one_dct_matrix_per_size_and_index_only_state(monkeypatch):
    monkeypatch.setattr(dct_mod, "_DCT_CACHE", {})
    params, opt, losses = train(steps=3, rotate_subspace=True)
    # std sides: 24x40 -> rows (24), 40x24 -> columns (24), 32x32 -> 32, 40x40 -> 40: four weights, three sizes
    sizes = sorted(key[0] for key in dct_mod._DCT_CACHE)
    assert sizes == [24, 32, 40]
    for p in params:
        st = opt.state[p]
        for key, value in st.items():
            if not isinstance(value, torch.Tensor):
                assert isinstance(value, int), key
            elif key in ("exp_avg", "exp_avg_sq"):
                assert value.shape[0] * value.shape[1] == 6 * max(p.shape)  # r x n or m x r moments
            elif key == "moment_step":
                assert value.dim() == 0  # the bias-correction count, a 0-dim tensor on the device
            else:
                assert not value.is_floating_point() and value.numel() == 6, key  # indices only
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("rotate", [True, False])
def test_rotation_math_on_constructed_case(rotate):
    """8 x 16 weight (left side, DCT of size 8), r = 3. Step 1's gradient lives on DCT rows {0, 1, 2}, step 2's
    on {1, 2, 5}. With rotation the moments of rows 1 and 2 follow them to slots 0 and 1 and row 5 starts from
    zero; without it the moments stay by slot."""
    b1, b2 = 0.9, 0.999
    D = dct_matrix(8)
    c1, c2 = torch.randn(3, 16) * 5, torch.randn(3, 16) * 5
    g1 = D[[0, 1, 2]].t() @ c1
    g2 = D[[1, 2, 5]].t() @ c2
    w = torch.nn.Parameter(torch.zeros(8, 16))
    opt = DCTAdamW([{"params": [w], "rank": 3}], betas=(b1, b2), rotate_subspace=rotate)
    for g in (g1, g2):
        w.grad = g
        opt.step()
    st = opt.state[w]
    assert st["proj_left_idx"].tolist() == [1, 2, 5]
    m1, v1 = (1 - b1) * c1, (1 - b2) * c1**2
    if rotate:
        zero = torch.zeros(1, 16)
        m1, v1 = torch.cat([m1[1:], zero]), torch.cat([v1[1:], zero])
    assert torch.allclose(st["exp_avg"], b1 * m1 + (1 - b1) * c2, atol=1e-5)
    assert torch.allclose(st["exp_avg_sq"], b2 * v1 + (1 - b2) * c2**2, atol=1e-5)


def test_rotate_keeps_training():
    _, _, keep = train(steps=30)
    _, _, rotate = train(steps=30, rotate_subspace=True)
    assert rotate[-1] < 0.9 * rotate[0]
    assert all(b < a for a, b in zip(rotate[::5], rotate[5::5]))  # steadily, not by luck at the end
    assert all(torch.isfinite(torch.tensor(rotate)))
    assert rotate != keep  # the policy really changed something


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_fft_matches_matmul_trajectory(norm):
    a, _, _ = train(steps=20, dct_impl="matmul", dct_norm=norm)
    b, _, _ = train(steps=20, dct_impl="fft", dct_norm=norm)
    for x, y in zip(a, b):
        assert ((x - y).norm() / y.norm()).item() < 1e-4
