"""The fast torch path (lookup table, chunks, in-place ops) gives codes, absmax and directions identical to the
straightforward implementation of the format: a binary search (searchsorted) for the nearest code and whole-tensor
ops, kept here as the slow reference."""

import pytest
import torch
import torch.nn.functional as F

from lowrank_optim.quant import format as fmt
from lowrank_optim.quant import torch_path


# ----------------------------------------------------------------------------- slow reference
def ref_nearest_code(scaled, qmap):
    lo = torch.searchsorted(qmap, scaled, right=True).sub_(1).clamp_(0, 255)
    hi = (lo + 1).clamp_(max=255)
    pick_hi = (qmap[hi] - scaled) < (scaled - qmap[lo])
    return torch.where(pick_hi, hi, lo).to(torch.uint8)


def ref_quantize(x, signed):
    n = x.numel()
    nb = fmt.num_blocks(n)
    flat = x.reshape(-1).float()
    blocks = F.pad(flat, (0, nb * fmt.BLOCK - n)).view(nb, fmt.BLOCK)
    absmax = blocks.abs().amax(dim=1) if nb else flat.new_zeros(0)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    codes = ref_nearest_code(scaled, fmt.dynamic_map(signed))
    return codes.view(-1)[:n].view(x.shape), absmax


def ref_dequantize(codes, absmax, signed):
    flat = fmt.dynamic_map(signed).index_select(0, codes.reshape(-1).int())
    return (flat * absmax.repeat_interleave(fmt.BLOCK)[: flat.numel()]).view(codes.shape)


def ref_adam(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps):
    g = grad.float()
    m = ref_dequantize(m_codes, m_absmax, True) * beta1 + g * (1.0 - beta1)
    v = ref_dequantize(v_codes, v_absmax, False) * beta2 + g * g * (1.0 - beta2)
    direction = m / (torch.sqrt(v) + eps)
    for state, codes, absmax, signed in ((m, m_codes, m_absmax, True), (v, v_codes, v_absmax, False)):
        new_codes, new_absmax = ref_quantize(state, signed)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)
    return direction


# ----------------------------------------------------------------------------- inputs
def _round_codes(scaled, signed):
    """The fast path's rounding alone, on arbitrary fp32 values."""
    out = torch.empty(scaled.numel(), dtype=torch.uint8)
    torch_path._round(scaled.contiguous(), fmt.code_table(signed), out, torch_path._Scratch(scaled.numel(), "cpu"))
    return out


def _neighbours(t):
    return torch.cat([t, torch.nextafter(t, torch.full_like(t, -3.0)), torch.nextafter(t, torch.full_like(t, 3.0))])


def _special_values():
    tiny = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 3e-42, -3e-42, 1.17e-38, -1.17e-38, 1e-30, -1e-30])
    return torch.cat([tiny, torch.tensor([float("nan"), -float("nan")])])


@pytest.mark.parametrize("signed", [True, False])
def test_rounding_identical_on_edges(signed):
    qmap = fmt.dynamic_map(signed)
    switches = fmt.switch_thresholds(qmap)
    mids = (qmap[:-1] + qmap[1:]) / 2  # exact fp32 midpoints: ties must go to the lower code
    x = torch.cat([_neighbours(qmap), _neighbours(switches), _neighbours(mids), _special_values()])
    assert torch.equal(_round_codes(x, signed), ref_nearest_code(x, qmap))
    # the switch points really are where the code changes
    assert torch.equal(ref_nearest_code(switches, qmap).long(), torch.arange(1, 256))
    below = torch.nextafter(switches, torch.full_like(switches, -3.0))
    assert torch.equal(ref_nearest_code(below, qmap).long(), torch.arange(0, 255))


