"""Tune a low-rank optimizer's rank x update_proj_gap (and optionally scale, lr, projector) with short pretraining
runs: `python -m benchmarks.tune --optimizer galore --ranks 16,32,64 --gaps 50,100,200 [--output-dir OUT] [flags]`.

Flags tune does not know go to `benchmarks.pretrain` unchanged (--model, --max-steps, --recipe, ...); options
neither searched nor given come from the optimizer's paper recipe (`--recipe none`: pretrain's defaults). Every
setting runs once per seed of --seeds (default 0,1); the objective is the mean final eval perplexity over the
seeds, and the spread is kept. The Optuna study lives in --storage (default sqlite:///OUT/study.db), every run in
OUT/trials/<params>/seed<k>/, so re-running the same command continues: completed trials are not re-run, failed
or interrupted ones are. Writes OUT/results.md, OUT/results.json, heatmap.png (best ppl per rank x gap cell) and
pareto.png (state memory vs ppl). The recommendation follows one noise rule (see benchmarks/seeds.py): the best
setting is recommended only if it beats the runner-up beyond noise; otherwise tune says so and recommends the
cheapest setting (least optimizer state) within noise of the best.
"""

import itertools
import json
import os
import shlex
import sys

import optuna
from optuna.trial import TrialState

from . import plots
from .cli import UsageError, check_writable_dir, entry_point
from .compare import MIB, build_parser, check_runs, header, run_seeds
from .optimizers import NAMES
from .seeds import NOISE_RULE, fmt_mean_std, mean_std, parse_seeds, within_noise


def tune_parser():
    p = build_parser("python -m benchmarks.tune", __doc__, default_output=None)
    p.add_argument("--optimizer", default="galore", choices=NAMES)
    p.add_argument("--ranks", default="16,32,64")
    p.add_argument("--gaps", default="50,100,200", help="update_proj_gap values")
    p.add_argument("--scales", default=None, help="optional, e.g. 0.25,0.5 (else pretrain's --scale)")
    p.add_argument("--lrs", default=None, help="optional, e.g. 0.005,0.01 (else pretrain's --lr)")
    p.add_argument("--projectors", default=None, help="optional, e.g. svd,random (else pretrain's --projector)")
    p.add_argument("--sampler", choices=("grid", "tpe"), default="grid")
    p.add_argument("--trials", type=int, default=20, help="total trials for --sampler tpe (grid: the grid size)")
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--storage", default=None, help="Optuna storage URL; default sqlite:///OUTPUT/study.db")
    p.add_argument("--study-name", default="tune")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative ppl slack for the cheap recommendation")
    return p


# search-space name -> (flag of tune, pretrain flag, type)
SPACE = {
    "rank": ("ranks", "--rank", int),
    "gap": ("gaps", "--update-proj-gap", int),
    "scale": ("scales", "--scale", float),
    "lr": ("lrs", "--lr", float),
    "projector": ("projectors", "--projector", str),
}


