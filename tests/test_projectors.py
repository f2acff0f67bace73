"""Contract and math tests for every projector (small CPU shapes, fast)."""

import copy
import io
import math

import pytest
import torch

from lowrank_optim.projectors import PROJECTORS, ProjectorError, make_projector, sst_sample
from lowrank_optim.projectors import dct as dct_mod
from lowrank_optim.projectors.dct import dct_fft, dct_matrix, idct_fft

# (registry name, options): every projector, plus the non-default variants that change the math.
CONFIGS = {
    "svd": ("svd", {}),
    "rsvd": ("rsvd", {}),
    "power": ("power", {}),
    "random": ("random", {}),
    "dct": ("dct", {}),
    "dct-l2-fft": ("dct", {"dct_norm": "l2", "dct_impl": "fft"}),
    "columns": ("columns", {}),
    "columns-norm": ("columns", {"select": "norm"}),
    "sst": ("sst", {}),
}
SIDES = ("left", "right", "full")
SHAPES = ((24, 40), (40, 24), (32, 32))
SEEDED = ("rsvd", "power", "random", "columns", "sst")


def make(cfg, side, shape, rank=6, seed=0, **extra):
    name, opts = CONFIGS[cfg]
    return make_projector(name, rank, side, shape, seed=seed, **{**opts, **extra})


def refreshed(proj, grad, refreshes=0):
    state = {"proj_refreshes": refreshes}
    state.update(proj.refresh(state, grad))
    return state


def bases(proj, state):
    return {which: proj.basis(state, which) for which, _ in proj.projected_dims()}


def explicit_project(b, grad):
    out = grad
    if "left" in b:
        out = b["left"].t() @ out
    if "right" in b:
        out = out @ b["right"]
    return out


def explicit_back(b, low):
    out = low
    if "left" in b:
        out = b["left"] @ out
    if "right" in b:
        out = out @ b["right"].t()
    return out


all_cases = pytest.mark.parametrize("cfg", list(CONFIGS))
all_sides = pytest.mark.parametrize("side", SIDES)
all_shapes = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")


def test_registry_has_every_builtin():
    assert set(PROJECTORS) == {"blocks", "svd", "rsvd", "power", "random", "dct", "columns", "sst"}
    assert PROJECTORS["dct"].index_based and PROJECTORS["columns"].index_based
    with pytest.raises(ValueError):
        make_projector("nope", 4, "left", (8, 8))


# --- contract, parametrized over projectors x sides x shapes ------------------------------------------------------
@all_cases
@all_sides
@all_shapes
def test_basis_orthonormal(cfg, side, shape):
    grad = torch.randn(*shape)
    proj = make(cfg, side, shape)
    for which, b in bases(proj, refreshed(proj, grad)).items():
        size = shape[0] if which == "left" else shape[1]
        assert b.shape == (size, 6)
        torch.testing.assert_close(b.t() @ b, torch.eye(6), atol=1e-5, rtol=0)


@all_cases
@all_sides
@all_shapes
def test_full_rank_reconstruction(cfg, side, shape):
    grad = torch.randn(*shape)
    proj = make(cfg, side, shape, rank=max(shape))  # clamped to the projected dim (or min(m, n) for SVDs)
    state = refreshed(proj, grad)
    torch.testing.assert_close(proj.project_back(state, proj.project(state, grad)), grad, atol=1e-4, rtol=1e-4)


@all_cases
@all_sides
@all_shapes
def test_residual_orthogonal_to_subspace(cfg, side, shape):
    grad = torch.randn(*shape)
    proj = make(cfg, side, shape)
    state = refreshed(proj, grad)
    resid = grad - proj.project_back(state, proj.project(state, grad))
    assert proj.project(state, resid).abs().max() < 1e-5 * grad.norm()  # fp32 round-off, relative to G
    assert resid.norm() > 0.1  # rank 6 < full rank leaves something out


