"""The 8-bit format in torch ops: the CPU path, and the reference the Triton kernels are checked against.

Tensors are processed in chunks of whole blocks so that every intermediate stays in cache, through scratch
buffers allocated once per call and in-place ops.  The arithmetic is the format's fp32 ops in a fixed order (plain
mul/add: no addcmul/lerp, whose fused forms round differently), so results do not depend on the chunk size, and the
kernels do the same ops.  Nearest codes come from the format's lookup table (:func:`format.code_table`): one shift,
two table reads and one comparison per element, equal to the binary search of the rounding rule.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch

from .format import BLOCK, CodeTable, code_table, dynamic_map, num_blocks, zero_code

# elements per chunk: on CPU small enough that a chunk's buffers stay in cache; elsewhere only bounds the scratch
CPU_CHUNK = 1 << 17
DEVICE_CHUNK = 1 << 22


@contextlib.contextmanager
def _serial(device: torch.device):
    """Run the chunk loop's CPU ops on the calling thread only: each op is small, so OpenMP's fork/join per op
    costs more than it saves, and stalls badly when the cores are shared (measured: 4M-element Adam step 60 ms
    serial vs 1.2 s with 2 threads on a busy 2-core machine).  The thread count is restored on exit."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Scratch:
    """Reusable buffers for one call, sized for the largest chunk."""

    def __init__(self, length: int, device: torch.device):
        def f32():
            return torch.empty(length, dtype=torch.float32, device=device)

        self.g, self.m, self.v, self.tmp, self.scaled, self.out = f32(), f32(), f32(), f32(), f32(), f32()
        self.index = torch.empty(length, dtype=torch.int32, device=device)
        self.low_code = torch.empty(length, dtype=torch.uint8, device=device)
        self.threshold = f32()
        self.above = torch.empty(length, dtype=torch.bool, device=device)
        self.codes = [torch.empty(length, dtype=torch.uint8, device=device) for _ in range(2)]
        self.denom = torch.empty(length // BLOCK, dtype=torch.float32, device=device)
        self.one = torch.ones((), dtype=torch.float32, device=device)


class _Chunk:
    """Elements [start, end) of a flat tensor, padded to ``length`` (whole blocks) when the last block is short."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.size = end - start
        self.length = num_blocks(self.size) * BLOCK
        self.full = self.size == self.length
        self.blocks = slice(start // BLOCK, start // BLOCK + self.length // BLOCK)

    def load(self, flat: torch.Tensor, buffer: torch.Tensor, pad) -> torch.Tensor:
        """``flat[start:end]`` as a tensor of ``length`` elements in buffer's dtype (a view when possible)."""
        part = flat[self.start : self.end]
        if self.full and part.dtype == buffer.dtype:
            return part
        buf = buffer[: self.length]
        buf[: self.size].copy_(part)
        buf[self.size :].fill_(pad)
        return buf

    def target(self, flat: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """Where to write this chunk of ``flat``: the slice itself, or a buffer to :meth:`store` afterwards."""
        return flat[self.start : self.end] if self.full else buffer[: self.length]

    def store(self, flat: torch.Tensor, written: torch.Tensor) -> None:
        if not self.full:
            flat[self.start : self.end].copy_(written[: self.size])


def _chunks(n: int, device: torch.device) -> Iterator[_Chunk]:
    step = CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK
    for start in range(0, n, step):
        yield _Chunk(start, min(start + step, n))


def _scratch(n: int, device: torch.device) -> _Scratch:
    step = CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK
    return _Scratch(min(step, num_blocks(n) * BLOCK), device)


def _round(scaled: torch.Tensor, table: CodeTable, out: torch.Tensor, s: _Scratch) -> None:
    """Nearest codes of fp32 ``scaled`` into uint8 ``out``: bucket = high bits of the fp32 pattern, then
    code = low_code[bucket] + (scaled >= threshold[bucket])."""
    n = scaled.numel()
    index, low, threshold, above = s.index[:n], s.low_code[:n], s.threshold[:n], s.above[:n]
    torch.bitwise_right_shift(scaled.view(torch.int32), table.shift, out=index)
    index.bitwise_and_((1 << (32 - table.shift)) - 1)  # the shift is arithmetic: drop the sign extension
    torch.index_select(table.low_code, 0, index, out=low)
    torch.index_select(table.threshold, 0, index, out=threshold)
    torch.ge(scaled, threshold, out=above)
    torch.add(low, above, out=out)


def _quantize_chunk(x: torch.Tensor, table: CodeTable, codes: torch.Tensor, absmax: torch.Tensor, s: _Scratch):
    """fp32 ``x`` (whole blocks) -> uint8 ``codes`` and fp32 ``absmax`` (written in place)."""
    nb = x.numel() // BLOCK
    scaled = s.scaled[: x.numel()]
    torch.abs(x, out=scaled)
    torch.amax(scaled.view(nb, BLOCK), dim=1, out=absmax)
    denom = s.denom[:nb]
    torch.where(absmax > 0, absmax, s.one, out=denom)  # all-zero blocks divide by 1 (0/0 would be NaN)
    torch.div(x.view(nb, BLOCK), denom.unsqueeze(1), out=scaled.view(nb, BLOCK))
    _round(scaled, table, codes, s)


def _dequantize_chunk(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, out: torch.Tensor, s: _Scratch):
    index = s.index[: codes.numel()]
    index.copy_(codes)
    torch.index_select(qmap, 0, index, out=out)
    out.view(-1, BLOCK).mul_(absmax.unsqueeze(1))


def quantize_blockwise_torch(x: torch.Tensor, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (uint8 codes shaped like x, fp32 absmax of shape [ceil(numel / 256)])."""
    n = x.numel()
    flat = x.reshape(-1)  # row-major order; copies a non-contiguous x
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n), dtype=torch.float32, device=x.device)
    if n:
        table, s = code_table(signed, x.device), _scratch(n, x.device)
        with _serial(x.device):
            for c in _chunks(n, x.device):
                out = c.target(codes, s.codes[0])
                _quantize_chunk(c.load(flat, s.g, 0.0), table, out, absmax[c.blocks], s)
                c.store(codes, out)
    return codes.view(x.shape), absmax


def dequantize_blockwise_torch(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """-> fp32 tensor shaped like codes."""
    n = codes.numel()
    flat = codes.reshape(-1)
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    if n:
        qmap, s, pad = dynamic_map(signed, codes.device), _scratch(n, codes.device), zero_code(signed)
        with _serial(codes.device):
            for c in _chunks(n, codes.device):
                dst = c.target(out, s.out)
                _dequantize_chunk(c.load(flat, s.codes[0], pad), absmax[c.blocks], qmap, dst, s)
                c.store(out, dst)
    return out.view(codes.shape)


def adam8bit_step_torch(
    grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps, col_norm_dim: Optional[int] = None
):
    """One Adam moment update on 8-bit state, in place (codes must be contiguous); returns
    ``direction = m / (sqrt(v) + eps)`` and, with ``col_norm_dim``, its L2 norms over that dim.
    Per chunk: m = deq(m) * beta1 + g * (1 - beta1); v = deq(v) * beta2 + g * g * (1 - beta2), then the
    direction from the unquantized m, v, then both are requantized with their new block absmax."""
    n, dev = grad.numel(), grad.device
    g_flat = grad.reshape(-1)
    direction = torch.empty(grad.shape, dtype=torch.float32, device=dev)
    d_flat, mc_flat, vc_flat = direction.view(-1), m_codes.view(-1), v_codes.view(-1)
    c1, c2 = 1.0 - beta1, 1.0 - beta2
    if n:
        smap, umap = dynamic_map(True, dev), dynamic_map(False, dev)
        stab, utab = code_table(True, dev), code_table(False, dev)
        s, zs, zu = _scratch(n, dev), zero_code(True), zero_code(False)
        with _serial(dev):
            for c in _chunks(n, dev):
                g = c.load(g_flat, s.g, 0.0)
                mc, vc = c.load(mc_flat, s.codes[0], zs), c.load(vc_flat, s.codes[1], zu)
                ma, va = m_absmax[c.blocks], v_absmax[c.blocks]
                m, v, tmp = s.m[: c.length], s.v[: c.length], s.tmp[: c.length]
                _dequantize_chunk(mc, ma, smap, m, s)
                m.mul_(beta1)
                torch.mul(g, c1, out=tmp)
                m.add_(tmp)
                _dequantize_chunk(vc, va, umap, v, s)
                v.mul_(beta2)
                torch.mul(g, g, out=tmp)
                tmp.mul_(c2)
                v.add_(tmp)
                if not c.full:  # padding lanes must not reach the last block's absmax (0 * inf would be NaN)
                    m[c.size :].zero_()
                    v[c.size :].zero_()
                d = c.target(d_flat, s.out)
                torch.sqrt(v, out=tmp)
                tmp.add_(eps)
                torch.div(m, tmp, out=d)
                c.store(d_flat, d)
                _quantize_chunk(m, stab, mc, ma, s)  # mc/vc are the state slices, or padded copies stored next
                _quantize_chunk(v, utab, vc, va, s)
                c.store(mc_flat, mc)
                c.store(vc_flat, vc)
    if col_norm_dim is None:
        return direction
    return direction, torch.linalg.vector_norm(direction, dim=col_norm_dim)


__all__ = ["quantize_blockwise_torch", "dequantize_blockwise_torch", "adam8bit_step_torch", "CPU_CHUNK"]
