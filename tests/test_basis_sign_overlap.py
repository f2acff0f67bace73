"""basis_sign: new bases follow the previous one's signs ("align") or keep the raw factorisation ("none");
overlap(): identical -> 1, orthogonal -> 0, closed-form partial overlaps, for every projector."""

import math

import pytest
import torch

import lowrank_optim as lo
from lowrank_optim.projectors import make_projector
from lowrank_optim.projectors.base import SIGN_ALIGN_MIN, canonical_signs

EXPLICIT = ("svd", "rsvd", "power")
ALL = ("svd", "rsvd", "power", "sst", "random", "dct", "columns")


def refreshed(proj, grad, state=None):
    state = dict(state or {"proj_refreshes": 0})
    state.update(proj.refresh(state, grad))
    return state


def gapped(m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, 8, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, 8, generator=gen)).Q
    return (u * torch.tensor([9.0, 8, 7, 6, 5, 1, 0.5, 0.25])) @ v.t() + 1e-3 * torch.randn(m, n, generator=gen)


# --- basis_sign ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_none_keeps_the_raw_svd_bits(side):
    grad = torch.randn(30, 20)
    proj = make_projector("svd", 5, side, (30, 20), basis_sign="none")
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    flipped = {"proj_refreshes": 1, "proj_left": -u[:, :5].contiguous(), "proj_right": -vh[:5].t().contiguous()}
    for state in ({"proj_refreshes": 0}, flipped):  # no previous basis, and a previous basis of opposite signs
        new = proj.refresh(state, grad)
        if side in ("left", "full"):
            assert torch.equal(new["proj_left"], u[:, :5])
        if side in ("right", "full"):
            assert torch.equal(new["proj_right"], vh[:5].t())