@all_cases
@all_sides
@all_shapes
def test_project_matches_explicit_basis(cfg, side, shape):
    grad = torch.randn(*shape)
    proj = make(cfg, side, shape)
    state = refreshed(proj, grad)
    b = bases(proj, state)
    low = proj.project(state, grad)
    assert low.shape == proj.low_rank_shape()
    torch.testing.assert_close(low, explicit_project(b, grad), atol=1e-5, rtol=1e-5)
    other = torch.randn_like(low)
    torch.testing.assert_close(proj.project_back(state, other), explicit_back(b, other), atol=1e-5, rtol=1e-5)


@all_cases
@all_sides
def test_refresh_does_not_mutate_state(cfg, side):
    grad = torch.randn(24, 40)
    proj = make(cfg, side, (24, 40))
    state = refreshed(proj, torch.randn(24, 40), refreshes=3)
    before = copy.deepcopy(state)
    new = proj.refresh(state, grad)
    assert new["proj_refreshes"] == state["proj_refreshes"] + 1 == 5
    assert state.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(state[k], v) if isinstance(v, torch.Tensor) else state[k] == v


@all_cases
@all_sides
def test_state_is_plain_and_resumes_exactly(cfg, side):
    shape = (24, 40)
    grad = torch.randn(*shape)
    proj = make(cfg, side, shape)
    state = refreshed(proj, grad)
    for k, v in state.items():
        assert k.startswith("proj_")
        assert isinstance(v, torch.Tensor) or (isinstance(v, (int, float)) and not isinstance(v, bool))
    if cfg == "random":
        assert set(state) == {"proj_refreshes"} and proj.state_bytes(state) == 0
    if PROJECTORS[CONFIGS[cfg][0]].index_based:
        for which, _ in proj.projected_dims():
            idx = proj.indices(state, which)
            assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = make(cfg, side, shape)
    assert torch.equal(fresh.project(loaded, grad), proj.project(state, grad))
    low = proj.project(state, grad)
    assert torch.equal(fresh.project_back(loaded, low), proj.project_back(state, low))


@all_cases
@all_sides
def test_rotation_maps_coefficients(cfg, side):
    shape = (24, 40)
    grad = torch.randn(*shape)
    proj = make(cfg, side, shape)
    old = refreshed(proj, torch.randn(*shape), refreshes=0)
    new = refreshed(proj, torch.randn(*shape), refreshes=1)
    rot = proj.rotation(old, new)
    for which, r in rot.items():
        torch.testing.assert_close(r, proj.basis(new, which).t() @ proj.basis(old, which))
    low = proj.project(old, grad)
    expected = proj.project(new, proj.project_back(old, low))  # the old coefficients, expressed in the new basis
    got = low
    if "left" in rot:
        got = rot["left"] @ got
    if "right" in rot:
        got = got @ rot["right"].t()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", ["svd", "rsvd", "power", "sst"])
def test_nonfinite_gradient_raises_projector_error(cfg):
    grad = torch.randn(24, 40)
    grad[3, 5] = float("nan")
    proj = make(cfg, "left", (24, 40))
    with pytest.raises(ProjectorError):
        proj.refresh({}, grad)


# --- seeding ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", SEEDED)
@all_sides
def test_seeded_projectors_reproducible(cfg, side):
    shape = (24, 40)
    grad = torch.randn(*shape)
    opts = {"power_iters": 0} if cfg == "rsvd" else {}  # power iterations would converge every seed to the SVD

    def basis_for(seed, refreshes):
        proj = make(cfg, side, shape, seed=seed, **opts)
        return torch.cat([b.flatten() for b in bases(proj, refreshed(proj, grad, refreshes)).values()])

    ref = basis_for(0, 0)
    assert torch.equal(ref, basis_for(0, 0))
    for seed, refreshes in ((1, 0), (0, 1)):
        others = [basis_for(seed + k, refreshes) for k in range(3)]
        assert any(not torch.allclose(ref, o, atol=1e-4) for o in others)