def search_space(args):
    space = {}
    for name, (attr, _, cast) in SPACE.items():
        value = getattr(args, attr)
        if value:
            try:
                space[name] = [cast(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise UsageError(f"--{attr} {value!r}: expected comma separated {cast.__name__} values") from None
            if not space[name]:
                raise UsageError(f"--{attr} {value!r}: give at least one value")
    return space


def run_name(params):
    return "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in params.items())


def trial_flags(params):
    return [x for name, v in params.items() for x in (SPACE[name][1], str(v))]


def make_objective(args, forward, space, out, seeds):
    def objective(trial):
        params = {name: trial.suggest_categorical(name, values) for name, values in space.items()}
        run_dir = os.path.join(out, "trials", run_name(params))
        runs = run_seeds(
            [*forward, "--optimizer", args.optimizer, *trial_flags(params)], run_dir, seeds, args.in_process
        )
        ppls = [runs[k]["eval_ppl"] for k in seeds]
        first = runs[seeds[0]]
        for key in ("state_bytes", "tokens_per_s", "peak_mem_bytes", "train_time_s"):
            trial.set_user_attr(key, first[key])
        trial.set_user_attr("eval_ppls", ppls)
        trial.set_user_attr("eval_ppl_std", mean_std(ppls)[1])
        trial.set_user_attr("seeds", seeds)
        trial.set_user_attr("run_dir", run_dir)
        return mean_std(ppls)[0]

    return objective


def complete_trials(study):
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def run_study(args, forward, space, out, seeds):
    """Create or load the study and run only the trials still missing; returns (study, new trial count)."""
    storage = args.storage or f"sqlite:///{os.path.join(out, 'study.db')}"
    grid = [dict(zip(space, combo)) for combo in itertools.product(*space.values())]
    # grid: the missing points are enqueued below, so any sampler only replays them (optuna's GridSampler itself
    # fails on enqueued trials of a one-point grid)
    sampler = (
        optuna.samplers.RandomSampler(seed=args.sampler_seed)
        if args.sampler == "grid"
        else optuna.samplers.TPESampler(seed=args.sampler_seed)
    )
    study = optuna.create_study(
        study_name=args.study_name, storage=storage, direction="minimize", sampler=sampler, load_if_exists=True
    )
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)  # left RUNNING by a killed run (one worker assumed)
    done = complete_trials(study)
    if args.sampler == "grid":
        # enqueue exactly the points without a completed trial (failed or interrupted ones run again)
        finished = [{k: t.params.get(k) for k in space} for t in done]
        todo = [g for g in grid if g not in finished]
        for point in todo:
            study.enqueue_trial(point)
        n_new = len(todo)
    else:
        n_new = max(0, args.trials - len(done))
    if n_new:
        study.optimize(make_objective(args, forward, space, out, seeds), n_trials=n_new, catch=(Exception,))
    return study, n_new


def recommend(rows, tolerance):
    """(best row, cheapest row within tolerance of the best ppl)."""
    best = min(rows, key=lambda r: r["eval_ppl"])
    near = [r for r in rows if r["eval_ppl"] <= best["eval_ppl"] * (1 + tolerance)]
    cheap = min(near, key=lambda r: (r["state_bytes"], r["eval_ppl"]))
    return best, cheap


def recommend_beyond_noise(rows):
    """(recommended row, sentence why). The best mean is recommended only when it beats the runner-up beyond
    noise; otherwise the cheapest setting (least state, then best mean) within noise of the best is."""
    ranked = sorted(rows, key=lambda r: r["eval_ppl"])
    best = ranked[0]
    if len(ranked) == 1:
        return best, "the only completed setting"
    runner = ranked[1]
    std = lambda r: r.get("eval_ppl_std")  # noqa: E731
    if within_noise(best["eval_ppl"], std(best), runner["eval_ppl"], std(runner)) is None:
        return best, "best mean ppl; with one seed there is no noise estimate, so this is NOT shown to be better"
    near = [r for r in ranked if within_noise(best["eval_ppl"], std(best), r["eval_ppl"], std(r))]
    if len(near) == 1:
        return best, "beats the runner-up beyond noise"
    cheap = min(near, key=lambda r: (r["state_bytes"], r["eval_ppl"]))
    return cheap, (
        f"no setting beats the runner-up beyond noise ({len(near)} settings are within noise of the "
        "best), so the cheapest of those is recommended"
    )


def describe(row, space):
    params = ", ".join(f"{k}={row['params'][k]}" for k in space)
    return (
        f"{params}: eval ppl {fmt_mean_std(row['eval_ppl'], row.get('eval_ppl_std'))}, "
        f"state {row['state_bytes'] / MIB:.2f} MiB"
    )


def report(study, args, argv, space, out):
    rows = sorted(
        ({"trial": t.number, "params": t.params, "eval_ppl": t.value, **t.user_attrs} for t in complete_trials(study)),
        key=lambda r: r["eval_ppl"],
    )
    if not rows:
        raise SystemExit("no completed trial")
    best, cheap = recommend(rows, args.tolerance)
    chosen, why = recommend_beyond_noise(rows)
    command = "python -m benchmarks.tune " + shlex.join(argv)
    first = json.load(open(os.path.join(rows[0]["run_dir"], f"seed{rows[0]['seeds'][0]}", "summary.json")))
    lines = header(f"{args.optimizer}: {' x '.join(space)} search ({args.sampler})", command, args.note) + [
        f"Corpus: {first['corpus']['name']}, hash `{first['corpus_hash']}`; model {first['model']}; "
        f"{first['steps']} steps x {first['global_batch']} x {first['seq_len']} tokens per run; seeds "
        f"{', '.join(map(str, rows[0]['seeds']))} per setting; lr {first['optimizer']['lr']:g}; recipe "
        f"{first['args'].get('recipe', 'none')}; device {first['device']}. Objective: mean final eval ppl over "
        f"the seeds (± sample std). Noise rule: {NOISE_RULE}.",
        "",
        f"Recommended: {describe(chosen, space)} ({why})",
        "",
        f"Best mean: {describe(best, space)}",
        "",
        f"Cheapest within {args.tolerance:.0%} of the best mean: {describe(cheap, space)}",
        "",
        "| trial | " + " | ".join(space) + " | eval ppl (mean ± std) | state MiB | tokens/s |",
        "|---:|" + "---:|" * len(space) + "---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trial']} | "
            + " | ".join(str(r["params"][k]) for k in space)
            + f" | {fmt_mean_std(r['eval_ppl'], r.get('eval_ppl_std'))} | {r['state_bytes'] / MIB:.2f} "
            f"| {r['tokens_per_s'] or 0:,.0f} |"
        )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "command": command,
                "trials": rows,
                "recommended": chosen,
                "recommended_because": why,
                "noise_rule": NOISE_RULE,
                "best": best,
                "cheapest_within_tolerance": cheap,
                "tolerance": args.tolerance,
            },
            f,
            indent=2,
        )

    # heatmap: best ppl per (rank, gap) cell, over whatever else was searched (and over TPE's repeats)
    ranks, gaps = sorted(space.get("rank", [])), sorted(space.get("gap", []))
    cell = {}
    for r in rows:
        key = (r["params"].get("rank"), r["params"].get("gap"))
        cell[key] = min(cell.get(key, float("inf")), r["eval_ppl"])
    plots.heatmap(
        ranks,
        gaps,
        [[cell.get((rk, g)) for g in gaps] for rk in ranks],
        os.path.join(out, "heatmap.png"),
        "rank",
        "update_proj_gap",
        f"{args.optimizer}: best mean eval ppl per cell",
    )
    plots.memory_vs_ppl(
        [run_name(r["params"]) for r in rows],
        [r["state_bytes"] for r in rows],
        [r["eval_ppl"] for r in rows],
        os.path.join(out, "pareto.png"),
        f"{args.optimizer}: state memory vs ppl",
        front=True,
    )
    return rows, best, cheap, chosen, why


