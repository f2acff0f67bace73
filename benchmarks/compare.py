"""Compare optimizers on one pretraining config: `python -m benchmarks.compare [--output-dir OUT] [pretrain flags]`.

Every flag compare does not know is forwarded to `benchmarks.pretrain` unchanged (--model, --max-steps, --lr,
--rank, --recipe, ...), so all optimizers share one config and step budget; each optimizer trains with its paper
recipe unless a flag says otherwise (`--recipe none` turns the recipes off). Every optimizer runs once per seed of
--seeds (default 0,1) and the table gives mean +- std over the seeds and whether each difference to AdamW is
beyond noise. Per-optimizer overrides: `--opt-args galore,fira:lr=0.01,scale=0.25` (repeatable) appends
`--lr 0.01 --scale 0.25` to those runs only. Each run goes to OUT/<optimizer>/seed<k>/ (its stdout/stderr in
run.log); a run whose summary.json exists is skipped, so an interrupted comparison resumes. All runs' options are
checked before the first one starts. Writes OUT/results.md, OUT/results.json and loss.png, ppl.png,
memory_vs_ppl.png.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys

import torch

from . import plots
from .cli import Parser, UsageError, check_writable_dir, entry_point
from .optimizers import LOWRANK, NAMES, canonical_name
from .seeds import NOISE_RULE, fmt_mean_std, mean_std, parse_seeds, verdict

DEFAULT_OPTIMIZERS = ["adamw", "adam8bit", *LOWRANK]
MIB = plots.MIB


def build_parser(prog="python -m benchmarks.compare", doc=__doc__, default_output="runs/compare"):
    # allow_abbrev=False: pretrain's --optimizer must not be taken for our --optimizers
    p = Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--output-dir", default=default_output, help=f"default {default_output or 'runs/tune-<optimizer>'}")
    p.add_argument("--seeds", default="0,1", help="comma separated; every setting runs once per seed")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="call pretrain.main() here instead of a subprocess per run (faster to start; but the "
        "CPU peak-memory figure is then the whole process's, so use it for tests only)",
    )
    p.add_argument("--note", default=None, help="free text for the results.md header (e.g. the code version)")
    return p


def compare_parser():
    p = build_parser()
    p.add_argument(
        "--optimizers", default=",".join(DEFAULT_OPTIMIZERS), help=f"comma separated, from {', '.join(NAMES)}"
    )
    p.add_argument(
        "--opt-args",
        action="append",
        default=[],
        metavar="NAMES:KEY=VALUE[,KEY=VALUE]",
        help="extra pretrain flags for some optimizers, e.g. galore,fira:lr=0.01 (repeatable)",
    )
    return p


def parse_opt_args(items):
    """['galore,fira:lr=0.01,scale=0.25'] -> {'galore': ['--lr', '0.01', '--scale', '0.25'], 'fira': [...]}."""
    out = {}
    for item in items:
        names, sep, pairs = item.partition(":")
        if not sep:
            raise ValueError(f"--opt-args {item!r}: expected NAMES:KEY=VALUE[,KEY=VALUE]")
        flags = []
        for pair in pairs.split(","):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"--opt-args {item!r}: {pair!r} is not KEY=VALUE")
            flags += [f"--{key.strip().replace('_', '-')}", value.strip()]
        for name in names.split(","):
            out.setdefault(name.strip(), []).extend(flags)
    return out


def check_runs(runs):
    """Parse and check every run's pretrain options (no data touched) so a typo fails now, not hours in.
    runs: [(label, pretrain argv)]."""
    from .pretrain import prepare_run

    for label, argv in runs:
        try:
            prepare_run(argv)
        except UsageError as e:
            raise UsageError(f"{label}: {e}") from None


def machine():
    """One line naming the machine the numbers come from."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{dev}, Python {platform.python_version()}, torch {torch.__version__}"
    )


def header(title, command, note=None):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine()}", "", f"Date: {date}", ""]
    return lines + ([f"Note: {note}", ""] if note else [])


