"""Declared options: every part (projector, inner rule, residual rule, route) says which group keys it reads, with a
default, a check and a one-line doc. The engine validates a group by asking the parts the group selects, and the
README's option tables are generated from the same declarations (``option_table``)."""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import torch

Check = Callable[[Any], Optional[str]]  # returns None when the value is valid, else what a valid value is


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    check: Check
    doc: str


def _real(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.dtype.is_complex and x.dtype != torch.bool
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _value(x) -> float:
    return float(x.detach().cpu()) if isinstance(x, torch.Tensor) else float(x)


def number(
    lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False, none_ok: bool = False
) -> Check:
    """A finite real number in [lo, hi] (open ends when asked); a one-element tensor counts as a number."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    want = f"a finite number in {left}{lo}, {hi}{right}" + (" or None" if none_ok else "")

    def check(x):
        if x is None and none_ok:
            return None
        if not _real(x):
            return want
        v = _value(x)
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            return want
        return None

    return check


def integer(lo: int = -(2**63), none_ok: bool = False) -> Check:
    want = f"an int >= {lo}" + (" or None" if none_ok else "")

    def check(x):
        if x is None and none_ok:
            return None
        if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < lo:
            return want
        return None

    return check


def choice(*values) -> Check:
    def check(x):
        return None if any(x == v and type(x) is type(v) for v in values) else f"valid: {list(values)}"

    return check


def boolean(x) -> Optional[str]:
    return None if isinstance(x, bool) else "True or False"


def pair(item: Check) -> Check:
    def check(x):
        if not (isinstance(x, (tuple, list)) and len(x) == 2) or any(item(v) for v in x):
            return f"a pair of {item(None) or 'values'}"
        return None

    return check


def anything(x) -> Optional[str]:
    return None


class OptionError(ValueError, TypeError):
    """A bad option key or value, raised before any state changes (a TypeError too, like an unexpected keyword
    argument, for options given to a constructor)."""


def check_values(group: Mapping, options: Iterable[Option], where: str) -> None:
    for opt in options:
        if opt.name in group:
            why = opt.check(group[opt.name])
            if why is not None:
                detail = f"; {why}" if why.startswith("valid:") else f" (must be {why})"
                raise OptionError(f"{where}: invalid {opt.name} {group[opt.name]!r}{detail}")


def check_keys(
    keys: Iterable[str],
    selected: Mapping[str, str],
    known: Mapping[str, str],
    where: str,
    passthrough: Sequence[str] = (),
) -> None:
    """Refuse a key that belongs to a part the group does not select, or that is a close misspelling of an option.

    ``selected``: option name -> owner for the parts this group uses; ``known``: the same for every registered part.
    Other keys (``name``, a logger's tags) pass through, as torch allows."""
    for key in keys:
        if key in selected or key in passthrough or key == "params":
            continue
        if key in known:
            raise OptionError(f"{where}: option {key!r} belongs to {known[key]}, which this group does not use")
        close = likely_option(key, known)
        if close:
            raise OptionError(f"{where}: unknown option {key!r}; did you mean {close!r} ({known[close]})?")


def likely_option(key: str, known: Iterable[str]) -> Optional[str]:
    """The option ``key`` most likely meant: a close spelling, or an option whose last word ``key`` is
    (``gamma`` for ``fira_gamma``). None for keys that resemble nothing (``name``, a scheduler's ``initial_lr``)."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    if close:
        return close[0]
    tails = [k for k in known if "_" in k and k.rsplit("_", 1)[1] == key and len(key) >= 4]
    return tails[0] if tails else None


def option_table(options: Sequence[Option]) -> str:
    """Markdown rows ``| name | default | doc |`` for the README."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for opt in options:
        rows.append(f"| `{opt.name}` | `{opt.default!r}` | {opt.doc} |")
    return "\n".join(rows)


def defaults_of(options: Iterable[Option]) -> Dict[str, Any]:
    return {opt.name: opt.default for opt in options}


__all__ = [
    "Option",
    "OptionError",
    "number",
    "integer",
    "choice",
    "boolean",
    "pair",
    "anything",
    "check_values",
    "check_keys",
    "option_table",
    "defaults_of",
]