@pytest.mark.parametrize("signed", [True, False])
def test_rounding_identical_on_random_scales(signed):
    gen = torch.Generator().manual_seed(1)
    n = 400_000
    x = (torch.rand(n, generator=gen) * 2 - 1) * 10.0 ** torch.empty(n).uniform_(-12, 0, generator=gen)
    x = torch.cat([x, torch.rand(n // 4, generator=gen) * 2 - 1])  # dense in the top decades
    assert torch.equal(_round_codes(x, signed), ref_nearest_code(x, fmt.dynamic_map(signed)))


@pytest.mark.parametrize("signed", [True, False])
def test_table_has_one_switch_per_bucket(signed):
    table = fmt.code_table(signed)
    buckets = table.low_code.numel()
    assert buckets == 2 ** (32 - table.shift) and table.threshold.shape == (buckets,)
    switches = fmt.switch_thresholds(fmt.dynamic_map(signed))
    # every switch lies in a distinct bucket, whose threshold is that switch, unless the switch is the bucket's
    # smallest value (then the whole bucket has the upper code)
    index = (switches.view(torch.int32).long() & 0xFFFFFFFF) >> table.shift
    assert index.unique().numel() == 255
    at_switch = table.threshold[index] == switches
    whole_bucket = table.threshold[index].isinf() & (table.low_code[index].long() == torch.arange(1, 256))
    assert bool((at_switch | whole_bucket).all()) and int(at_switch.sum()) > 200


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 5000, 3 * torch_path.CPU_CHUNK + 300])
def test_quantize_dequantize_identical(signed, n, monkeypatch):
    monkeypatch.setattr(torch_path, "CPU_CHUNK", 4096)  # many chunks, and a short last chunk
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * 10.0 ** torch.empty(n).uniform_(-9, 2, generator=gen)
    x = x if signed else x.abs()
    if n > 2 * fmt.BLOCK:
        x[fmt.BLOCK : 2 * fmt.BLOCK] = 0.0  # all-zero block
        x[2 * fmt.BLOCK + 3] = 1e-44  # a denormal
    codes, absmax = torch_path.quantize_blockwise_torch(x, signed)
    ref_codes, ref_absmax = ref_quantize(x, signed)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    assert torch.equal(
        torch_path.dequantize_blockwise_torch(codes, absmax, signed), ref_dequantize(codes, absmax, signed)
    )


def test_quantize_identical_for_strided_half_and_non_finite_input():
    x = torch.randn(70, 300).T  # non-contiguous: blocks follow row-major order of the view
    assert all(torch.equal(a, b) for a, b in zip(torch_path.quantize_blockwise_torch(x, True), ref_quantize(x, True)))
    h = torch.randn(3000).half()
    assert all(torch.equal(a, b) for a, b in zip(torch_path.quantize_blockwise_torch(h, True), ref_quantize(h, True)))
    y = torch.randn(1000)
    y[5], y[600], y[900] = float("nan"), float("inf"), -float("inf")
    codes, absmax = torch_path.quantize_blockwise_torch(y, True)
    ref_codes, ref_absmax = ref_quantize(y, True)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax.isnan(), ref_absmax.isnan())


@pytest.mark.parametrize("shape", [(300,), (64, 100), (37, 1000)])
def test_adam_step_identical(shape, monkeypatch):
    monkeypatch.setattr(torch_path, "CPU_CHUNK", 8192)
    gen = torch.Generator().manual_seed(3)
    state = [*fmt.zero_state(shape, True), *fmt.zero_state(shape, False)]
    ref_state = [t.clone() for t in state]
    for step in range(4):
        g = torch.randn(shape, generator=gen) * 10.0 ** (step - 2)
        if step == 3:
            g = g.bfloat16()
        d = torch_path.adam8bit_step_torch(g, *state, 0.9, 0.999, 1e-8)
        ref_d = ref_adam(g, *ref_state, 0.9, 0.999, 1e-8)
        assert torch.equal(d, ref_d)
        assert all(torch.equal(a, b) for a, b in zip(state, ref_state))
    d, norms = torch_path.adam8bit_step_torch(g.float(), *state, 0.9, 0.999, 1e-8, col_norm_dim=len(shape) - 1)
    assert torch.equal(norms, torch.linalg.vector_norm(d, dim=len(shape) - 1))


def test_serial_section_restores_thread_count():
    before = torch.get_num_threads()
    torch_path.quantize_blockwise_torch(torch.randn(10_000), True)
    assert torch.get_num_threads() == before