# --- DCT ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 7, 16, 33])
def test_dct_matrix_closed_form_and_orthonormal(d):
    mat = dct_matrix(d, "cpu", torch.float64)
    loop = torch.empty(d, d, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            c = math.sqrt(2.0 / d) * math.cos(math.pi * i * (2 * j + 1) / (2 * d))
            loop[i, j] = c * (math.sqrt(0.5) if i == 0 else 1.0)
    torch.testing.assert_close(mat, loop, atol=1e-12, rtol=0)
    torch.testing.assert_close(mat @ mat.t(), torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)


def test_dct_matrix_cache_shared_between_weights():
    assert dct_matrix(32) is dct_matrix(32, torch.device("cpu"), torch.float32)
    a, b = make("dct", "right", (24, 32)), make("dct", "right", (40, 32))
    sa, sb = refreshed(a, torch.randn(24, 32)), refreshed(b, torch.randn(40, 32))
    a.project(sa, torch.randn(24, 32)), b.project(sb, torch.randn(40, 32))
    assert sum(1 for k in dct_mod._DCT_CACHE if k[0] == 32 and k[2] == torch.float32) == 1


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_dct_selects_top_coefficients(norm, side):
    m, n, r = 12, 20, 5
    grad = torch.randn(m, n, dtype=torch.float64).float()
    d = m if side == "left" else n
    scores = []
    for i in range(d):  # coefficient vector of basis vector i, from the closed form
        vec = torch.tensor([math.cos(math.pi * i * (2 * j + 1) / (2 * d)) for j in range(d)], dtype=torch.float64)
        vec *= math.sqrt(2.0 / d) * (math.sqrt(0.5) if i == 0 else 1.0)
        coeff = vec @ grad.double() if side == "left" else grad.double() @ vec
        scores.append(coeff.abs().sum().item() if norm == "l1" else coeff.norm().item())
    expected = sorted(sorted(range(d), key=lambda i: -scores[i])[:r])
    proj = make_projector("dct", r, side, (m, n), dct_norm=norm)
    assert proj.indices(refreshed(proj, grad), side).tolist() == expected


@all_sides
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (23, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_dct_fft_equals_matmul(side, shape, norm):
    grad = torch.randn(*shape)
    mm = make_projector("dct", 7, side, shape, dct_norm=norm, dct_impl="matmul")
    ff = make_projector("dct", 7, side, shape, dct_norm=norm, dct_impl="fft")
    s_mm, s_ff = refreshed(mm, grad), refreshed(ff, grad)
    for which, _ in mm.projected_dims():
        assert torch.equal(s_mm[f"proj_{which}_idx"], s_ff[f"proj_{which}_idx"])
    low = mm.project(s_mm, grad)
    torch.testing.assert_close(ff.project(s_ff, grad), low, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ff.project_back(s_ff, low), mm.project_back(s_mm, low), atol=1e-5, rtol=1e-5)
    x = torch.randn(5, shape[1])
    torch.testing.assert_close(dct_fft(x), x @ dct_matrix(shape[1]).t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(idct_fft(dct_fft(x)), x, atol=1e-5, rtol=1e-5)


# --- SVD family ---------------------------------------------------------------------------------------------------
def _known_spectrum(m, n, sigma, noise=0.0):
    u = torch.linalg.qr(torch.randn(m, len(sigma), dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(sigma), dtype=torch.float64)).Q
    g = u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.t()
    return (g + noise * torch.randn(m, n, dtype=torch.float64)).float(), u.float(), v.float()


def test_svd_recovers_top_singular_vectors():
    grad, u, v = _known_spectrum(30, 20, [10.0, 8.0, 6.0, 4.0, 2.0, 1.0])
    proj = make_projector("svd", 3, "full", (30, 20))
    state = refreshed(proj, grad)
    for which, ref in (("left", u[:, :3]), ("right", v[:, :3])):
        overlap = proj.basis(state, which).t() @ ref  # = diag(+-1) when the vectors match up to sign
        torch.testing.assert_close(overlap.abs(), torch.eye(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rsvd_matches_svd_subspace_on_low_rank_plus_noise(side):
    grad, _, _ = _known_spectrum(60, 40, [50.0, 40.0, 30.0, 20.0, 10.0], noise=1e-3)
    svd, rsvd = (
        make_projector(n, 5, side, (60, 40), power_iters=2) if n == "rsvd" else make_projector(n, 5, side, (60, 40))
        for n in ("svd", "rsvd")
    )
    a, b = svd.basis(refreshed(svd, grad), side), rsvd.basis(refreshed(rsvd, grad), side)
    torch.testing.assert_close(a @ a.t(), b @ b.t(), atol=1e-4, rtol=0)  # same subspace (signs may differ)


def test_rank_is_clamped_to_projected_dim():
    proj = make_projector("random", 100, "full", (24, 40))
    state = refreshed(proj, torch.randn(24, 40))
    assert proj.basis(state, "left").shape == (24, 24) and proj.basis(state, "right").shape == (40, 40)
    proj = make_projector("rsvd", 100, "right", (24, 40))
    assert proj.basis(refreshed(proj, torch.randn(24, 40)), "right").shape == (40, 24)


# --- SST sampling -------------------------------------------------------------------------------------------------
def _draw_frequencies(sigma, r, weight, draws=6000):
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(len(sigma))
    for _ in range(draws):
        idx = sst_sample(sigma, r, weight, gen)
        assert idx.unique().numel() == r  # without replacement
        counts[idx] += 1
    return counts / draws


def test_sst_single_draw_frequencies_follow_p():
    sigma = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0])
    w = 0.6
    p = (1 - w) / 6 + w * sigma / sigma.sum()
    freq = _draw_frequencies(sigma, 1, w)
    # ~4.5 binomial standard deviations per category
    assert ((freq - p).abs() <= 4.5 * (p * (1 - p) / 6000).sqrt()).all(), (freq, p)


def test_sst_uniform_when_weight_zero():
    sigma = torch.tensor([100.0, 10.0, 1.0, 0.1, 0.01, 0.001])
    assert ((_draw_frequencies(sigma, 1, 0.0) - 1 / 6).abs() < 0.03).all()
    assert ((_draw_frequencies(sigma, 3, 0.0, draws=3000) - 0.5).abs() < 0.05).all()  # inclusion = r / k


def test_sst_sample_edge_cases():
    idx = sst_sample(torch.tensor([3.0, 0.0, 0.0, 0.0]), 3, weight=1.0)  # too few positive sigmas still works
    assert idx.unique().numel() == 3 and 0 in idx.tolist()
    assert sst_sample(torch.ones(4), 10).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        sst_sample(torch.ones(4), 2, weight=1.5)


def test_sst_projector_stores_sampled_singular_vectors():
    grad, _, _ = _known_spectrum(30, 20, [10.0, 8.0, 6.0, 4.0, 2.0, 1.0])
    proj = make_projector("sst", 3, "full", (30, 20), seed=5, sst_weight=0.5)
    state = {"proj_refreshes": 0}
    idx = sst_sample(torch.linalg.svdvals(grad), 3, 0.5, proj.generator(state, grad.device))
    state.update(proj.refresh(state, grad))
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    torch.testing.assert_close((proj.basis(state, "left").t() @ u[:, idx]).abs(), torch.eye(3), atol=1e-4, rtol=0)
    torch.testing.assert_close((proj.basis(state, "right").t() @ vh[idx].t()).abs(), torch.eye(3), atol=1e-4, rtol=0)


# --- columns ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_columns_norm_picks_largest(side):
    grad = torch.randn(24, 40) * 0.1
    dim = 0 if side == "left" else 1
    big = torch.tensor([3, 17, 20])
    grad.index_fill_(dim, big, 5.0)
    proj = make_projector("columns", 3, side, (24, 40), select="norm")
    assert torch.equal(proj.indices(refreshed(proj, grad), side), big)
