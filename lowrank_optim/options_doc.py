"""The README's option tables, generated from the parts' declarations.

python -m lowrank_optim.options_doc            # print the tables
python -m lowrank_optim.options_doc README.md  # rewrite the block between the options markers in place
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import frugal, sst  # noqa: F401  (register the blocks projector and the spectral route)
from .inner import INNER_RULES
from .parts import ABSENT, ENGINE_OPTIONS, ROUTES, part_options
from .projectors import PROJECTORS
from .residual import RESIDUAL_RULES

BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"


def _rows(options) -> list:
    out = []
    for o in options:
        default = "—" if o.default is ABSENT else f"`{o.default!r}`"
        out.append(f"| `{o.name}` | {default} | {o.doc.replace('|', '/')} |")
    return out


def render() -> str:
    lines = ["| option | default | meaning |", "|---|---|---|", "| **engine** (every group) | | |"]
    lines += _rows(ENGINE_OPTIONS)
    for kind, table in (
        ("inner", INNER_RULES),
        ("residual", RESIDUAL_RULES),
        ("route", ROUTES),
        ("projector", PROJECTORS),
    ):
        for name, part in table.items():
            opts = part_options(part)
            if opts:
                lines.append(f"| **{kind} `{name}`** (when selected) | | |")
                lines += _rows(opts)
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(render())
        return 0
    path = Path(argv[0])
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        print(f"{path}: no {BEGIN} ... {END} block", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{render()}\n{END}{tail}", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
