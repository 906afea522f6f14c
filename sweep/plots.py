"""Pictures of sweeps and comparisons (matplotlib, Agg, written atomically by ``core.files``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.files import save_figure
from core.plots import pyplot
from sweep.spec import SweepSpec, value_text

if TYPE_CHECKING:
    from sweep.results import ConfigRow, TrialRow
    from sweep.runs import Metric
    from sweep.stats import Interval

COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
)
#: Configurations drawn in colour in a sweep's picture (the rest in grey).
HIGHLIGHT = 3
#: Swept parameters given a panel of their own (score against the value).
PARAM_PANELS = 3


def plot_sweep(spec: SweepSpec, trials: list[TrialRow], configs: list[ConfigRow], path: Path) -> Path:
    """A sweep at a glance: every trial's periodic evaluations over agent steps (the best
    configurations in colour, trials stopped early ending in a cross) and each configuration's
    seed scores with their mean (top row); the score against each swept value (bottom row).
    Filled dots are final greedy evaluations, hollow ones the last evaluation of a trial that did
    not finish."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    params = list(spec.params)[:PARAM_PANELS]
    rows = 2 if params else 1
    fig = plt.figure(figsize=(13, 4.2 * rows))
    grid = fig.add_gridspec(rows, 6)
    curves, bars = fig.add_subplot(grid[0, :4]), fig.add_subplot(grid[0, 4:])
    width = 6 // max(len(params), 1)
    value_axes = [fig.add_subplot(grid[1, i * width : (i + 1) * width]) for i in range(len(params))]
    rank_of = {row.key: row.rank for row in configs}
    color_of = {row.key: COLORS[i % len(COLORS)] for i, row in enumerate(configs[:HIGHLIGHT])}
    for trial in sorted(trials, key=lambda t: (rank_of.get(t.key, 0), t.seed)):
        if not trial.evals:
            continue
        steps, values = np.array(trial.evals).T
        color = color_of.get(trial.key, "0.7")
        highlighted = trial.key in color_of
        first_seed = trial.seed == min(t.seed for t in trials if t.key == trial.key and t.evals)
        label = f"#{rank_of[trial.key]} {trial.key}" if highlighted and first_seed else None
        curves.plot(steps, values, color=color, alpha=0.9 if highlighted else 0.6, label=label,
                    zorder=3 if highlighted else 2)  # fmt: skip
        if trial.status == "stopped":
            curves.plot(steps[-1], values[-1], "x", color=color, markersize=6, zorder=4)
    curves.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    curves.set_xlabel("agent steps")
    curves.set_ylabel(f"greedy eval {spec.metric}")
    curves.set_title("periodic evaluations of every trial (x: stopped early)", fontsize=9)
    curves.grid(alpha=0.3)
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=8, loc="lower right")

    for index, row in enumerate(configs):
        color = color_of.get(row.key, "0.5")
        for score, final in zip(row.scores, row.finals, strict=True):
            if score is not None:
                _dot(bars, index, score, color, final is not None)
        if row.mean is not None:
            bars.plot([index - 0.3, index + 0.3], [row.mean, row.mean], color=color, linewidth=2)
    bars.set_xticks(range(len(configs)), [f"#{row.rank}" for row in configs], fontsize=8)
    bars.set_ylabel(f"score ({spec.metric})")
    bars.set_title("each seed's score and their mean, best first", fontsize=9)
    bars.grid(alpha=0.3, axis="y")

    for axis, name in zip(value_axes, params, strict=True):
        numeric = all(isinstance(t.params[name], int | float) for t in trials)
        labels = sorted({value_text(t.params[name]) for t in trials})
        for trial in trials:
            if trial.score is not None:
                x = trial.params[name] if numeric else labels.index(value_text(trial.params[name]))
                _dot(axis, x, trial.score, color_of.get(trial.key, "0.5"), trial.final is not None)
        if spec.params[name].startswith("loguniform"):
            axis.set_xscale("log")
        if not numeric:
            axis.set_xticks(range(len(labels)), labels, fontsize=8)
        axis.set_xlabel(name)
        axis.set_ylabel(f"score ({spec.metric})")
        axis.grid(alpha=0.3)
    fig.suptitle(
        f"sweep: {spec.algo} on {spec.env}, {len(configs)} configurations x {len(spec.seeds)} seeds "
        "(filled: final greedy eval; hollow: stopped early)",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def _dot(axis, x: float, y: float, color: str, filled: bool) -> None:  # noqa: ANN001 - a matplotlib Axes
    axis.plot(
        [x], [y], "o", color=color, alpha=0.8, markersize=5, markerfacecolor=color if filled else "none"
    )


def plot_compare(
    labels: list[str],
    curves: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    scores: list[np.ndarray],
    intervals: list[Interval],
    metric: Metric,
    path: Path,
) -> Path:
    """Learning curves (mean and pointwise 95% bootstrap band across seeds) and the final scores
    (each run, the IQM and its 95% interval) of groups of runs.

    Args:
        labels: one per group.
        curves: per group ``(steps, mean, low, high)`` (empty arrays: no curve).
        scores: per group, its runs' final scores.
        intervals: per group, the IQM and its interval.
        metric: what is compared.
        path: the PNG to write.
    """
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for index, (label, (steps, mean, low, high)) in enumerate(zip(labels, curves, strict=True)):
        if not steps.size:
            continue
        color = COLORS[index % len(COLORS)]
        left.plot(steps, mean, color=color, label=f"#{index + 1} {label}")
        left.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    left.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    left.set_xlabel("agent steps")
    left.set_ylabel(metric.curve_label)
    left.set_title("mean across seeds, 95% bootstrap band", fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")
    for index, (runs, interval) in enumerate(zip(scores, intervals, strict=True)):
        color = COLORS[index % len(COLORS)]
        right.plot([index] * len(runs), runs, "o", color=color, alpha=0.5, markersize=4)
        right.errorbar([index], [interval.point], yerr=[[interval.point - interval.low], [interval.high - interval.point]],
                       fmt="D", color=color, capsize=5, markersize=6)  # fmt: skip
    right.set_xticks(range(len(labels)), [f"#{i + 1}" for i in range(len(labels))])
    right.set_xlim(-0.6, len(labels) - 0.4)
    right.set_ylabel(metric.score_label)
    right.set_title("runs, IQM and its 95% interval", fontsize=9)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)
