"""Tune a low-rank optimizer's rank x update_proj_gap (and optionally scale, lr, projector) with short pretraining
runs: `python -m benchmarks.tune --optimizer galore --ranks 16,32,64 --gaps 50,100,200 --output-dir OUT [flags]`.

Flags tune does not know go to `benchmarks.pretrain` unchanged (--model, --max-steps, --seed, ...). The objective
is the run's final eval perplexity; its optimizer state bytes are a user attribute of the trial. The Optuna study
lives in --storage (default sqlite:///OUT/study.db), and every run in OUT/trials/<params>/, so re-running the same
command continues: completed trials are not re-run, failed or interrupted ones are. Writes OUT/results.md,
OUT/results.json, heatmap.png (best ppl per rank x gap cell) and pareto.png (state memory vs ppl), and prints the
recommended setting: the best ppl, and the cheapest setting whose ppl is within --tolerance of the best.
"""
import itertools
import json
import os
import shlex
import sys

import optuna
from optuna.trial import TrialState

from . import plots
from .compare import MIB, build_parser, header, run_pretrain
from .optimizers import NAMES


def tune_parser():
    p = build_parser("python -m benchmarks.tune", __doc__)
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
SPACE = {"rank": ("ranks", "--rank", int), "gap": ("gaps", "--update-proj-gap", int),
         "scale": ("scales", "--scale", float), "lr": ("lrs", "--lr", float),
         "projector": ("projectors", "--projector", str)}


def search_space(args):
    space = {}
    for name, (attr, _, cast) in SPACE.items():
        value = getattr(args, attr)
        if value:
            space[name] = [cast(v) for v in value.split(",") if v.strip()]
    return space


def run_name(params):
    return "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in params.items())


def make_objective(args, forward, space, out):
    def objective(trial):
        params = {name: trial.suggest_categorical(name, values) for name, values in space.items()}
        flags = [x for name, v in params.items() for x in (SPACE[name][1], str(v))]
        run_dir = os.path.join(out, "trials", run_name(params))
        s = run_pretrain([*forward, "--optimizer", args.optimizer, *flags], run_dir, args.in_process)
        for key in ("state_bytes", "tokens_per_s", "peak_mem_bytes", "train_time_s"):
            trial.set_user_attr(key, s[key])
        trial.set_user_attr("run_dir", run_dir)
        return s["eval_ppl"]
    return objective


def complete_trials(study):
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def run_study(args, forward, space, out):
    """Create or load the study and run only the trials still missing; returns (study, new trial count)."""
    storage = args.storage or f"sqlite:///{os.path.join(out, 'study.db')}"
    grid = [dict(zip(space, combo)) for combo in itertools.product(*space.values())]
    sampler = optuna.samplers.GridSampler(space) if args.sampler == "grid" else \
        optuna.samplers.TPESampler(seed=args.sampler_seed)
    study = optuna.create_study(study_name=args.study_name, storage=storage, direction="minimize",
                                sampler=sampler, load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)  # left RUNNING by a killed run (one worker assumed)
    done = complete_trials(study)
    if args.sampler == "grid":
        # enqueue exactly the points without a completed trial: GridSampler alone counts failed points as
        # visited and would re-sample a random point once the grid is exhausted
        finished = [{k: t.params.get(k) for k in space} for t in done]
        todo = [g for g in grid if g not in finished]
        for point in todo:
            study.enqueue_trial(point)
        n_new = len(todo)
    else:
        n_new = max(0, args.trials - len(done))
    if n_new:
        study.optimize(make_objective(args, forward, space, out), n_trials=n_new, catch=(Exception,))
    return study, n_new


def recommend(rows, tolerance):
    """(best row, cheapest row within tolerance of the best ppl)."""
    best = min(rows, key=lambda r: r["eval_ppl"])
    near = [r for r in rows if r["eval_ppl"] <= best["eval_ppl"] * (1 + tolerance)]
    cheap = min(near, key=lambda r: (r["state_bytes"], r["eval_ppl"]))
    return best, cheap


def describe(row, space):
    params = ", ".join(f"{k}={row['params'][k]}" for k in space)
    return f"{params}: eval ppl {row['eval_ppl']:.2f}, state {row['state_bytes'] / MIB:.2f} MiB"


def report(study, args, argv, space, out):
    rows = sorted(({"trial": t.number, "params": t.params, "eval_ppl": t.value, **t.user_attrs}
                   for t in complete_trials(study)), key=lambda r: r["eval_ppl"])
    if not rows:
        raise SystemExit("no completed trial")
    best, cheap = recommend(rows, args.tolerance)
    command = "python -m benchmarks.tune " + shlex.join(argv)
    first = json.load(open(os.path.join(rows[0]["run_dir"], "summary.json")))
    lines = header(f"{args.optimizer}: {' x '.join(space)} search ({args.sampler})", command, args.note) + [
        f"Corpus: {first['corpus']['name']}, hash `{first['corpus_hash']}`; model {first['model']}; "
        f"{first['steps']} steps x {first['global_batch']} x {first['seq_len']} tokens per trial; seed "
        f"{first['seed']}; lr {first['optimizer']['lr']:g}; device {first['device']}. Objective: final eval ppl.",
        "", f"Recommended (best ppl): {describe(best, space)}", "",
        f"Recommended (cheapest within {args.tolerance:.0%} of best): {describe(cheap, space)}", "",
        "| trial | " + " | ".join(space) + " | eval ppl | state MiB | tokens/s |",
        "|---:|" + "---:|" * len(space) + "---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['trial']} | " + " | ".join(str(r["params"][k]) for k in space)
                     + f" | {r['eval_ppl']:.2f} | {r['state_bytes'] / MIB:.2f} | {r['tokens_per_s'] or 0:,.0f} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"command": command, "trials": rows, "best": best, "cheapest_within_tolerance": cheap,
                   "tolerance": args.tolerance}, f, indent=2)

    # heatmap: best ppl per (rank, gap) cell, over whatever else was searched (and over TPE's repeats)
    ranks, gaps = sorted(space.get("rank", [])), sorted(space.get("gap", []))
    cell = {}
    for r in rows:
        key = (r["params"].get("rank"), r["params"].get("gap"))
        cell[key] = min(cell.get(key, float("inf")), r["eval_ppl"])
    plots.heatmap(ranks, gaps, [[cell.get((rk, g)) for g in gaps] for rk in ranks], os.path.join(out, "heatmap.png"),
                  "rank", "update_proj_gap", f"{args.optimizer}: best eval ppl per cell")
    plots.memory_vs_ppl([run_name(r["params"]) for r in rows], [r["state_bytes"] for r in rows],
                        [r["eval_ppl"] for r in rows], os.path.join(out, "pareto.png"),
                        f"{args.optimizer}: state memory vs ppl", front=True)
    return rows, best, cheap


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, forward = tune_parser().parse_known_args(argv)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    space = search_space(args)
    study, n_new = run_study(args, forward, space, out)
    rows, best, cheap = report(study, args, argv, space, out)
    print(f"ran {n_new} new trial(s); {len(rows)} completed in total; results in {out}")
    print(f"recommended (best ppl): {describe(best, space)}")
    print(f"recommended (cheapest within {args.tolerance:.0%} of best): {describe(cheap, space)}")
    return {"new_trials": n_new, "rows": rows, "best": best, "cheapest": cheap}


if __name__ == "__main__":
    main()
