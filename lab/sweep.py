"""``lab sweep``: a hyperparameter search on Ray Tune whose trials are ordinary lab runs.

    lab sweep cartpole --param learning_rate=loguniform:1e-4:3e-3 --param gae_lambda=uniform:0.8:0.99 \\
        --samples 8 --seeds 2 [--scheduler asha|none] [--metric return_mean] [--address local|auto|ray://HOST:PORT]
    lab sweep --resume DIR

The plan (configurations drawn, seeds, base config) goes to ``DIR/sweep.json``; every trial is a
run directory ``DIR/trials/<key>-seed<k>/`` that ``lab eval``, ``watch``, ``explain`` and
``compare`` load; the results are ``DIR/results.csv``, ``trials.csv``, ``results.json`` and
``sweep.png``. The module imports nothing heavy until the command runs (``lab --help`` stays fast).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lab.arguments import add_repeatable, non_negative_int, positive_float, positive_int
from lab.errors import EXIT_INTERRUPTED, UsageError, require_writable

SCHEDULERS = ("asha", "none")  # sweep.spec.SCHEDULERS (not imported: it would load numpy and torch)
METRICS = ("return_mean", "clear_rate", "x_pos_mean")  # sweep.spec.METRICS
DEFAULT_SEEDS = 2
DEFAULT_SAMPLES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lab sweep``."""
    parser.add_argument("env", nargs="?", metavar="PRESET_OR_ENV", help="e.g. cartpole, mario-1-1")
    parser.add_argument("--algo", choices=["ppo", "dqn"], default=None, help="algorithm (default: ppo)")
    add_repeatable(
        parser,
        "--param",
        "a config field to search (repeatable): uniform:LO:HI, loguniform:LO:HI, randint:LO:HI, "
        "choice:A,B,... or grid:A,B,...",
        dest="params",
        metavar="NAME=SPEC",
    )
    add_repeatable(parser, "--set", "a fixed config value for every trial (repeatable), e.g. eval_episodes=5")
    parser.add_argument(
        "--seeds", type=positive_int, default=None, help=f"seeds per configuration (default {DEFAULT_SEEDS})"
    )
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=None,
        help=f"configurations drawn (per grid point; default {DEFAULT_SAMPLES})",
    )
    parser.add_argument("--steps", type=positive_int, default=None, help="agent steps per trial")
    parser.add_argument(
        "--scheduler", choices=SCHEDULERS, default=None, help="asha: stop poor trials early (default); none"
    )
    parser.add_argument(
        "--metric", choices=METRICS, default=None, help="greedy-eval metric to rank by (default return_mean)"
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray: local (start one here, the default), auto (the cluster `ray start` runs), ray://HOST:PORT",
    )
    parser.add_argument(
        "--trial-cpus", type=positive_float, default=None, help="Ray CPUs per trial (default 1)"
    )
    parser.add_argument(
        "--sample-seed", type=non_negative_int, default=None, help="seed of the configurations' draws (0)"
    )
    parser.add_argument(
        "--dir", default=None, help="the sweep's directory (default: runs/sweep-<env>-<algo>-<time>)"
    )
    parser.add_argument("--resume", default=None, metavar="DIR", help="continue the sweep in DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON summary as the last line")


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Plans (or reloads) a sweep, runs it on Ray Tune, writes and prints its results."""
    from envs.ray_vector import ensure_ray
    from sweep.spec import read_sweep

    if args.resume:
        _refuse_plan_options(args)
        sweep_dir = Path(args.resume)
        spec = read_sweep(sweep_dir)
        address = args.address or spec.address
    else:
        spec, sweep_dir = _new_plan(args)
        address = spec.address
        drawn = _draws(spec.params, args.samples or DEFAULT_SAMPLES)
        if len(spec.configurations) < drawn and not args.json:
            print(
                f"note: {drawn} draws gave {len(spec.configurations)} distinct configurations (a small choice "
                "space repeats itself; grid:A,B,... takes every value once)"
            )
    ensure_ray(address)  # an unreachable cluster: one line, exit 2, nothing written
    if not args.resume:
        sweep_dir = _make_dir(sweep_dir, spec)
    return _run(sweep_dir, spec, address, resume=bool(args.resume), quiet=args.json)


def _draws(params: dict[str, str], samples: int) -> int:
    """How many configurations the SPECs ask for: the grid's points times the samples drawn."""
    from sweep.spec import split_values

    points = 1
    for spec in params.values():
        if spec.startswith("grid:"):
            points *= len(dict.fromkeys(split_values(spec[len("grid:") :])))
    return points * (samples if any(not spec.startswith("grid:") for spec in params.values()) else 1)


def _refuse_plan_options(args: argparse.Namespace) -> None:
    given = [
        flag
        for flag, value in (
            ("PRESET_OR_ENV", args.env), ("--algo", args.algo), ("--param", args.params),
            ("--set", args.overrides), ("--seeds", args.seeds), ("--samples", args.samples),
            ("--steps", args.steps), ("--scheduler", args.scheduler), ("--metric", args.metric),
            ("--trial-cpus", args.trial_cpus), ("--sample-seed", args.sample_seed), ("--dir", args.dir),
        )
        if value not in (None, [])
    ]  # fmt: skip
    if given:
        raise UsageError(
            f"lab sweep --resume DIR continues the plan in DIR/sweep.json; drop {', '.join(given)} "
            "(only --address and --json go with --resume)"
        )


