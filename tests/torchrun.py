"""One way for the tests to start a multi-rank run: ``torchrun --standalone`` on this machine (gloo on CPU), one
torch thread per rank, the repository and ``tests/`` importable, Python tracebacks on a crash signal."""

import os
import subprocess
import sys
import warnings

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)

# A rank can die inside torch's C++ runtime at exit (std::terminate, no Python frame): about one launch in each CI
# run did, never the same one, and 40 launches of those runs here never showed it. Workers and benchmarks leave
# through ``benchmarks.cli.leave_process_group``; a launch that still dies so is run again, up to twice (its output
# kept in the warning): an exception, an assertion or a wrong number fails at once.
RUNTIME_ABORT = "terminate called without an active exception"
ATTEMPTS = 3


def launch(world: int, args, *, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments, or ``-m module ...``) on ``world`` ranks; fail with the run's
    output unless every rank exits 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *map(str, args)]
    path = os.pathsep.join(p for p in (REPO, TESTS, os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": path, **(env or {})}
    for attempt in range(1, ATTEMPTS + 1):
        done = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0 or RUNTIME_ABORT not in done.stderr or attempt == ATTEMPTS:
            break
        aborted = done.stderr[done.stderr.index(RUNTIME_ABORT) :][:3000]
        warnings.warn(f"a rank aborted in the C++ runtime; running again: {' '.join(cmd)}\n{aborted}", stacklevel=2)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    return done
