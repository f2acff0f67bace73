"""basis_bits: the int4 format round-trips within half a step, the 8-bit format is the project's blockwise one,
quantized bases are read back in fp32, their stored bytes equal expected_state_bytes, and the accuracy is bounded."""

import io
import math

import pytest
import torch

from lowrank_optim import quant
from lowrank_optim.projectors import make_projector
from lowrank_optim.projectors.basis_quant import (
    INT4_BLOCK,
    basis_bytes,
    decode_basis,
    dequantize_int4,
    encode_basis,
    quantize_int4,
)

MATRIX = ("svd", "rsvd", "power", "sst")
SIDES = ("left", "right", "full")


# --- int4 format --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("numel", [1, 63, 64, 65, 127, 1000])
def test_int4_round_trip_within_half_a_step(numel):
    x = torch.randn(numel) * torch.logspace(-3, 1, numel)  # blocks of very different scales
    packed, absmax = quantize_int4(x)
    assert packed.dtype == torch.uint8 and packed.shape == ((numel + 1) // 2,)
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(numel / INT4_BLOCK),)
    back = dequantize_int4(packed, absmax, (numel,))
    step = absmax.repeat_interleave(INT4_BLOCK)[:numel] / 7
    assert ((back - x).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()
    blocks = torch.nn.functional.pad(x.abs(), (0, absmax.numel() * INT4_BLOCK - numel)).view(-1, INT4_BLOCK)
    assert torch.equal(absmax, blocks.amax(dim=1))


def test_int4_layout_and_exact_levels():
    packed, absmax = quantize_int4(torch.tensor([1.0, -1.0, 0.0]))
    # q = 7, -7, 0 -> nibbles 15, 1, 8 (+ padding 8); the even index takes the low nibble
    assert packed.tolist() == [15 | (1 << 4), 8 | (8 << 4)] and absmax.tolist() == [1.0]
    levels = torch.arange(-7, 8, dtype=torch.float32) * 0.3 / 7  # every level of a block with absmax 0.3
    packed, absmax = quantize_int4(levels)
    assert torch.equal(dequantize_int4(packed, absmax, levels.shape), levels)
    packed, absmax = quantize_int4(torch.zeros(70))  # all-zero blocks: no division by zero, exact zeros
    assert torch.equal(dequantize_int4(packed, absmax, (70,)), torch.zeros(70))


def test_encode_decode_every_format():
    basis = torch.linalg.qr(torch.randn(50, 6)).Q
    assert torch.equal(decode_basis(encode_basis("proj_left", basis, 32), "proj_left", (50, 6)), basis)
    s8 = encode_basis("proj_left", basis, 8)
    codes, absmax = quant.quantize_blockwise(basis, signed=True)
    assert torch.equal(s8["proj_left_codes"], codes) and torch.equal(s8["proj_left_absmax"], absmax)
    assert torch.equal(decode_basis(s8, "proj_left", (50, 6)), quant.dequantize_blockwise(codes, absmax, True))
    s4 = encode_basis("proj_left", basis, 4)
    assert set(s4) == {"proj_left_int4", "proj_left_absmax"}
    assert torch.equal(decode_basis(s4, "proj_left", (50, 6)), dequantize_int4(*quantize_int4(basis), (50, 6)))
    for bits, st in ((32, {"proj_left": basis}), (8, s8), (4, s4)):
        assert basis_bytes(300, bits) == sum(v.numel() * v.element_size() for v in st.values())
    with pytest.raises(ValueError, match="basis_bits"):
        encode_basis("proj_left", basis, 16)


# --- projectors with quantized bases ------------------------------------------------------------------------------
def refreshed(proj, grad, state=None):
    state = dict(state or {"proj_refreshes": 0})
    state.update(proj.refresh(state, grad))
    return state


@pytest.mark.parametrize("name", MATRIX)
@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (37, 29)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_expected_state_bytes_equal_the_stored_bytes(name, bits, side, shape):
    proj = make_projector(name, 7, side, shape, basis_bits=bits)
    state = refreshed(proj, torch.randn(*shape))
    state = refreshed(proj, torch.randn(*shape), state)  # a second refresh (power's warm path)
    assert proj.state_bytes(state) == proj.expected_state_bytes()
    if bits < 32:
        assert not any(k in state for k in ("proj_left", "proj_right"))
    for which, size in proj.projected_dims():
        b = proj.basis(state, which)
        assert b.dtype == torch.float32 and b.shape == (size, 7)


@pytest.mark.parametrize("name", MATRIX)
@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.2)])
def test_quantized_basis_is_the_fp32_basis_rounded(name, bits, tol):
    grad = torch.randn(48, 32)
    full = make_projector(name, 6, "full", (48, 32), seed=1)
    low = make_projector(name, 6, "full", (48, 32), seed=1, basis_bits=bits)
    s32, sq = refreshed(full, grad), refreshed(low, grad)
    for which in ("left", "right"):
        exact = s32["proj_" + which]
        assert torch.equal(low.basis(sq, which), decode_basis(encode_basis("k", exact, bits), "k", exact.shape))
        assert (low.basis(sq, which) - exact).norm() / exact.norm() < tol
    other = torch.randn(6, 6)  # project / project_back use the dequantized basis
    bl, br = low.basis(sq, "left"), low.basis(sq, "right")
    torch.testing.assert_close(low.project(sq, grad), bl.t() @ grad @ br)
    torch.testing.assert_close(low.project_back(sq, other), bl @ other @ br.t())


@pytest.mark.parametrize("bits,bound", [(8, 0.02), (4, 0.16)])
def test_reconstruction_error_of_quantized_bases(bits, bound):
    """||P P^T G - P32 P32^T G|| / ||P32 P32^T G|| on low-rank-plus-noise gradients (measured ~0.011 for 8 bits,
    ~0.115 for 4 bits at every shape tried)."""
    gen = torch.Generator().manual_seed(0)
    m, n, r = 128, 96, 16
    u = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    grad = (u * torch.linspace(10, 1, r)) @ v.t() + 0.05 * torch.randn(m, n, generator=gen)
    for side in ("left", "right"):
        ref, low = (make_projector("svd", r, side, (m, n), basis_bits=b) for b in (32, bits))
        s_ref, s_low = refreshed(ref, grad), refreshed(low, grad)
        exact = ref.project_back(s_ref, ref.project(s_ref, grad))
        approx = low.project_back(s_low, low.project(s_low, grad))
        err = ((approx - exact).norm() / exact.norm()).item()
        assert bound / 4 < err < bound, err  # quantization really happened, and stayed within the bound


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_state_resumes_exactly_and_reads_after_an_option_change(bits):
    grad = torch.randn(40, 24)
    proj = make_projector("power", 5, "left", (40, 24), basis_bits=bits)
    state = refreshed(proj, grad)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = make_projector("power", 5, "left", (40, 24), basis_bits=bits)
    assert torch.equal(fresh.project(loaded, grad), proj.project(state, grad))
    assert torch.equal(fresh.refresh(loaded, grad)["proj_left_absmax"], proj.refresh(state, grad)["proj_left_absmax"])
    # stored format decides how it is read: an fp32 projector reads the quantized state until its next refresh
    plain = make_projector("power", 5, "left", (40, 24))
    assert torch.equal(plain.basis(loaded, "left"), proj.basis(state, "left"))
    assert "proj_left" in plain.refresh(loaded, grad)


@pytest.mark.parametrize("bad", [16, 0, 8.0, "8", True])
def test_basis_bits_is_checked(bad):
    with pytest.raises(ValueError, match="basis_bits"):
        make_projector("svd", 4, "left", (30, 20), basis_bits=bad)
