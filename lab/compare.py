"""``lab compare``: runs grouped by configuration, their learning curves and robust statistics.

    lab compare runs/sweep-cartpole-ppo-... [runs/other-run ...] [--metric return_mean] [--out FILE.png] [--json]

Each group (the seeds of one configuration) gets its mean learning curve with a 95% bootstrap band,
the interquartile mean (IQM) of its runs' final greedy evaluations with a 95% interval, and the
probability that one of its runs beats a run of the best group (Agarwal et al. 2021, rliable).
The module imports nothing heavy until the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lab.errors import UsageError

METRICS = ("return_mean", "clear_rate", "x_pos")  # sweep.runs.METRICS (not imported: numpy, torch)
DEFAULT_REPS = 2000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lab compare``."""
    parser.add_argument(
        "dirs",
        nargs="+",
        metavar="RUN_OR_SWEEP_DIR",
        help="run directories and sweep directories (all trials)",
    )
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="return_mean",
        help="curve: the training episodes' recent mean; score: the final greedy evaluation",
    )
    parser.add_argument("--out", default=None, help="the curves' PNG (default: compare.png here)")
    parser.add_argument(
        "--reps", type=_reps, default=DEFAULT_REPS, help=f"bootstrap resamples ({DEFAULT_REPS})"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary as the last line")


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Groups the runs, computes IQM, intervals and probabilities of improvement, draws the curves."""
    from sweep import stats
    from sweep.plots import plot_compare
    from sweep.runs import METRICS as RUN_METRICS
    from sweep.runs import common_curves, find_run_dirs, group_runs, load_run

    out = Path(args.out) if args.out else Path("compare.png")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {str(out)!r}")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the directory {out.parent} does not exist")
    metric = RUN_METRICS[args.metric]
    run_dirs = find_run_dirs(args.dirs)
    runs = [run for run in map(load_run, run_dirs) if run is not None and run.score(metric) is not None]
    left_out = len(run_dirs) - len(runs)
    if not runs:
        raise UsageError(
            f"no finished run with a final {metric.name} among {len(run_dirs)} run directories "
            "(a run finishes with metrics.json; Mario alone has clear_rate and x_pos)"
        )
    groups = group_runs(runs)
    estimates = [stats.iqm_interval(group.scores(metric), args.reps) for group in groups]
    order = sorted(range(len(groups)), key=lambda i: -estimates[i].point)
    groups, estimates = [groups[i] for i in order], [estimates[i] for i in order]
    best = groups[0].scores(metric)
    improvements = [stats.improvement_interval(best, group.scores(metric), args.reps) for group in groups[1:]]
    curves = []
    for group in groups:
        steps, values = common_curves(group, metric)
        if steps.size:
            curves.append((steps, *stats.curve_band(values, min(args.reps, 2000))))
        else:
            curves.append((steps, steps, steps, steps))
    plot_compare(
        [g.label for g in groups], curves, [g.scores(metric) for g in groups], estimates, metric, out
    )

    print(
        f"{len(runs)} runs in {len(groups)} groups; score: {metric.score_label}; 95% intervals: stratified "
        f"bootstrap over runs ({args.reps} resamples, rliable)"
        + (f"; left out {left_out} unfinished runs" if left_out else "")
    )
    rows = [["#", "group", "runs", "IQM", "95% CI", "mean"]]
    for index, (group, estimate) in enumerate(zip(groups, estimates, strict=True)):
        scores = group.scores(metric)
        rows.append([str(index + 1), group.label, str(scores.size), f"{estimate.point:.4g}",
                     f"[{estimate.low:.4g}, {estimate.high:.4g}]", f"{scores.mean():.4g}"])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for index, interval in enumerate(improvements, start=2):
        print(
            f"P(#1 > #{index}) = {interval.point:.2f} [{interval.low:.2f}, {interval.high:.2f}] "
            f"(the chance that a run of #1 scores above a run of #{index})"
        )
    print(f"curves -> {out}")
    return {
        "metric": metric.name,
        "score": metric.score_key,
        "runs": len(runs),
        "left_out": left_out,
        "groups": [
            {
                "label": g.label,
                "runs": [str(r.run_dir) for r in g.runs],
                "scores": g.scores(metric).tolist(),
                "iqm": e.point,
                "iqm_ci": [e.low, e.high],
                "mean": float(g.scores(metric).mean()),
            }
            for g, e in zip(groups, estimates, strict=True)
        ],  # fmt: skip
        "improvement": [
            {"x": groups[0].label, "y": g.label, "probability": i.point, "ci": [i.low, i.high]}
            for g, i in zip(groups[1:], improvements, strict=True)
        ],
        "plot": str(out),
    }


def _reps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 100, got {text!r}") from None
    if value < 100:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 100, got {text!r}")
    return value
