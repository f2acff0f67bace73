"""Tables 3 and 4 of the step benchmark: fp32 vs 8-bit states, and the Triton kernels' time and bandwidth."""

from __future__ import annotations

import torch

from .optimizers import LABELS, measure, resolved_backend
from .shapes import is_target, lowrank_side
from .timing import _cuda_ms, _wall_ms

# Peak HBM bandwidth in GB/s by device-name substring; the first match wins, so specific names come first.
PEAK_GBPS = [
    ("H100 PCIe", 2000),
    ("H100 NVL", 3900),
    ("H100", 3350),
    ("H200", 4800),
    ("GH200", 4000),
    ("B200", 8000),
    ("A100-SXM4-80GB", 2039),
    ("A100 80GB PCIe", 1935),
    ("A100", 1555),
    ("L40S", 864),
    ("L40", 864),
    ("A10G", 600),
    ("A10", 600),
    ("L4", 300),
    ("V100", 900),
    ("T4", 320),
    ("RTX 4090", 1008),
    ("RTX 3090", 936),
]


def bits_rows(bench, args, table1):
    """Our GaLoreAdamW with fp32 vs 8-bit states, taken from table 1; on CUDA the 8-bit path is also measured with
    the backend table 1 did not use (auto picks Triton there), so both torch and Triton appear."""
    from lowrank_optim import quant

    by = {r["method"]: r for r in table1}
    rows = []
    if "galore" in by:
        rows.append(dict(by["galore"], state_bits=32, backend="-"))
    if "galore_8bit" in by:
        used = by["galore_8bit"].get("backend", resolved_backend(bench.device))
        rows.append(dict(by["galore_8bit"], state_bits=8, backend=used))
        if bench.device.type == "cuda" and "step_ms" in by["galore_8bit"]:
            other = "torch" if used == "triton" else "triton"
            previous = quant.get_backend()
            try:
                quant.set_backend(other)
                rows.append(dict(measure(bench, "galore_8bit", args), state_bits=8, backend=other))
            finally:
                quant.set_backend(previous)
        else:
            rows.append(
                {
                    "method": "galore_8bit",
                    "label": LABELS["galore_8bit"],
                    "state_bits": 8,
                    "backend": "triton",
                    "note": "needs CUDA (on CPU Triton only runs in its interpreter)",
                }
            )
    ref = next((r for r in rows if r["state_bits"] == 32 and "step_ms" in r), None)
    for r in rows:
        ok = ref is not None and "step_ms" in r
        r["step_vs_fp32"] = r["step_ms"] / ref["step_ms"] if ok else None
        r["bytes_vs_fp32"] = r["state_bytes"] / ref["state_bytes"] if ok else None
    return rows


def peak_gbps(device_name):
    return next((gbps for key, gbps in PEAK_GBPS if key.lower() in device_name.lower()), None)


