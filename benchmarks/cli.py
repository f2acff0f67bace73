"""Command-line plumbing shared by the benchmark entry points: one-line user errors with exit status 2,
argument checks that run before any expensive work, and which flags the user gave explicitly."""

import argparse
import functools
import math
import os
import sys

USAGE_EXIT = 2  # the user asked for something impossible (argparse's own status for bad flags)
DIVERGED_EXIT = 3  # training produced a non-finite loss


class UsageError(Exception):
    """A mistake in the command line or its inputs; reported as one line, exit status 2."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; reported as one line, exit status 3."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `PROG: error: MESSAGE` (argparse would print the whole usage first)."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT)


def entry_point(prog):
    """Decorate `main(argv=None)`: UsageError -> one stderr line + SystemExit(2), TrainingDiverged -> exit 3.
    Other exceptions are bugs and keep their traceback."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            try:
                return main(argv)
            except UsageError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                raise SystemExit(USAGE_EXIT) from None
            except TrainingDiverged as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                raise SystemExit(DIVERGED_EXIT) from None

        return run

    return wrap


def leave_process_group():
    """End a torchrun process whose work is done: every rank meets, closes its process group and leaves without
    the interpreter's teardown. torch's distributed runtime can abort in a C++ destructor at exit (SIGABRT,
    "terminate called without an active exception", no Python frame) after all work has finished, which would turn
    a finished run into a failed launch. Nothing to do without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # every rank done with its last collective before any closes its connections
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def publish(text, output=None):
    """Print a report and, given ``output``, write it there too (one trailing newline)."""
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text.rstrip("\n") + "\n")


def explicit_dests(parser, argv):
    """Destinations the user set on the command line (also `--flag=value` and abbreviations): the parser is
    re-run with every default suppressed, so only given options land in the namespace."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        ns, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(ns))


# ---------------------------------------------------------------- value checks


def check_number(name, value, low=None, high=None, low_open=False, high_open=False, allow_none=False):
    """Raise UsageError unless `value` is a finite number within [low, high] (open ends where asked)."""
    if value is None:
        if allow_none:
            return
        raise UsageError(f"{name} is required")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        rng = (
            f"in {lo}, {hi}"
            if low is not None and high is not None
            else (
                f"{'>' if low_open else '>='} {low:g}" if low is not None else f"{'<' if high_open else '<='} {high:g}"
            )
        )
        raise UsageError(f"{name} must be {rng}, got {value:g}")


def check_writable_dir(flag, path):
    """Create `path` if needed and prove it writable by creating and removing a file in it."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: not a writable directory ({e.strerror or e})") from None


def parse_int_list(flag, text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma separated integers") from None
    if not values:
        raise UsageError(f"{flag} {text!r}: give at least one value")
    return values
