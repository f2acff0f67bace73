"""The optimizers the step benchmark times (ours and the peers), and the optimizer-step measurement."""

from __future__ import annotations

import importlib
import statistics
import sys
import warnings
from collections import OrderedDict

import torch

from .timing import median_ms, time_steps

BASELINE = "adamw_foreach"
# Ours: (module, class, extra low-rank group keys). Each takes the shared group keys rank + update_proj_gap.
OURS = OrderedDict(
    [
        ("galore", ("lowrank_optim.galore", "GaLoreAdamW", dict(scale=0.25, proj_type="std"))),
        ("galore_8bit", ("lowrank_optim.galore", "GaLoreAdamW8bit", dict(scale=0.25, proj_type="std"))),
        ("galore_adafactor", ("lowrank_optim.galore", "GaLoreAdafactor", dict(scale=0.25, proj_type="std"))),
        ("fira", ("lowrank_optim.fira", "FiraAdamW", dict(scale=0.25, proj_type="std"))),
        ("frugal", ("lowrank_optim.frugal", "FrugalAdamW", {})),
        ("dct", ("lowrank_optim.dct", "DCTAdamW", {})),
        ("sst", ("lowrank_optim.sst", "SSTAdamW", {})),
        ("galore_power", ("lowrank_optim.galore", "GaLoreAdamW", dict(scale=0.25, proj_type="std", projector="power"))),
        ("apollo", ("lowrank_optim.apollo", "APOLLOAdamW", dict(scale=1.0, proj_type="std"))),
        ("apollo_mini", ("lowrank_optim.apollo", "APOLLOMiniAdamW", dict(rank=1, proj_type="std"))),
    ]
)
# Methods whose projector our --projector flag may replace (the others have their own: columns, dct, sst).
SVD_BASED_OURS = ("galore", "galore_8bit", "galore_adafactor", "fira")
METHODS = ["adamw_foreach", "adamw_fused", "bnb_adamw8bit", "ref_galore", "ref_fira", *OURS]
LABELS = {
    "adamw_foreach": "torch AdamW (foreach)",
    "adamw_fused": "torch AdamW (fused)",
    "bnb_adamw8bit": "bitsandbytes AdamW8bit",
    "ref_galore": "galore-torch GaLoreAdamW",
    "ref_fira": "fira FiraAdamW",
    "galore": "ours GaLoreAdamW",
    "galore_8bit": "ours GaLoreAdamW8bit",
    "galore_adafactor": "ours GaLoreAdafactor",
    "fira": "ours FiraAdamW",
    "frugal": "ours FrugalAdamW",
    "dct": "ours DCTAdamW",
    "sst": "ours SSTAdamW",
    "galore_power": "ours GaLoreAdamW, power projector",
    "apollo": "ours APOLLOAdamW",
    "apollo_mini": "ours APOLLOMiniAdamW (rank 1)",
    "ours_dense": "ours, dense group only",
    "ours_dense_unchecked": "ours, dense group only, nonfinite='off'",
}


def _groups(dense, low, lowrank_keys):
    groups = [{"params": dense}] if dense else []
    if low:
        groups.append({"params": low, **lowrank_keys})
    return groups


def build(method, dense, low, args, gap):
    """The optimizer `method` over (dense, low-rank) params; low-rank groups refresh every `gap` steps."""
    lr = args.lr
    if method in ("adamw_foreach", "adamw_fused"):
        return torch.optim.AdamW(
            dense + low, lr=lr, foreach=method == "adamw_foreach", fused=True if method == "adamw_fused" else None
        )
    if method == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(dense + low, lr=lr)
    keys = dict(rank=args.rank, update_proj_gap=gap)
    if method == "ref_galore":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(
            _groups(dense, low, dict(keys, scale=0.25, proj_type="std")), lr=lr, no_deprecation_warning=True
        )
    if method == "ref_fira":
        from fira import FiraAdamW

        return FiraAdamW(
            _groups(dense, low, dict(keys, alpha=0.25, proj_type="std")), lr=lr, no_deprecation_warning=True
        )
    if method in ("ours_dense", "ours_dense_unchecked"):  # our engine with one plain group: its dense AdamW path
        from lowrank_optim import LowRankOptimizer

        # unchecked: no read of every gradient for the all-or-nothing non-finite check (torch's AdamW makes none)
        return LowRankOptimizer([{"params": dense + low}], lr=lr, nonfinite="off" if "unchecked" in method else "skip")
    module, cls_name, extra = OURS[method]
    cls = getattr(importlib.import_module(module), cls_name)
    keys.update(extra)
    if args.projector and method in SVD_BASED_OURS:
        keys["projector"] = args.projector
    kw = {} if method == "galore_adafactor" else {"lr": lr}  # Adafactor keeps its relative-step schedule
    return cls(_groups(dense, low, keys), **kw)


def state_bytes(opt):
    from ..optimizers import state_bytes as count

    return count(opt)


def lowrank_method(method):
    return method not in ("adamw_foreach", "adamw_fused", "bnb_adamw8bit", "ours_dense", "ours_dense_unchecked")


def measure(bench, method, args):
    """One row of table 1 (times in ms), or a row with a `note` when the method cannot run here."""
    row = {"method": method, "label": LABELS[method]}
    dense, low = bench.params()
    probe_gap = args.warmup + args.iters
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation / dense-fallback warnings, once per optimizer
            opt = build(method, dense, low, args, probe_gap)
            has_refresh = lowrank_method(method) and bool(low)
            times = time_steps(opt, probe_gap + (1 if has_refresh and args.refresh_sample else 0), bench.device)
    except Exception as err:  # an import failure, or a mode this torch / device does not support
        row["note"] = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        print(f"[step_bench] {method}: {row['note']}", file=sys.stderr)
        return row
    plain = times[args.warmup : probe_gap]
    refresh = times[probe_gap:]
    row["step_ms"] = median_ms(plain)
    if refresh:
        row["refresh_step_ms"] = 1e3 * refresh[0]
        gap = args.update_proj_gap
        row["amortised_ms"] = ((gap - 1) * row["step_ms"] + row["refresh_step_ms"]) / gap
        if args.include_refresh:  # the mean keeps the refresh step visible (a median would drop it)
            row["step_ms"] = 1e3 * statistics.mean(plain + refresh)
    else:
        row["amortised_ms"] = row["step_ms"]
    row["state_bytes"] = state_bytes(opt)
    if method.endswith("8bit"):
        row["backend"] = resolved_backend(bench.device) if method == "galore_8bit" else "bitsandbytes"
    del opt
    return row


def add_ratios(rows, baseline=BASELINE):
    """step / bytes ratios against the baseline row of the SAME run (None when the baseline did not run)."""
    base = next((r for r in rows if r["method"] == baseline and "step_ms" in r), None)
    for r in rows:
        ok = base is not None and "step_ms" in r
        r["step_vs_adamw"] = r["step_ms"] / base["step_ms"] if ok else None
        r["amortised_vs_adamw"] = r["amortised_ms"] / base["step_ms"] if ok else None
        r["bytes_vs_adamw"] = r["state_bytes"] / base["state_bytes"] if ok and base["state_bytes"] else None
    return rows


def resolved_backend(device):
    """Which backend our 8-bit path uses for tensors on `device` ("auto" resolves per tensor)."""
    from lowrank_optim import quant

    chosen = quant.get_backend()
    if chosen != "auto":
        return chosen
    if device.type != "cuda":
        return "torch"
    from lowrank_optim.kernels import triton_available

    return "triton" if triton_available() else "torch"