def kernel_rows(shapes, rank, device, peak, timer=None):
    """Each Triton kernel (next to its torch reference) on the low-rank state / weight tensors of each distinct
    target shape: ms, achieved GB/s (bytes the kernel must move / time) and the fraction of `peak` GB/s."""
    from lowrank_optim import quant
    from lowrank_optim.kernels import adam8bit, projection, quant8

    timer = timer or (_cuda_ms if device.type == "cuda" else _wall_ms)
    rows = []

    def add(kernel, shape, nbytes, triton_fn, torch_fn, note=""):
        t_ms = timer(triton_fn)
        ref_ms = timer(torch_fn) if torch_fn else None
        gbps = nbytes / (t_ms * 1e-3) / 1e9
        rows.append(
            {
                "kernel": kernel,
                "shape": list(shape),
                "bytes": nbytes,
                "ms": t_ms,
                "gbps": gbps,
                "peak_frac": gbps / peak if peak else None,
                "torch_ms": ref_ms,
                "speedup_vs_torch": ref_ms / t_ms if ref_ms else None,
                "note": note,
            }
        )

    gen = torch.Generator(device="cpu").manual_seed(0)
    distinct = sorted({tuple(s) for n, s in shapes.items() if is_target(n, s) and min(s) > rank})
    for m, n in distinct:
        side = lowrank_side((m, n))
        low_shape = (m, rank) if side == "right" else (rank, n)
        N = low_shape[0] * low_shape[1]
        nb = quant.num_blocks(N)
        x = torch.randn(low_shape, generator=gen).to(device)
        codes, absmax = quant.quantize_blockwise_torch(x, True)
        add(
            "quantize_blockwise",
            low_shape,
            4 * N + N + 4 * nb,
            lambda: quant8.quantize_blockwise_triton(x, True),
            lambda: quant.quantize_blockwise_torch(x, True),
        )
        add(
            "dequantize_blockwise",
            low_shape,
            N + 4 * nb + 4 * N,
            lambda: quant8.dequantize_blockwise_triton(codes, absmax, True),
            lambda: quant.dequantize_blockwise_torch(codes, absmax, True),
        )
        g = torch.randn(low_shape, generator=gen).to(device)
        state = [
            t.clone() for t in (*quant.zero_state(low_shape, True, device), *quant.zero_state(low_shape, False, device))
        ]
        # reads g + 2 code tensors + 2 absmax, writes them back + the fp32 direction
        add(
            "adam8bit_step",
            low_shape,
            4 * N + 2 * (2 * N + 8 * nb) + 4 * N,
            lambda: adam8bit.adam8bit_step_triton(g, *state, 0.9, 0.999, 1e-8),
            lambda: quant.adam8bit_step_torch(g, *state, 0.9, 0.999, 1e-8),
        )
        # projection kernels with an index-based basis (DCT / columns): B is d x d, r rows gathered
        d = n if side == "right" else m
        G = torch.randn(m, n, generator=gen).to(device)
        B = torch.randn(d, d, generator=gen).to(device)
        idx = torch.randperm(d, generator=gen)[:rank].sort().values.to(device)
        low = torch.randn(low_shape, generator=gen).to(device)
        W = torch.randn(m, n, generator=gen).to(device)
        add(
            "project_rows",
            (m, n),
            4 * m * n + 4 * rank * d + 4 * N,
            lambda: projection.project_rows_triton(G, B, idx, side),
            lambda: projection.project_rows_torch(G, B, idx, side),
        )
        add(
            "project_back_apply",
            (m, n),
            8 * m * n + 4 * N + 4 * rank * d,
            lambda: projection.project_back_apply_triton(W, low, B, idx, side, 1e-9, 0.0, 0.25),
            lambda: projection.project_back_apply_torch(W, low, B, idx, side, 1e-9, 0.0, 0.25),
            note="W updated in place (lr 1e-9)",
        )
        P = torch.linalg.qr(torch.randn(d, rank, generator=gen)).Q.to(device)
        add(
            "project_back_apply_dense",
            (m, n),
            8 * m * n + 4 * N + 4 * rank * d,
            lambda: projection.project_back_apply_dense_triton(W, low, P, side, 1e-9, 0.0, 0.25),
            lambda: projection.project_back_apply_dense_torch(W, low, P, side, 1e-9, 0.0, 0.25),
            note="W updated in place (lr 1e-9)",
        )
        rows.append(_vs_bnb(low_shape, g, state, device, timer))
    return rows


def _vs_bnb(shape, g, state, device, timer):
    """Our fused 8-bit Adam moment update (Triton) vs bitsandbytes AdamW8bit.step() on a parameter of the same
    shape and gradient. Both use 256-element blocks with dynamic maps; bnb also writes the parameter."""
    from lowrank_optim.kernels import adam8bit

    row = {"kernel": "adam8bit_step vs bnb AdamW8bit", "shape": list(shape)}
    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.randn(shape, device=device))
        p.grad = g
        opt = bnb.optim.AdamW8bit([p], lr=1e-9, min_8bit_size=0)
        opt.step()  # creates the 8-bit state
        ours = timer(lambda: adam8bit.adam8bit_step_triton(g, *state, 0.9, 0.999, 1e-8))
        theirs = timer(opt.step)
        row.update(
            ms=ours,
            bnb_ms=theirs,
            speedup_vs_bnb=theirs / ours,
            note="ours: moments + direction; bnb: moments + parameter update",
        )
    except Exception as err:
        row["note"] = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return row
