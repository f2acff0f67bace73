"""The ``power`` projector: warm-started subspace iteration converges to the top-r SVD subspace, tracks a slowly
changing gradient, keeps a converged basis still, and never takes a full SVD."""

import math

import pytest
import torch

from lowrank_optim.projectors import ProjectorError, make_projector
from lowrank_optim.projectors.base import orthonormal_columns
from lowrank_optim.projectors.power import orthonormalize


def gapped(m, n, r, seed=0, drift=None):
    """G = U diag(sigma) V^T with a clear gap after r (sigma_r / sigma_{r+1} = 6), in fp64 then fp32."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    sigma = torch.cat(
        [torch.linspace(10, 6, r, dtype=torch.float64), torch.linspace(1, 0.1, k - r, dtype=torch.float64)]
    )
    return u, sigma, v


def compose(u, sigma, v):
    return (u * sigma) @ v.t()


def sin_angle(basis, ref):
    """Sine of the largest principal angle between span(basis) and span(ref) (both orthonormal)."""
    b, q = basis.double(), ref.double()
    return torch.linalg.matrix_norm(b - q @ (q.t() @ b), ord=2).item()


def start_state(proj, grad, which, seed=3):
    """A state whose previous basis is an arbitrary orthonormal guess (not the first refresh)."""
    size = grad.shape[0] if which == "left" else grad.shape[1]
    guess = orthonormal_columns(torch.randn(size, proj.basis_width(), generator=torch.Generator().manual_seed(seed)))
    return {"proj_refreshes": 1, f"proj_{which}": guess}


@pytest.mark.parametrize("side", ["left", "right", "full"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_converges_to_top_singular_subspace_from_a_poor_start(side, shape):
    r = 5
    u, sigma, v = gapped(*shape, r)
    grad = compose(u, sigma, v).float()
    proj = make_projector("power", r, side, shape, power_iters=1)
    anchor = "left" if side in ("left", "full") else "right"
    state = start_state(proj, grad, anchor)
    refs = {"left": u[:, :r], "right": v[:, :r]}
    angles = [sin_angle(proj.basis(state, anchor), refs[anchor])]
    for _ in range(6):
        state = {**state, **proj.refresh(state, grad)}
        angles.append(sin_angle(proj.basis(state, anchor), refs[anchor]))
    assert angles[0] > 0.5
    # each iteration shrinks tan(angle) by (sigma_{r+1} / sigma_r)^2 = 1/36 (the classical bound for subspace
    # iteration), down to fp32 round-off; allow a factor 2 of slack on the rate
    tans = [s / max(1 - s * s, 1e-300) ** 0.5 for s in angles]
    for before, after in zip(tans, tans[1:]):
        assert after <= max(before / 18, 1e-5), angles
    assert angles[-1] < 1e-5
    for which, _ in proj.projected_dims():  # the other side (full) comes from the same iteration
        assert sin_angle(proj.basis(state, which), refs[which]) < 1e-5
        b = proj.basis(state, which)
        torch.testing.assert_close(b.t() @ b, torch.eye(r), atol=1e-5, rtol=0)


@pytest.mark.parametrize("iters", [1, 2])
def test_tracks_a_slowly_rotating_gradient_vector_by_vector(iters):
    m, n, r = 48, 32, 6
    u, sigma, v = gapped(m, n, r, seed=1)
    gen = torch.Generator().manual_seed(2)
    turn = torch.linalg.matrix_exp(0.02 * (lambda a: a - a.t())(torch.randn(m, m, generator=gen, dtype=torch.float64)))
    proj = make_projector("power", r, "left", (m, n), power_iters=iters)
    state = {"proj_refreshes": 0}
    lag = 0.0
    for step in range(8):
        turned = turn @ u  # the singular vectors turn a little (~0.1 rad) between refreshes
        drift, u = sin_angle(turned[:, :r], u[:, :r]), turned
        grad = compose(u, sigma, v).float()
        state = {**state, **proj.refresh(state, grad)}
        p = proj.basis(state, "left")
        err = sin_angle(p, u[:, :r])
        if step:  # the first refresh is the seeded randomized SVD
            # the guess starts (lag + drift) away and each iteration divides that by (sigma_r / sigma_{r+1})^2
            assert err <= 2 * (lag + drift) / 36**iters + 2e-5, (step, err, lag, drift)
        assert drift > 0.05 and err < 0.01
        lag = err
        # Rayleigh-Ritz: the vectors are the singular vectors themselves, in order (up to sign)
        torch.testing.assert_close(
            (p.double().t() @ u[:, :r]).abs(),
            torch.eye(r, dtype=torch.float64),
            atol=0.05 if iters == 1 else 1e-3,
            rtol=0,
        )


def test_converged_basis_stays_put():
    """Refreshing on the same gradient keeps the basis (no rotation inside its span, no sign flips)."""
    u, sigma, v = gapped(40, 30, 4, seed=4)
    grad = compose(u, sigma, v).float()
    proj = make_projector("power", 4, "right", (40, 30))
    state = {"proj_refreshes": 0}
    for _ in range(3):
        state = {**state, **proj.refresh(state, grad)}
    before = proj.basis(state, "right").clone()
    state = {**state, **proj.refresh(state, grad)}
    torch.testing.assert_close(proj.basis(state, "right"), before, atol=1e-5, rtol=0)


def test_deterministic_and_state_holds_the_basis_only():
    grads = [torch.randn(30, 20, generator=torch.Generator().manual_seed(k)) for k in range(3)]

    def run(seed):
        proj = make_projector("power", 4, "full", (30, 20), seed=seed)
        state = {"proj_refreshes": 0}
        for g in grads:
            new = proj.refresh(state, g)
            assert set(new) == {"proj_refreshes", "proj_left", "proj_right"}
            state = {**state, **new}
        return state

    a, b = run(0), run(0)
    assert torch.equal(a["proj_left"], b["proj_left"]) and torch.equal(a["proj_right"], b["proj_right"])
    assert not torch.allclose(run(1)["proj_left"], a["proj_left"], atol=1e-3)  # the seeded first refresh


def test_no_full_svd_after_the_first_refresh(monkeypatch):
    m, n, r = 60, 50, 4
    grad = torch.randn(m, n)
    proj = make_projector("power", r, "left", (m, n), power_iters=2)
    state = {"proj_refreshes": 0, **proj.refresh({"proj_refreshes": 0}, grad)}
    shapes = []
    real_svd, real_qr = torch.linalg.svd, torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "svd", lambda a, **kw: shapes.append(tuple(a.shape)) or real_svd(a, **kw))
    monkeypatch.setattr(torch.linalg, "qr", lambda a, *x, **kw: shapes.append(tuple(a.shape)) or real_qr(a, *x, **kw))
    proj.refresh(state, grad)
    assert shapes and all(min(s) == r for s in shapes), shapes  # only thin m x r / n x r factorizations


def test_nonfinite_gradient_on_a_warm_refresh_raises():
    proj = make_projector("power", 4, "left", (30, 20))
    state = {"proj_refreshes": 0, **proj.refresh({"proj_refreshes": 0}, torch.randn(30, 20))}
    grad = torch.randn(30, 20)
    grad[1, 2] = float("inf")
    with pytest.raises(ProjectorError):
        proj.refresh(state, grad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_power_iters_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="power_iters"):
        make_projector("power", 4, "left", (30, 20), power_iters=bad)


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e5])
def test_orthonormalize_spans_the_input(cond):
    gen = torch.Generator().manual_seed(0)
    x = torch.linalg.qr(torch.randn(200, 12, generator=gen)).Q * torch.logspace(0, -math.log10(cond), 12)
    x = x @ torch.linalg.qr(torch.randn(12, 12, generator=gen)).Q  # mix the scales across columns
    q = orthonormalize(x)
    torch.testing.assert_close(q.t() @ q, torch.eye(12), atol=1e-5, rtol=0)
    # same span: x = q (q^T x) up to fp32 round-off relative to x's scale (q has x's rank, 12 columns)
    assert ((x - q @ (q.t() @ x)).norm() / x.norm()).item() < 1e-5


def test_orthonormalize_falls_back_on_rank_deficient_input():
    x = torch.randn(50, 3) @ torch.randn(3, 6)  # rank 3 < 6 columns: the Gram matrix is singular
    q = orthonormalize(x)
    torch.testing.assert_close(q.t() @ q, torch.eye(6), atol=1e-5, rtol=0)
    assert ((x - q @ (q.t() @ x)).norm() / x.norm()).item() < 1e-5
    proj = make_projector("power", 4, "left", (50, 40))
    state = {"proj_refreshes": 0, **proj.refresh({"proj_refreshes": 0}, torch.randn(50, 40))}
    rank_one = torch.randn(50, 1) @ torch.randn(1, 40)  # a warm refresh on a rank-1 gradient still works
    p = proj.basis({**state, **proj.refresh(state, rank_one)}, "left")
    torch.testing.assert_close(p.t() @ p, torch.eye(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("seed", range(3))
def test_oversample_recovers_a_subspace_the_old_basis_cannot_reach(side, seed):
    """The gradient's top directions jump to a span orthogonal to the previous basis (plus noise): one iteration
    from the old basis alone stays far from the new top-r subspace, a few random extra columns reach it."""
    m, n, r = 60, 40, 4
    gen = torch.Generator().manual_seed(seed)
    big = torch.linalg.qr(torch.randn(m if side == "left" else n, 2 * r, generator=gen)).Q
    old_dirs, new_dirs = big[:, :r], big[:, r:]
    other = torch.linalg.qr(torch.randn(n if side == "left" else m, r, generator=gen)).Q
    grad = (new_dirs * torch.tensor([10.0, 9.0, 8.0, 7.0])) @ other.t()
    grad = (grad if side == "left" else grad.t()) + 0.05 * torch.randn(m, n, generator=gen)
    u, _, vh = torch.linalg.svd(grad.double())
    top = u[:, :r] if side == "left" else vh[:r].t()
    state = {"proj_refreshes": 1, f"proj_{side}": old_dirs.contiguous()}
    angle = {}
    for p in (0, 2 * r):
        proj = make_projector("power", r, side, (m, n), oversample=p)
        basis = proj.basis({**state, **proj.refresh(state, grad)}, side)
        angle[p] = sin_angle(basis, top)
        torch.testing.assert_close(basis.t() @ basis, torch.eye(r), atol=1e-5, rtol=0)
    assert angle[2 * r] < 0.1 < angle[0] and angle[0] > 3 * angle[2 * r], angle


def test_oversample_is_clamped_and_seeded():
    proj = make_projector("power", 4, "left", (12, 6), oversample=100)  # at most min(m, n) - r = 2 extra
    grads = [torch.randn(12, 6, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    runs = []
    for _ in range(2):
        state = {"proj_refreshes": 0}
        for g in grads:
            state = {**state, **proj.refresh(state, g)}
        runs.append(state["proj_left"])
    assert runs[0].shape == (12, 4) and torch.equal(runs[0], runs[1])
