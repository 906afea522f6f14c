"""Learning curves: one drawing routine for agent and task runs (matplotlib, Agg, written atomically)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.files import save_figure, signals_deferred

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


@dataclass(frozen=True)
class Panel:
    """One axes of a learning-curve figure.

    Attributes:
        keys: history keys drawn as lines (several: a legend with ``legend``).
        ylabel: the y-axis label.
        legend: one label per key when there are several.
        twin_key: a history key drawn on a second y axis (right), e.g. a test metric beside a loss.
        twin_label: that axis' label.
        log: logarithmic y axis (for a positive loss).
        ylim: fixed y range, e.g. ``(0, 1.02)`` for a rate.
        markers: vertical lines ``(x, text)``, e.g. the step of the first clear.
        points: dots ``(x, y)`` beside the lines, e.g. the greedy evaluations of a run.
        points_label: their legend entry.
    """

    keys: tuple[str, ...]
    ylabel: str
    legend: tuple[str, ...] = ()
    twin_key: str | None = None
    twin_label: str = ""
    log: bool = False
    ylim: tuple[float, float] | None = None
    markers: tuple[tuple[float, str], ...] = ()
    points: tuple[tuple[float, float], ...] = ()
    points_label: str = "greedy eval"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg back end (no display needed), for every picture the lab draws.

    The first import initialises matplotlib's C extensions, and a Ctrl-C inside that surfaces as an
    ImportError rather than a KeyboardInterrupt (a stop would become a crash), so the import holds
    Ctrl-C and SIGTERM back until it is done.
    """
    with signals_deferred():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return plt


def plot_history(
    history: list[dict[str, float]],
    x_key: str,
    panels: list[Panel],
    path: Path,
    title: str = "",
    xlabel: str | None = None,
) -> Path:
    """Draws ``panels`` side by side from a list of history records into a PNG at ``path``.

    Missing values (a key a record lacks, NaN) leave gaps. Returns ``path``.
    """
    plt = pyplot()
    xs = [record[x_key] for record in history]
    width = 4.4 * len(panels) + (1.6 if len(panels) == 1 else 0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.6), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        for index, key in enumerate(panel.keys):
            label = panel.legend[index] if index < len(panel.legend) else None
            axis.plot(xs, [_value(record, key) for record in history], color=COLORS[index % 6], label=label)
        if panel.points:
            axis.scatter(
                *zip(*panel.points, strict=True), s=14, color="black", zorder=3, label=panel.points_label
            )
        if panel.legend or panel.points:
            axis.legend(fontsize=8, loc="best")
        axis.set_xlabel(xlabel or x_key)
        axis.set_ylabel(panel.ylabel, color=COLORS[0] if panel.twin_key else "black")
        axis.grid(alpha=0.3)
        values = [_value(record, key) for record in history for key in panel.keys]
        if panel.log and values and min((v for v in values if not math.isnan(v)), default=0) > 0:
            axis.set_yscale("log")
        if panel.ylim:
            axis.set_ylim(*panel.ylim)
        for index, (x, text) in enumerate(panel.markers):
            color = "tab:green" if "first" in text else "tab:red"
            axis.axvline(x, color=color, linestyle="--", linewidth=1)
            # Each label one line lower than the one before: markers close together (a first clear
            # and 90% clears a few hundred thousand steps apart) would print over each other.
            axis.annotate(text, (x, 0.5), xycoords=("data", "axes fraction"), xytext=(4, -11 * index),
                          textcoords="offset points", color=color, fontsize=8)  # fmt: skip
        if panel.twin_key:
            twin = axis.twinx()
            twin.plot(xs, [_value(record, panel.twin_key) for record in history], color=COLORS[1])
            twin.set_ylabel(panel.twin_label, color=COLORS[1])
            twin.set_ylim(0.0, 1.02)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _value(record: dict[str, float], key: str) -> float:
    value = record.get(key)
    return math.nan if value is None else float(value)
