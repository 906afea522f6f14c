"""From nothing to a World 1-1 agent on the CPU (issue 27), timed as a user would time it.

    python -m benchmarks.fast_mario run --seeds 1,2,3 [--name NAME] [--set KEY=VALUE ...] [--minutes 90]
    python -m benchmarks.fast_mario report [--names NAME,...] [--json FILE]
    python -m benchmarks.fast_mario record --seeds 1 --name NAME [--set ...] --note "stopped by hand at ..."

``run`` trains each seed with ``lab train ENV --until clear_rate=0.9`` (the periodic greedy
evaluation with the preset's protocol decides when to stop) in ``ROOT/<name>-s<seed>``, as a child
process at ``--nice`` (0 by default: the issue's protocol is a machine with nothing else running; the
load averages before and after are recorded, so a run beside other work shows as one). A run that
has not reached the target after ``--minutes`` of wall clock gets SIGTERM (it saves a checkpoint)
and is recorded as not reached. The agent a run stopped with is then evaluated with sticky actions
(``lab eval --episodes 20 --sticky 0.25``), and the run leaves ``RECORDS/<name>-s<seed>.json``:
the wall-clock minutes and agent steps to the target, the sticky evaluation, the training history
and every greedy evaluation, small enough to commit. A run with a checkpoint and no record resumes.
``record`` writes the same record for a run that something else stopped (by hand, say: ``run`` then
exits without one), with ``--note`` saying what; its wall clock is the run's own (its last history
entry's seconds) and its load averages are unknown.

``report`` tabulates the records and draws the training clear rate and the greedy evaluations
against wall-clock minutes and against agent steps, beside the shipped 1-1 run's training curve
(against agent steps only: that run has no wall-clock record worth the name).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks.experiments import (
    checkpoint_step,
    load_record,
    parse_seeds,
    run_history,
    run_lab,
    run_state,
    save_record,
)

ENV = "mario-1-1"
ROOT = Path("runs/fast-mario")
RECORDS = Path("benchmarks/results/fast-mario")
SHIPPED = Path("runs/mario-1-1")
UNTIL = "clear_rate=0.9"
STICKY = 0.25
STICKY_EPISODES = 20
# Seconds between checks of the wall-clock limit: a run is stopped at most this late.
POLL = 5.0
# The keys of a history record kept in the committed record (the rest are losses and timings).
HISTORY_KEYS = ("step", "seconds", "return_mean", "x_pos_max_mean", "clear_rate")


def run(args: argparse.Namespace) -> None:
    """Every seed: trained to the target or the time limit, evaluated with sticky actions, recorded."""
    for seed in args.seeds:
        run_dir = args.root / f"{args.name}-s{seed}"
        record_file = args.records / f"{args.name}-s{seed}.json"
        if record_file.exists():
            print(f"{run_dir}: recorded in {record_file}", flush=True)
            continue
        load_before = os.getloadavg()
        resumed = checkpoint_step(run_dir) > 0
        if resumed:
            command = ["train", "--resume", str(run_dir)]
        else:
            (run_dir / "config.json").unlink(missing_ok=True)  # a start that saved nothing
            command = start_command(args, seed, run_dir)
        deadline = time.time() + args.minutes * 60
        started = time.time()
        run_lab([*command, "--no-progress"], args.nice, stop=lambda d=deadline: time.time() > d, poll=POLL)
        wall_seconds = time.time() - started
        record = build_record(
            args, seed, run_dir, command, resumed, wall_seconds, (load_before, os.getloadavg())
        )
        save_record(record_file, record)


def start_command(args: argparse.Namespace, seed: int, run_dir: Path) -> list[str]:
    """The ``lab`` arguments that start seed ``seed``'s run from nothing."""
    command = ["train", args.env, "--seed", str(seed), "--run-dir", str(run_dir), "--until", args.until]
    return command + [part for item in args.set for part in ("--set", item)]


