"""Table 2 of the step benchmark: projector refresh time per distinct low-rank weight shape."""

from __future__ import annotations

import sys
import time
from collections import OrderedDict

from .shapes import is_target, lowrank_side
from .timing import median_ms, sync

PROJECTOR_NAMES = ("svd", "rsvd", "dct", "random", "columns", "sst")


def refresh_rows(bench, args):
    from lowrank_optim.projectors import make_projector

    counts = OrderedDict()
    for name, shape in bench.shapes.items():
        if is_target(name, shape) and min(shape) > args.rank:
            counts[shape] = counts.get(shape, 0) + 1
    rows = []
    for shape, count in counts.items():
        side = lowrank_side(shape)
        grad = bench.grads[next(n for n, s in bench.shapes.items() if s == shape)]
        shape_rows = []
        for pname in args.projectors:
            row = {"shape": list(shape), "side": side, "count": count, "projector": pname}
            try:
                proj = make_projector(pname, args.rank, side, shape, seed=0)
                state, times = {}, []
                while len(times) < args.refresh_iters:
                    sync(bench.device)
                    t0 = time.perf_counter()
                    state.update(proj.refresh(state, grad))  # steady state: later refreshes see earlier ones
                    sync(bench.device)
                    dt = time.perf_counter() - t0
                    # the first call builds caches (DCT matrix, ...); one slower than 1 s is its own warm-up
                    if "warm" in row or dt > 1.0:
                        times.append(dt)
                    row["warm"] = True
                row.pop("warm")
                row["refresh_ms"] = median_ms(times)
            except Exception as err:
                row.pop("warm", None)
                row["note"] = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                print(f"[step_bench] projector {pname} {shape}: {row['note']}", file=sys.stderr)
            shape_rows.append(row)
        svd = next((r.get("refresh_ms") for r in shape_rows if r["projector"] == "svd"), None)
        for r in shape_rows:
            r["vs_svd"] = r["refresh_ms"] / svd if svd and r.get("refresh_ms") else None
        rows += shape_rows
    return rows