@pytest.mark.parametrize("name", EXPLICIT)
@pytest.mark.parametrize("side", ["left", "right", "full"])
@pytest.mark.parametrize("seed", range(4))
def test_align_follows_any_previous_signs_under_a_rounding_level_change(name, side, seed):
    """The previous basis gets an arbitrary sign per vector; refreshing on G perturbed by 1e-8 (relative) returns
    the same vectors with the same signs, whatever signs the factorisation itself produced."""
    shape = (36, 28)
    grad = gapped(*shape, seed)
    proj = make_projector(name, 5, side, shape, seed=seed)
    state = refreshed(proj, grad)
    gen = torch.Generator().manual_seed(100 + seed)
    for which, _ in proj.projected_dims():
        state["proj_" + which] = state["proj_" + which] * torch.randint(0, 2, (5,), generator=gen).mul(2).sub(1)
    nudged = grad * (1 + 1e-8 * torch.randn(*shape, generator=gen))
    new = refreshed(proj, nudged, state)
    for which, _ in proj.projected_dims():
        torch.testing.assert_close(new["proj_" + which], state["proj_" + which], atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", EXPLICIT)
def test_first_basis_has_positive_peaks_and_is_stable_under_perturbation(name):
    for seed in range(5):
        grad = gapped(40, 30, seed)
        nudged = grad * (1 + 1e-8 * torch.randn(40, 30, generator=torch.Generator().manual_seed(seed)))
        proj = make_projector(name, 5, "full", (40, 30), seed=seed)
        a, b = refreshed(proj, grad), refreshed(proj, nudged)
        for key in ("proj_left", "proj_right"):
            peak = a[key].gather(0, a[key].abs().argmax(0, keepdim=True))
            assert (peak > 0).all()
            torch.testing.assert_close(a[key], b[key], atol=2e-4, rtol=0)


def test_canonical_signs_rule():
    gen = torch.Generator().manual_seed(0)
    old = torch.linalg.qr(torch.randn(50, 4, generator=gen)).Q
    new = old * torch.tensor([-1.0, 1.0, -1.0, 1.0])
    assert torch.equal(canonical_signs(new, old), old)  # continued vectors take the old signs
    unrelated = torch.zeros(50, 4)
    unrelated[0, 0], unrelated[1, 1], unrelated[2, 2], unrelated[3, 3] = -1.0, 1.0, -0.5, 0.0
    # overlap with old below SIGN_ALIGN_MIN: the largest entry decides (a zero column stays as it is)
    weak = old * 0.0
    weak[0, 0] = weak[1, 1] = SIGN_ALIGN_MIN / 2
    out = canonical_signs(unrelated, weak)
    assert out[0, 0] == 1.0 and out[1, 1] == 1.0 and out[2, 2] == 0.5 and (out[:, 3] == 0).all()
    assert torch.equal(canonical_signs(unrelated), out)
    assert torch.equal(canonical_signs(new, old[:, :3]), canonical_signs(new))  # width change: no alignment


def test_basis_sign_is_checked():
    with pytest.raises(ValueError, match="basis_sign"):
        make_projector("rsvd", 4, "left", (30, 20), basis_sign="flip")


# --- overlap ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_identical_bases_overlap_one(name, side):
    proj = make_projector(name, 5, side, (30, 20))
    state = refreshed(proj, torch.randn(30, 20))
    assert proj.overlap(state, dict(state)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_overlap_matches_the_explicit_bases(name, side):
    """For every projector: ||P_old^T P_new||_F^2 / r averaged over sides, from the explicit bases."""
    proj = make_projector(name, 5, side, (30, 20))
    old = refreshed(proj, torch.randn(30, 20))
    new = refreshed(proj, torch.randn(30, 20), old)
    want = [float((proj.basis(old, w).t() @ proj.basis(new, w)).square().sum()) / 5 for w, _ in proj.projected_dims()]
    got = proj.overlap(old, new)
    assert 0.0 <= got < 1.0 and got == pytest.approx(sum(want) / len(want), abs=1e-5)


@pytest.mark.parametrize("which", ["left", "right"])
def test_overlap_closed_forms_for_explicit_bases(which):
    size = 24 if which == "left" else 16
    proj = make_projector("svd", 4, which, (24, 16))
    eye = torch.eye(size)
    old = {"proj_refreshes": 1, "proj_" + which: eye[:, :4].contiguous()}
    orthogonal = {"proj_refreshes": 2, "proj_" + which: eye[:, 4:8].contiguous()}
    assert proj.overlap(old, orthogonal) == 0.0
    theta = 0.3  # two of the four vectors turn by theta towards directions outside the old span
    turned = eye[:, :4].clone()
    turned[:, :2] = math.cos(theta) * eye[:, :2] + math.sin(theta) * eye[:, 4:6]
    partial = {"proj_refreshes": 2, "proj_" + which: turned}
    assert proj.overlap(old, partial) == pytest.approx((2 + 2 * math.cos(theta) ** 2) / 4, abs=1e-6)
    rotated = {"proj_refreshes": 2, "proj_" + which: eye[:, :4] @ torch.linalg.qr(torch.randn(4, 4)).Q}
    assert proj.overlap(old, rotated) == pytest.approx(1.0, abs=1e-6)  # a different basis of the same span


def test_overlap_full_side_averages_both_sides():
    proj = make_projector("svd", 2, "full", (10, 8))
    e10, e8 = torch.eye(10), torch.eye(8)
    old = {"proj_refreshes": 1, "proj_left": e10[:, :2], "proj_right": e8[:, :2]}
    new = {"proj_refreshes": 2, "proj_left": e10[:, :2], "proj_right": e8[:, 1:3]}
    assert proj.overlap(old, new) == pytest.approx((1.0 + 0.5) / 2)


@pytest.mark.parametrize("name", ["dct", "columns"])
def test_overlap_of_index_based_is_the_shared_fraction(name):
    proj = make_projector(name, 4, "full", (20, 12))
    old = {
        "proj_refreshes": 1,
        "proj_left_idx": torch.tensor([0, 1, 2, 3]),
        "proj_right_idx": torch.tensor([0, 5, 7, 9]),
    }
    new = {
        "proj_refreshes": 2,
        "proj_left_idx": torch.tensor([2, 3, 4, 5]),
        "proj_right_idx": torch.tensor([1, 2, 3, 4]),
    }
    assert proj.overlap(old, new) == pytest.approx((0.5 + 0.0) / 2)


def test_random_overlap_is_chance_level_between_draws():
    proj = make_projector("random", 4, "left", (400, 30))
    a, b = {"proj_refreshes": 1}, {"proj_refreshes": 2}
    assert proj.overlap(a, {"proj_refreshes": 1}) == 1.0
    assert proj.overlap(a, b) < 0.1  # independent draws: about r / d = 0.01
    apollo = make_projector("random", 4, "left", (400, 30), random_style="apollo")
    assert apollo.overlap(a, dict(a)) == 1.0 and apollo.overlap(a, b) < 0.1


def test_quantized_identical_bases_overlap_is_clamped_to_one():
    proj = make_projector("svd", 5, "left", (30, 20), basis_bits=4)
    state = refreshed(proj, torch.randn(30, 20))
    assert 0.9 < proj.overlap(state, dict(state)) <= 1.0


def test_another_svds_signs_no_longer_change_training(monkeypatch):
    """Portable bases: an SVD that returns other (equally valid) signs, as another LAPACK, a GPU or a rounding-level
    change of the gradient can, no longer changes training with kept moments; with raw signs it does."""
    import lowrank_optim as lo

    real_svd = torch.linalg.svd

    calls = {"n": 0}

    def flipped_svd(a, *args, **kwargs):  # at some refreshes, the same factorisation with pairs 1, 3, ... negated
        u, s_, vh = real_svd(a, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] % 3 != 1:
            return u, s_, vh
        signs = torch.ones(s_.shape[-1], dtype=u.dtype)
        signs[1::2] = -1
        return u * signs, s_, vh * signs.unsqueeze(-1)

    def run(sign, flip):
        calls["n"] = 0
        with monkeypatch.context() as mp:
            if flip:
                mp.setattr(torch.linalg, "svd", flipped_svd)
            gen = torch.Generator().manual_seed(0)
            ws = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((40, 24), (24, 40))]
            opt = lo.GaLoreAdamW([{"params": ws, "rank": 4, "update_proj_gap": 3}], lr=1e-2, basis_sign=sign)
            for step in range(20):
                for i, w in enumerate(ws):
                    w.grad = torch.sin(w * (step + 1) + i).detach()
                opt.step()
            return [w.detach().clone() for w in ws]

    def gap(sign):
        return max(((a - b).norm() / a.norm()).item() for a, b in zip(run(sign, False), run(sign, True)))

    assert gap("align") < 1e-6
    assert gap("none") > 1e-4  # the failure the canonical signs remove


def _train_portable(name, noise, monkeypatch, flip_signs, **kw):
    """20 steps spanning 3 refreshes, moments kept across them. ``noise``: a relative change of every gradient
    (another reduction order: FSDP's reduce-scatter); ``flip_signs``: an SVD that returns its vectors with other
    signs (another LAPACK: CPU vs GPU), which is just as valid a factorisation."""
    if flip_signs:
        svd, flips = torch.linalg.svd, torch.Generator().manual_seed(3)

        def other_signs(a, full_matrices=True):
            u, s, vh = svd(a, full_matrices=full_matrices)
            sign = torch.randint(0, 2, (s.shape[-1],), generator=flips).float() * 2 - 1
            return u * sign, s, vh * sign[:, None]

        monkeypatch.setattr(torch.linalg, "svd", other_signs)
    cls = lo.method(name).optimizer_class
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(16, 10)), torch.nn.Parameter(torch.randn(8, 20))]
    opt = cls([dict(params=ws, rank=4, update_proj_gap=7)], lr=1e-2, **kw)
    gen, jitter = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for _ in range(20):
        for w in ws:
            g = torch.randn(w.shape, generator=gen) + 0.1 * w.detach()
            w.grad = g * (1 + noise * torch.randn(g.shape, generator=jitter))
        opt.step()
    monkeypatch.undo()
    return [w.detach() for w in ws]


def _gap(a, b):
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["galore", "fira", "apollo"])
def test_training_is_portable_under_a_rounding_level_gradient_change(name, monkeypatch):
    """Bases are canonicalised (basis_sign="align", the default): a 1e-8 change of the gradients together with an
    SVD of other sign conventions changes training by no more than 1e-6."""
    kw = dict(projector="svd") if name == "apollo" else {}
    reference = _train_portable(name, 0.0, monkeypatch, False, **kw)
    assert _gap(_train_portable(name, 1e-8, monkeypatch, True, **kw), reference) < 1e-6


def test_raw_svd_signs_are_not_portable(monkeypatch):
    """The same change with galore-torch's raw signs (basis_sign="none") flips kept moments against their basis:
    training ends far away (what canonicalisation prevents)."""
    reference = _train_portable("galore", 0.0, monkeypatch, False, basis_sign="none")
    assert _gap(_train_portable("galore", 1e-8, monkeypatch, True, basis_sign="none"), reference) > 1e-3