def build_record(
    args: argparse.Namespace,
    seed: int,
    run_dir: Path,
    command: list[str],
    resumed: bool,
    wall_seconds: float,
    loads: tuple[Any, Any] | None,
    note: str | None = None,
) -> dict[str, Any]:
    """A seed's record from its run directory, with the sticky evaluation of the agent it stopped
    with; ``loads`` are the load averages before and after (None: not known)."""
    state = run_state(run_dir)
    until = state.until or {"reached_at_step": None, "reached_after_seconds": None}
    sticky_eval = sticky_evaluation(run_dir, args) if args.sticky_episodes else None
    load_before, load_after = loads if loads is not None else (None, None)
    record = {
        "name": args.name, "seed": seed, "env": args.env, "until": args.until, "sets": args.set,
        "command": "lab " + " ".join(command), "minutes_limit": args.minutes, "resumed": resumed,
        "reached": until["reached_at_step"] is not None,
        "reached_at_step": until["reached_at_step"], "reached_after_seconds": until["reached_after_seconds"],
        "steps": state.history[-1]["step"] if state.history else 0,
        "wall_seconds": round(wall_seconds, 1), "load_before": load_before, "load_after": load_after,
        "sticky_eval": sticky_eval,
        "date": time.strftime("%Y-%m-%d"),
        "history": [{key: entry.get(key) for key in HISTORY_KEYS} for entry in state.history],
        "evals": state.evals,
    }  # fmt: skip
    if note:
        record["note"] = note
    return record


def record_stopped(args: argparse.Namespace) -> None:
    """``record``: the record of each seed's run that something other than ``run`` stopped."""
    if not args.note:
        raise SystemExit(
            "record needs --note: say what stopped the run (e.g. 'stopped by hand at 41 minutes')"
        )
    for seed in args.seeds:
        run_dir = args.root / f"{args.name}-s{seed}"
        record_file = args.records / f"{args.name}-s{seed}.json"
        if record_file.exists():
            raise SystemExit(f"{record_file} exists already; remove it to record {run_dir} again")
        if checkpoint_step(run_dir) == 0:
            raise SystemExit(f"{run_dir} has no checkpoint to record")
        history = run_state(run_dir).history
        wall_seconds = float(history[-1].get("seconds") or 0.0) if history else 0.0
        command = start_command(args, seed, run_dir)
        save_record(
            record_file, build_record(args, seed, run_dir, command, False, wall_seconds, None, args.note)
        )
        print(f"{run_dir}: recorded in {record_file}", flush=True)


