"""Runs side by side: find them, group them by configuration, read their curves and final scores.

``lab compare`` takes run directories and sweep directories (every trial of a sweep). Runs are
grouped by their config without the fields that do not change what is learnt (the seed, above
all: the runs of a group are its seeds; also the device, threads, env back-end, checkpoint and
evaluation cadence). A group is labelled by the fields in which the groups differ.

A run's curve is a ``metrics.json`` history key over agent steps (the training episodes' recent
mean, the learning curve of ``lab train``); its score is the final greedy evaluation of the
metric (``eval_return_mean``...). A run without ``metrics.json`` did not finish (interrupted, or
stopped early by a sweep's scheduler): it has no final evaluation and is left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.runs import read_run_config
from sweep.spec import SWEEP_FILE, SweepError, value_text
from sweep.trials import TRIALS

#: Config fields that do not change what a run learns; runs differing only in them are one group.
IGNORED_FIELDS = frozenset({
    "seed", "device", "threads", "env_backend", "ray_address", "env_groups", "compile", "checkpoint_every",
    "keep_checkpoints", "eval_every", "eval_episodes",
})  # fmt: skip
#: Points of the common step grid the curves of a group are interpolated on.
CURVE_POINTS = 100


@dataclass(frozen=True)
class Metric:
    """What ``lab compare --metric`` compares: a history curve and a final-evaluation score."""

    name: str
    curve_key: str  # metrics.json history key
    score_key: str  # metrics.json summary key of the final greedy evaluation
    curve_label: str
    score_label: str


METRICS = {
    "return_mean": Metric("return_mean", "return_mean", "eval_return_mean",
                          "mean episode return (last 100 training episodes)", "final greedy return"),
    "clear_rate": Metric("clear_rate", "clear_rate", "eval_clear_rate",
                         "flag reached (last 100 training episodes)", "final greedy clear rate"),
    "x_pos": Metric("x_pos", "x_pos_max_mean", "eval_x_pos_mean",
                    "furthest x (last 100 training episodes)", "final greedy mean x"),
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    """A finished agent run: its directory, algorithm, config and ``metrics.json``."""

    run_dir: Path
    algo: str
    config: dict[str, Any]
    summary: dict[str, Any]
    history: tuple[dict[str, Any], ...]

    def score(self, metric: Metric) -> float | None:
        value = self.summary.get(metric.score_key)
        return None if value is None else float(value)

    def curve(self, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the metric's history, records without a value left out."""
        points = [
            (float(record["step"]), float(record[metric.curve_key]))
            for record in self.history
            if record.get(metric.curve_key) is not None and not math.isnan(float(record[metric.curve_key]))
        ]
        if not points:
            return np.zeros(0), np.zeros(0)
        steps, values = zip(*points, strict=True)
        return np.array(steps), np.array(values)


@dataclass(frozen=True)
class Group:
    """Runs of one configuration (its seeds)."""

    label: str
    runs: tuple[Run, ...]

    def scores(self, metric: Metric) -> np.ndarray:
        return np.array([s for run in self.runs if (s := run.score(metric)) is not None], dtype=float)


def find_run_dirs(paths: list[str]) -> list[Path]:
    """The run directories named: each path is a run directory or a sweep directory (its trials).

    Raises:
        SweepError: a path that is neither, naming what was expected.
    """
    found: dict[Path, None] = {}
    for text in paths:
        path = Path(text)
        if (path / SWEEP_FILE).is_file():
            trials = sorted(p for p in (path / TRIALS).glob("*") if (p / "config.json").is_file())
            found.update(dict.fromkeys(trials))
        elif (path / "config.json").is_file():
            found[path] = None
        elif not path.exists():
            raise SweepError(f"{path} does not exist; give run directories or sweep directories")
        else:
            raise SweepError(
                f"{path} is neither a run directory (config.json) nor a sweep directory ({SWEEP_FILE})"
            )
    return list(found)


def load_run(run_dir: Path) -> Run | None:
    """The finished run in ``run_dir``; None when it has no readable ``metrics.json``.

    Raises:
        SweepError: not an agent run (a supervised task's, or an unreadable ``config.json``).
    """
    algo, config = read_run_config(run_dir, "algo", error=SweepError)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict):
        return None
    history = tuple(r for r in metrics.get("history", []) if isinstance(r, dict) and "step" in r)
    summary = {key: value for key, value in metrics.items() if key != "history"}
    return Run(run_dir, algo, config, summary, history)


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by algorithm and config (without :data:`IGNORED_FIELDS`), in first-seen order."""
    groups: dict[str, list[Run]] = {}
    settings: dict[str, dict[str, Any]] = {}
    for run in runs:
        setting = {"algo": run.algo, **{k: v for k, v in run.config.items() if k not in IGNORED_FIELDS}}
        key = json.dumps(setting, sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
        settings[key] = setting
    differing = [
        name for name in dict.fromkeys(name for s in settings.values() for name in s)
        if len({json.dumps(s.get(name), default=str) for s in settings.values()}) > 1
    ]  # fmt: skip
    result = []
    for key, members in groups.items():
        setting = settings[key]
        if differing:
            label = " ".join(f"{name}={value_text(setting.get(name))}" for name in differing)
        else:
            label = f"{setting['algo']} on {setting.get('env', '?')}"
        result.append(Group(label, tuple(members)))
    return result


def common_curves(group: Group, metric: Metric, points: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """The runs' curves interpolated on one grid of agent steps, up to the shortest run's end.

    Returns:
        ``(steps (points,), values (runs, points))``; empty arrays when no run has the curve.
    """
    curves = [run.curve(metric) for run in group.runs]
    curves = [(steps, values) for steps, values in curves if steps.size]
    if not curves:
        return np.zeros(0), np.zeros((0, 0))
    start = max(steps[0] for steps, _ in curves)
    end = min(steps[-1] for steps, _ in curves)
    grid = np.linspace(start, end, points) if end > start else np.array([end])
    return grid, np.stack([np.interp(grid, steps, values) for steps, values in curves])
