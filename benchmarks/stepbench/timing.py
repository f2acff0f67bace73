"""Timing helpers of the step benchmark: device sync, medians, fixed weights and gradients, the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import OrderedDict

import torch

from .shapes import is_target


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(times):
    return 1e3 * statistics.median(times) if times else None


class Bench:
    """Weights and fixed random gradients on `device`; each optimizer gets fresh copies of the same weights."""

    def __init__(self, shapes, device, seed):
        self.shapes, self.device = shapes, device
        gen = torch.Generator().manual_seed(seed)
        self.weights = OrderedDict((n, (torch.randn(s, generator=gen) * 0.02).to(device)) for n, s in shapes.items())
        self.grads = OrderedDict((n, torch.randn(s, generator=gen).to(device)) for n, s in shapes.items())

    def params(self):
        """(dense, low-rank) fresh parameter lists with .grad set (the gradient tensors are shared, read-only)."""
        dense, low = [], []
        for name, w in self.weights.items():
            p = torch.nn.Parameter(w.clone())
            p.grad = self.grads[name]
            (low if is_target(name, w.shape) else dense).append(p)
        return dense, low


def time_steps(opt, steps, device):
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _wall_ms(fn, reps=3, best=False):
    """Median wall time (CPU / Triton interpreter fallback for tests; CUDA uses triton.testing.do_bench); ``best``:
    the fastest run instead, for a floor (a shared machine only ever slows a run down)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times) if best else median_ms(times)


def _cuda_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def machine_info(device):
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
    }
    try:
        load = os.getloadavg()
        info["loadavg_1_5_15"] = [round(x, 2) for x in load]
    except OSError:
        pass
    return info