@entry_point("python -m benchmarks.tune")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, forward = tune_parser().parse_known_args(argv)
    space = search_space(args)
    seeds = parse_seeds(args.seeds)
    if args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    out = os.path.abspath(args.output_dir or os.path.join("runs", f"tune-{args.optimizer}"))
    # every grid point's options checked before the first run (TPE: the first value of each dimension)
    points = (
        [dict(zip(space, combo)) for combo in itertools.product(*space.values())]
        if args.sampler == "grid"
        else [{k: v[0] for k, v in space.items()}]
    )
    check_runs(
        [
            (run_name(p) or "run", [*forward, "--optimizer", args.optimizer, *trial_flags(p), "--output-dir", out])
            for p in points
        ]
    )
    check_writable_dir("--output-dir", out)
    study, n_new = run_study(args, forward, space, out, seeds)
    rows, best, cheap, chosen, why = report(study, args, argv, space, out)
    print(f"ran {n_new} new trial(s) x {len(seeds)} seed(s); {len(rows)} completed in total; results in {out}")
    print(f"recommended: {describe(chosen, space)} -- {why} ({NOISE_RULE})")
    print(f"best mean ppl: {describe(best, space)}")
    print(f"cheapest within {args.tolerance:.0%} of best: {describe(cheap, space)}")
    return {
        "new_trials": n_new,
        "rows": rows,
        "best": best,
        "cheapest": cheap,
        "recommended": chosen,
        "recommended_because": why,
    }


if __name__ == "__main__":
    main()