def _new_plan(args: argparse.Namespace) -> tuple[Any, Path | None]:
    from sweep.spec import SWEEP_FILE, new_sweep

    if not args.env:
        raise UsageError(
            "lab sweep: give a preset or Gymnasium id (see `lab list envs`) and --param NAME=SPEC ..., "
            "or --resume DIR"
        )
    sweep_dir = Path(args.dir) if args.dir else None
    if sweep_dir is not None and (sweep_dir / SWEEP_FILE).exists():
        raise UsageError(
            f"{sweep_dir} already holds a sweep; continue it with: lab sweep --resume {sweep_dir}"
        )
    spec = new_sweep(
        args.env, args.algo or "ppo", args.params, args.overrides,
        seeds=args.seeds or DEFAULT_SEEDS, samples=args.samples or DEFAULT_SAMPLES, steps=args.steps,
        metric=args.metric or "return_mean", scheduler=args.scheduler or "asha",
        trial_cpus=args.trial_cpus or 1.0, address=args.address or "local", sample_seed=args.sample_seed or 0,
    )  # fmt: skip
    return spec, sweep_dir


def _make_dir(sweep_dir: Path | None, spec: Any) -> Path:
    from core.runs import new_run_dir, slug
    from sweep.spec import write_sweep

    if sweep_dir is None:
        sweep_dir = new_run_dir("runs", f"sweep-{slug(spec.env)}-{spec.algo}")
    require_writable(sweep_dir)
    write_sweep(sweep_dir, spec)
    return sweep_dir


def _run(sweep_dir: Path, spec: Any, address: str, resume: bool, quiet: bool) -> dict[str, Any]:
    import ray

    from agents.engine import TrainingStopped
    from sweep.plots import plot_sweep
    from sweep.results import collect, counts, format_table, rank, write_results
    from sweep.trials import ERROR, FINISHED, PENDING, RUNNING, STOPPED, sweep_lock
    from sweep.tune import run_sweep

    cpus = ray.cluster_resources().get("CPU", 0.0)
    at_once = max(1, int(cpus // spec.trial_cpus))
    trials_total = len(spec.configurations) * len(spec.seeds)
    print(
        f"sweep: {spec.algo} on {spec.env}, {len(spec.configurations)} configurations x {len(spec.seeds)} seeds "
        f"= {trials_total} trials of {spec.total_steps:,} steps, scheduler {spec.scheduler}; Ray at {address} "
        f"({cpus:g} CPUs: {at_once} trials at a time) -> {sweep_dir}" + (" (resumed)" if resume else ""),
        flush=True,
    )
    start = time.time()
    with sweep_lock(sweep_dir):
        tune_status = run_sweep(sweep_dir, spec, resume=resume)
    minutes = (time.time() - start) / 60
    trials = collect(sweep_dir, spec, tune_status)
    configs = rank(spec, trials)
    paths = write_results(sweep_dir, spec, trials, configs)
    plot = plot_sweep(spec, trials, configs, sweep_dir / "sweep.png")
    tally = counts(trials)
    words = {FINISHED: "finished", STOPPED: "stopped early by ASHA", ERROR: "failed", RUNNING: "cut off",
             PENDING: "not started"}  # fmt: skip
    print(f"done in {minutes:.1f} min: " + ", ".join(f"{n} {words.get(s, s)}" for s, n in tally.items()))
    if not quiet:
        print(format_table(spec, configs))
    best = configs[0] if configs and configs[0].mean is not None else None
    summary: dict[str, Any] = {
        "sweep_dir": str(sweep_dir), "env": spec.env, "algo": spec.algo, "metric": spec.metric,
        "trials": trials_total, "counts": tally, "minutes": round(minutes, 2),
        "results": [str(p) for p in paths], "plot": str(plot), "best": None,
    }  # fmt: skip
    if best is not None:
        run_dirs = [t.run_dir for t in trials if t.key == best.key]
        finals = [f for f in best.finals if f is not None]
        summary["best"] = {"key": best.key, "params": best.params, "mean": best.mean, "std": best.std,
                           "seeds": list(best.seeds), "finals": list(best.finals), "run_dirs": run_dirs}  # fmt: skip
        finals_text = ", ".join(f"{f:.4g}" for f in finals) or "none finished"
        finished_dirs = [t.run_dir for t in trials if t.key == best.key and t.status == FINISHED]
        print(
            f"best: {best.label}: {spec.metric} {best.mean:.4g} ± {best.std or 0.0:.3g} over seeds "
            f"{', '.join(map(str, best.seeds))} (final greedy evals: {finals_text}); try: lab eval {(finished_dirs or run_dirs)[0]}"
        )
    print(f"results -> {', '.join(str(p) for p in paths)}; plot -> {plot}")
    unfinished = tally.get(RUNNING, 0) + tally.get(PENDING, 0)
    if unfinished:
        print(f"interrupted with {unfinished} trials to go; continue with: lab sweep --resume {sweep_dir}")
        raise SystemExit(EXIT_INTERRUPTED)
    if tally.get(ERROR, 0) == trials_total:
        first = next(t for t in trials if t.status == ERROR)
        raise TrainingStopped(f"all {trials_total} trials failed; see {first.run_dir}/trial.json")
    return summary
