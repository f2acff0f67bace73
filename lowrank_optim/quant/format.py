"""The 8-bit state format, defined once; the torch path and the Triton kernels both import it.

  * A tensor is read in flat row-major order and cut into blocks of ``BLOCK`` = 256 elements (the last block may
    be short).  Each block stores its absmax in fp32; each element a uint8 code indexing a 256-entry "dynamic" map
    of values in [-1, 1] (signed, first moment) or [0, 1] (unsigned, second moment): value = map[code] * absmax.
  * The maps equal bitsandbytes' ``create_dynamic_map(signed=...)``.
  * Rounding: ``x / absmax`` (fp32 division) goes to the nearest map entry; lo = last entry <= x (0 if none),
    hi = lo + 1 (at most 255), and hi wins iff ``(map[hi] - x) < (x - map[lo])`` in fp32 (ties go to lo).
  * Tensors with fewer than ``MIN_8BIT_SIZE`` elements stay fp32 (see :func:`use_8bit`).

For speed on CPU the rounding rule is also tabulated (:func:`code_table`): the fp32 threshold at which each pair of
neighbouring codes switches is found exactly, once per map, and a table indexed by the high bits of the fp32 bit
pattern gives, per bucket of bit patterns, the lower candidate code and the one threshold inside the bucket.
"""

from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Tuple, Union

import torch

BLOCK = 256
MIN_8BIT_SIZE = 4096


def use_8bit(numel: int, min_size: int = MIN_8BIT_SIZE) -> bool:
    """Whether a state tensor with ``numel`` elements is stored in 8 bits (else fp32)."""
    return numel >= min_size


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def _canonical(device) -> torch.device:
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ----------------------------------------------------------------------------- maps
def _build_dynamic_map(signed: bool) -> torch.Tensor:
    """256 sorted fp32 values: 0, 1 and, for each decade 10^e (e = -6..0), the midpoints of an even grid over
    [0.1, 1] scaled by 10^e.  Finer decades get more points; the unsigned map spends the sign bit on twice as
    many points per decade.  Arithmetic is fp32, as in bitsandbytes."""
    values = [0.0, 1.0]
    for i in range(7):
        points = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, points + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        mags = mids * (10.0 ** (i - 6))
        values += mags.tolist()
        if signed:
            values += (-mags).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


_MAPS: Dict[Tuple[bool, torch.device], torch.Tensor] = {}


def dynamic_map(signed: bool, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The cached 256-entry fp32 map on ``device`` (shared: do not modify it)."""
    key = (bool(signed), _canonical(device))
    qmap = _MAPS.get(key)
    if qmap is None:
        qmap = _MAPS[key] = _build_dynamic_map(signed).to(key[1])
    return qmap


@functools.lru_cache(maxsize=None)
def zero_code(signed: bool) -> int:
    """The code of 0.0 in the map."""
    return int(torch.nonzero(dynamic_map(signed) == 0)[0])


def zero_state(shape, signed: bool, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes/absmax representing an all-zero tensor (initial Adam moments)."""
    numel = 1
    for s in shape:
        numel *= s
    codes = torch.full(tuple(shape), zero_code(signed), dtype=torch.uint8, device=device)
    return codes, torch.zeros(num_blocks(numel), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------- exact rounding thresholds
def _to_key(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64 key with the same order as the values (-0.0 and +0.0 share key 0)."""
    bits = x.view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_key(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key >= 0, key, (-key) | 0x80000000)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)  # two's complement int32
    return bits.to(torch.int32).view(torch.float32)


def _picks_hi(x: torch.Tensor, lo_val: torch.Tensor, hi_val: torch.Tensor) -> torch.Tensor:
    return (hi_val - x) < (x - lo_val)  # the rounding rule's comparison, in fp32


def switch_thresholds(qmap: torch.Tensor) -> torch.Tensor:
    """255 fp32 values t: t[i] is the smallest fp32 x in (map[i], map[i+1]] that rounds to code i + 1.  The rule's
    comparison is monotone in x (fp32 subtraction rounds monotonically), so code(x) = #{i : t[i] <= x} for every x
    that is not NaN; found by bisection over the ordered fp32 bit patterns."""
    qmap = qmap.detach().to("cpu", torch.float32)
    lo_val, hi_val = qmap[:-1], qmap[1:]
    below, above = _to_key(lo_val.clone()), _to_key(hi_val.clone())  # rounds to lo at `below`, to hi at `above`
    while bool((above - below > 1).any()):
        mid = (below + above) // 2
        hi = _picks_hi(_from_key(mid), lo_val, hi_val)
        above = torch.where(hi, mid, above)
        below = torch.where(hi, below, mid)
    return _from_key(above)


class CodeTable(NamedTuple):
    shift: int  # bucket = fp32 bits >> shift (as unsigned), 2 ** (32 - shift) buckets
    low_code: torch.Tensor  # uint8 [buckets]: the code of the bucket's smallest value
    threshold: torch.Tensor  # fp32 [buckets]: x >= threshold adds 1 (+inf when the bucket has one code)


def _build_code_table(thresholds: torch.Tensor, index_bits: int) -> CodeTable:
    shift = 32 - index_bits
    buckets = torch.arange(2**index_bits, dtype=torch.int64)
    first = _from_key_bits(buckets << shift)
    last = _from_key_bits((buckets << shift) | ((1 << shift) - 1))
    negative = buckets >= 2 ** (index_bits - 1)
    # within a bucket the value is monotone in the bit pattern: increasing for +, decreasing for -
    smallest, largest = torch.where(negative, last, first), torch.where(negative, first, last)
    low = torch.searchsorted(thresholds, smallest, right=True)
    high = torch.searchsorted(thresholds, largest, right=True)
    special = torch.isnan(smallest) | torch.isnan(largest) | torch.isinf(smallest) | torch.isinf(largest)
    if bool(((high - low > 1) & ~special).any()):
        raise ValueError(f"{index_bits} index bits put two code switches in one bucket")
    threshold = torch.where(high > low, thresholds[low.clamp(max=254)], torch.tensor(float("inf")))
    # inf/NaN buckets: x / absmax is never +-inf (|x| <= absmax), and NaN rounds to code 255 in the rule
    # (searchsorted puts NaN last and both comparisons are false)
    low = torch.where(special, torch.full_like(low, 255), low)
    threshold = torch.where(special, torch.tensor(float("inf")), threshold)
    return CodeTable(shift, low.to(torch.uint8), threshold.contiguous())


def _from_key_bits(bits: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns (int64) -> fp32 values."""
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


_TABLES: Dict[Tuple[bool, torch.device], CodeTable] = {}


def code_table(signed: bool, device=None) -> CodeTable:
    """The cached nearest-code lookup table of a map: the fewest index bits (from 12) with at most one code switch
    per bucket, checked when built."""
    key = (bool(signed), _canonical(device))
    table = _TABLES.get(key)
    if table is None:
        thresholds = switch_thresholds(dynamic_map(signed, "cpu"))
        for index_bits in range(12, 25):
            try:
                table = _build_code_table(thresholds, index_bits)
                break
            except ValueError:
                continue
        else:  # pragma: no cover - the maps are fixed; 24 bits always separate their switches
            raise RuntimeError("no lookup table separates the map's code switches")
        table = _TABLES[key] = CodeTable(table.shift, table.low_code.to(key[1]), table.threshold.to(key[1]))
    return table


__all__ = [
    "BLOCK",
    "MIN_8BIT_SIZE",
    "use_8bit",
    "num_blocks",
    "dynamic_map",
    "zero_code",
    "zero_state",
    "switch_thresholds",
    "CodeTable",
    "code_table",
]