def run_pretrain(argv, run_dir, in_process=False):
    """Run pretrain into run_dir unless its summary.json exists; returns the summary."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        os.makedirs(run_dir, exist_ok=True)
        argv = [*argv, "--output-dir", run_dir]
        if in_process:
            from .pretrain import main

            try:
                main(argv)
            except SystemExit as e:  # pretrain's one-line error was printed; this run failed, the sweep goes on
                raise RuntimeError(f"pretrain exited with {e.code}") from None
        else:  # a fresh process per run: clean peak-memory figure, and one crash does not end the sweep
            with open(os.path.join(run_dir, "run.log"), "w") as log:
                rc = subprocess.call(
                    [sys.executable, "-m", "benchmarks.pretrain", *argv], stdout=log, stderr=subprocess.STDOUT
                )
            if rc != 0:
                raise RuntimeError(f"pretrain exited with {rc}; see {os.path.join(run_dir, 'run.log')}")
    with open(path) as f:
        return json.load(f)


def run_seeds(argv, run_dir, seeds, in_process=False):
    """{seed: summary} of one setting, one run per seed in run_dir/seed<k>."""
    return {
        seed: run_pretrain([*argv, "--seed", str(seed)], os.path.join(run_dir, f"seed{seed}"), in_process)
        for seed in seeds
    }


def _ratio(x, base):
    return None if x is None or not base else x / base


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def median_tokens_per_s(run_dir):
    """Median over the logged steps: on a shared machine far less sensitive to other jobs than the run's mean."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rates = sorted(e["tokens_per_s"] for e in map(json.loads, f) if e.get("tokens_per_s"))
    return rates[len(rates) // 2] if rates else None


def summarize(runs, out):
    """One row per optimizer: mean +- std over its seeds, ratios of the means to AdamW's, and whether the ppl
    difference to AdamW is beyond noise. runs: {name: {seed: summary}}."""
    rows = []
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        first = by_seed[seeds[0]]
        ppl, ppl_std = mean_std([by_seed[k]["eval_ppl"] for k in seeds])
        loss, loss_std = mean_std([by_seed[k]["eval_loss"] for k in seeds])
        rates = [by_seed[k]["tokens_per_s"] for k in seeds if by_seed[k]["tokens_per_s"]]
        medians = [m for m in (median_tokens_per_s(os.path.join(out, name, f"seed{k}")) for k in seeds) if m]
        rows.append(
            {
                "optimizer": name,
                "seeds": seeds,
                "eval_ppls": [by_seed[k]["eval_ppl"] for k in seeds],
                "eval_ppl": ppl,
                "eval_ppl_std": ppl_std,
                "eval_loss": loss,
                "eval_loss_std": loss_std,
                "state_bytes": first["state_bytes"],
                "tokens_per_s": sum(rates) / len(rates) if rates else None,
                "median_tokens_per_s": sorted(medians)[len(medians) // 2] if medians else None,
                "peak_mem_bytes": max(by_seed[k]["peak_mem_bytes"] for k in seeds),
                "lr": first["optimizer"]["lr"],
                "recipe_applied": first.get("recipe_applied", {}),
                "train_time_s": sum(by_seed[k]["train_time_s"] for k in seeds),
            }
        )
    base = next((r for r in rows if r["optimizer"] == "adamw"), None)
    for row in rows:
        for key in ("eval_ppl", "state_bytes", "tokens_per_s", "median_tokens_per_s"):
            row[f"{key}_ratio"] = _ratio(row[key], base and base[key])
        row["ppl_vs_adamw"] = (
            verdict(row["eval_ppl"], row["eval_ppl_std"], base["eval_ppl"], base["eval_ppl_std"]) if base else None
        )
    return rows


def write_markdown(path, lines_before, rows, failed):
    lines = [
        *lines_before,
        "| optimizer | lr | eval ppl (mean ± std) | ppl / AdamW | vs AdamW | state MiB | state / AdamW "
        "| tokens/s | tokens/s / AdamW | median step tokens/s | / AdamW |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {fmt_mean_std(r['eval_ppl'], r['eval_ppl_std'])} "
            f"| {_fmt(r['eval_ppl_ratio'], '.3f')} | {r['ppl_vs_adamw'] or '-'} "
            f"| {r['state_bytes'] / MIB:.2f} | {_fmt(r['state_bytes_ratio'], '.3f')} "
            f"| {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['tokens_per_s_ratio'], '.2f')} "
            f"| {_fmt(r['median_tokens_per_s'], ',.0f')} | {_fmt(r['median_tokens_per_s_ratio'], '.2f')} |"
        )
    for name, err in failed.items():
        lines.append(f"| {name} | failed: {err} | | | | | | | | | |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


@entry_point("python -m benchmarks.compare")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, forward = compare_parser().parse_known_args(argv)
    names = [canonical_name(n.strip()) for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        raise UsageError(f"--optimizers: unknown {unknown}; choose from {', '.join(NAMES)}")
    seeds = parse_seeds(args.seeds)
    try:
        overrides = parse_opt_args(args.opt_args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    stray = sorted(set(overrides) - set(names))
    if stray:
        raise UsageError(f"--opt-args names {stray}, which are not in --optimizers")
    out = os.path.abspath(args.output_dir)
    run_argv = {name: [*forward, *overrides.get(name, []), "--optimizer", name] for name in names}
    check_runs(
        [(name, [*run_argv[name], "--seed", str(seeds[0]), "--output-dir", os.path.join(out, name)]) for name in names]
    )
    check_writable_dir("--output-dir", out)
    runs, failed = {}, {}
    for name in names:
        run_dir = os.path.join(out, name)
        print(f"[compare] {name} (seeds {seeds}) -> {run_dir}", file=sys.stderr, flush=True)
        try:  # keep going: one broken optimizer should not cost the others' results
            runs[name] = run_seeds(run_argv[name], run_dir, seeds, args.in_process)
        except Exception as e:  # noqa: BLE001 - reported in the table
            failed[name] = f"{type(e).__name__}: {e}".replace("|", "/").splitlines()[0][:200]
            print(f"[compare] {name} failed: {failed[name]}", file=sys.stderr, flush=True)
    if not runs:
        raise SystemExit("no run finished")

    rows = summarize(runs, out)
    first = (runs.get("adamw") or next(iter(runs.values())))[seeds[0]]
    command = "python -m benchmarks.compare " + shlex.join(argv)
    a = first["args"]
    lines = header("Optimizer comparison", command, args.note) + [
        f"Corpus: {first['corpus']['name']}, hash `{first['corpus_hash']}`; model {first['model']} "
        f"({first['num_params']:,} params); {first['steps']} steps x {first['global_batch']} x {first['seq_len']} "
        f"tokens; seeds {', '.join(map(str, seeds))}; eval on {a['eval_batches']} batches; device "
        f"{first['device']}, {first['dtype']}; recipe {a.get('recipe', 'none')}; lowrank_optim "
        f"{first['versions'].get('lowrank_optim')}.",
        "",
        f'eval ppl is the mean ± sample std over the seeds; "vs AdamW" applies one rule: {NOISE_RULE}. '
        "Ratios are of the means to AdamW's (state and tokens/s: higher ratio = more memory / faster). tokens/s is "
        "the runs' mean; on a shared CPU it swings with other jobs, so the median step rate is given beside it.",
        "",
    ]
    write_markdown(os.path.join(out, "results.md"), lines, rows, failed)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "command": command,
                "machine": machine(),
                "corpus_hash": first["corpus_hash"],
                "seeds": seeds,
                "noise_rule": NOISE_RULE,
                "forwarded_args": forward,
                "overrides": overrides,
                "rows": rows,
                "failed": failed,
            },
            f,
            indent=2,
        )
    plots.curves(
        {n: os.path.join(out, n, f"seed{seeds[0]}") for n in runs},
        os.path.join(out, "loss.png"),
        os.path.join(out, "ppl.png"),
    )
    plots.memory_vs_ppl(
        list(runs),
        [r["state_bytes"] for r in rows],
        [r["eval_ppl"] for r in rows],
        os.path.join(out, "memory_vs_ppl.png"),
        "Optimizer state vs final perplexity (seed mean)",
    )
    print(open(os.path.join(out, "results.md")).read())
    return {"rows": rows, "failed": failed}


if __name__ == "__main__":
    main()