def sticky_evaluation(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``lab eval RUN --sticky 0.25`` of the run's newest weights (the agent it stopped with)."""
    command = ["eval", str(run_dir), "--episodes", str(args.sticky_episodes), "--sticky", str(STICKY), "--json"]  # fmt: skip
    _, out = run_lab(command, args.nice, capture=True)
    summary = json.loads(out.strip().splitlines()[-1])
    return {"p": STICKY, "episodes": summary["episodes"], "clear_rate": summary["clear_rate"],
            "x_pos_mean": summary["x_pos_mean"]}  # fmt: skip


def report(args: argparse.Namespace) -> dict[str, Any]:
    """The table (printed as Markdown), the plot and, with ``--json``, both as JSON."""
    records = sorted(
        (record for path in sorted(args.records.glob("*.json")) if (record := load_record(path)) is not None),
        key=lambda record: (record["name"], record["seed"]),
    )
    if args.names:
        records = [record for record in records if record["name"] in args.names]
    if not records:
        raise SystemExit(f"no records in {args.records}; run first: python -m benchmarks.fast_mario run")
    rows = [
        {
            "name": record["name"], "seed": record["seed"], "reached": record["reached"],
            "minutes": None if record["reached_after_seconds"] is None else record["reached_after_seconds"] / 60,
            "steps": record["reached_at_step"] if record["reached"] else record["steps"],
            "wall_minutes": record["wall_seconds"] / 60,
            "sticky_clear_rate": record["sticky_eval"]["clear_rate"] if record["sticky_eval"] else None,
            "load_before": None if record["load_before"] is None else record["load_before"][0],
        }
        for record in records
    ]  # fmt: skip
    print("| preset | seed | target reached | minutes to target | agent steps | child wall minutes | "
          f"sticky clear rate (p={STICKY}) | load average at start |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        minutes = "-" if row["minutes"] is None else f"{row['minutes']:.1f}"
        sticky = "-" if row["sticky_clear_rate"] is None else f"{row['sticky_clear_rate']:.2f}"
        load = "-" if row["load_before"] is None else f"{row['load_before']:.2f}"
        print(
            f"| {row['name']} | {row['seed']} | {'yes' if row['reached'] else 'no'} | {minutes} | "
            f"{row['steps']:,} | {row['wall_minutes']:.1f} | {sticky} | {load} |"
        )
    shipped = run_history(args.shipped) if (args.shipped / "checkpoints").is_dir() else []
    plot(records, shipped, args.plot)
    result = {"rows": rows, "plot": str(args.plot), "date": time.strftime("%Y-%m-%d")}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


class SeedStyle(NamedTuple):
    linestyle: str
    marker: str


SEED_STYLES = (SeedStyle("-", "o"), SeedStyle("-.", "s"), SeedStyle(":", "^"))


def plot(records: list[dict[str, Any]], shipped: list[dict[str, Any]], path: Path) -> None:
    """Two rows (x: wall-clock minutes, agent steps), two columns (training clear rate, greedy evals)."""
    from core.files import save_figure
    from core.plots import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=100, squeeze=False)
    names = sorted({record["name"] for record in records})
    for row, (x_key, scale, label) in enumerate(
        (("seconds", 60.0, "wall-clock minutes"), ("step", 1.0, "agent steps"))
    ):
        train_axis, eval_axis = axes[row]
        # The shipped run is drawn against agent steps only: it ran in several processes beside other
        # work, and its early records have no wall-clock seconds.
        if shipped and x_key == "step":
            xs = [entry["step"] for entry in shipped]
            ys = [entry.get("clear_rate", math.nan) for entry in shipped]
            train_axis.plot(xs, ys, color="0.5", linestyle="--", linewidth=1, label="shipped run")
        for record in records:
            # A colour per configuration, a line style and marker per seed (its place among that
            # configuration's seeds), so the seeds of one configuration stay apart.
            color = f"C{names.index(record['name'])}"
            seeds = sorted(other["seed"] for other in records if other["name"] == record["name"])
            style = SEED_STYLES[seeds.index(record["seed"]) % len(SEED_STYLES)]
            xs = np.array([entry[x_key] for entry in record["history"]], dtype=float) / scale
            train_axis.plot(xs, [entry["clear_rate"] for entry in record["history"]], color=color, alpha=0.8,
                            linestyle=style.linestyle, label=f"{record['name']} s{record['seed']}")  # fmt: skip
            evals = [entry for entry in record["evals"] if "clear_rate" in entry]
            eval_axis.plot(
                [entry[x_key] / scale for entry in evals], [entry["clear_rate"] for entry in evals],
                color=color, linestyle=style.linestyle, marker=style.marker, markersize=3,
                label=f"{record['name']} s{record['seed']}",
            )  # fmt: skip
        for axis, ylabel in (
            (train_axis, "training: flag reached (last 100)"),
            (eval_axis, "greedy eval: flag reached"),
        ):
            axis.set_xlabel(label)
            axis.set_ylabel(ylabel)
            axis.set_ylim(-0.02, 1.02)
            axis.axhline(0.9, color="tab:red", linestyle=":", linewidth=1)
            axis.grid(alpha=0.3)
        if row == 0:
            train_axis.axvline(60, color="tab:red", linestyle=":", linewidth=1)
            eval_axis.axvline(60, color="tab:red", linestyle=":", linewidth=1)
    axes[0][0].legend(fontsize=7, loc="upper left")
    axes[1][0].legend(fontsize=7, loc="upper left")
    axes[0][1].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"lab train {ENV} --until {UNTIL}: each seed against the clock and against agent steps", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    print(f"curves -> {path}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("run", "report", "record"))
    parser.add_argument("--env", default=ENV, help=f"the preset (default {ENV})")
    parser.add_argument(
        "--name", default="preset", help="the configuration's name in the records (default preset)"
    )
    parser.add_argument("--names", default="", help="report: comma-separated names (default: all)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to lab train")
    parser.add_argument("--until", default=UNTIL, help=f"the target (default {UNTIL})")
    parser.add_argument("--minutes", type=float, default=90.0, help="wall-clock limit per run (default 90)")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the child processes (default 0)")
    parser.add_argument(
        "--sticky-episodes",
        type=int,
        default=STICKY_EPISODES,
        help="episodes of the sticky eval (0: none, e.g. off Mario)",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help=f"run directories (default {ROOT})")
    parser.add_argument(
        "--records", type=Path, default=RECORDS, help=f"committed records (default {RECORDS})"
    )
    parser.add_argument("--shipped", type=Path, default=SHIPPED, help="the reference run of the plot")
    parser.add_argument("--plot", type=Path, default=Path("docs/images/fast-mario.png"))
    parser.add_argument("--json", type=Path, default=None, help="report: also write it as JSON here")
    parser.add_argument("--note", default=None, help="record: what stopped the run (kept in the record)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seeds = parse_seeds(parser, args.seeds)
    args.names = [name for name in args.names.split(",") if name]
    if args.step == "run":
        run(args)
    elif args.step == "record":
        record_stopped(args)
    else:
        report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
