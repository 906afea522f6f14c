"""The results of a sweep: one row per trial, one per configuration ranked by the metric.

A trial's score is its final greedy evaluation when it finished, else its last periodic one (a
trial that ASHA stopped early was stopped because that number was poor). A configuration's score
is the mean of its seeds' scores, with their standard deviation as the spread across seeds. The
configurations with a finished seed rank above those without one: a score from a lower rung is not
comparable with one at the full budget, and the best configuration is one that went the distance.

Written into the sweep directory:

* ``results.csv``: the configurations, best first (rank, key, the swept values, mean, std, seeds);
* ``trials.csv``: every trial (key, seed, values, status, agent steps, score, attempts, run dir);
* ``results.json``: both, with the sweep's spec.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.files import atomic_write_bytes, atomic_write_json, jsonable
from sweep.spec import SweepSpec, value_text
from sweep.trials import FINISHED, PENDING, RUNNING, STOPPED, TrialRecord, read_evals, trial_dir

RESULTS_CSV = "results.csv"
TRIALS_CSV = "trials.csv"
RESULTS_JSON = "results.json"


@dataclass(frozen=True)
class TrialRow:
    """One trial as the sweep left it.

    Attributes:
        key: the configuration's key.
        seed: the seed.
        params: the configuration's values.
        status: finished, stopped, error, running (cut off) or pending (never started).
        steps: agent steps trained (the last evaluation's, or the final one's).
        score: the final greedy evaluation of the metric, else the last periodic one (None: none yet).
        final: the final greedy evaluation of the metric (finished trials only).
        evals: ``(step, value)`` of the metric at each periodic evaluation.
        trainings: how many processes trained it (1 unless a sweep was interrupted).
        run_dir: its lab run directory.
    """

    key: str
    seed: int
    params: dict[str, Any]
    status: str
    steps: int
    score: float | None
    final: float | None
    evals: tuple[tuple[int, float], ...]
    trainings: int
    run_dir: str


@dataclass(frozen=True)
class ConfigRow:
    """One configuration across its seeds, ranked by ``mean``.

    Attributes:
        rank: 1 for the best.
        key: the configuration's key.
        params: its values.
        mean: the mean of its seeds' scores (None when no seed has one).
        std: their standard deviation (ddof=1; 0 for one seed).
        scores: each seed's score, in seed order (None: no evaluation yet).
        finals: each seed's final greedy evaluation (None: not finished).
        finished: how many seeds finished (the others were stopped early, failed or are unfinished).
        seeds: the seeds.
    """

    rank: int
    key: str
    params: dict[str, Any]
    mean: float | None
    std: float | None
    scores: tuple[float | None, ...]
    finals: tuple[float | None, ...]
    finished: int
    seeds: tuple[int, ...]

    @property
    def label(self) -> str:
        return " ".join(f"{name}={value_text(value)}" for name, value in self.params.items()) or self.key


def collect(sweep_dir: Path, spec: SweepSpec, tune_status: dict[str, str] | None = None) -> list[TrialRow]:
    """Every trial of the sweep, from the trials' own records (``trial.json``, ``evals.jsonl``).

    Args:
        tune_status: Tune's status by trial name, when known. A trial sees a stop, not why: one
            stopped while Tune did not end it (the whole sweep was interrupted) is unfinished, and
            one cut off while Tune ended it was stopped by the scheduler.
    """
    rows = []
    for configuration, seed in spec.trials():
        run_dir = trial_dir(sweep_dir, configuration.key, seed)
        record = TrialRecord.read(run_dir)
        status = record.status if record is not None else PENDING
        tune = (tune_status or {}).get(run_dir.name)
        if status == STOPPED and tune not in (None, "TERMINATED"):
            status = RUNNING
        elif status == RUNNING and tune == "TERMINATED":
            status = STOPPED
        evals = tuple(
            (int(point["step"]), float(point[spec.metric]))
            for point in read_evals(run_dir)
            if point.get(spec.metric) is not None
        )
        final = record.final if record is not None and record.status == FINISHED else None
        final_value = None if final is None else final.get(spec.metric)
        score = final_value if final_value is not None else (evals[-1][1] if evals else None)
        steps = int(final["step"]) if final else (evals[-1][0] if evals else 0)
        rows.append(
            TrialRow(
                key=configuration.key, seed=seed, params=configuration.params,
                status=status, steps=steps, score=score,
                final=final_value, evals=evals, trainings=record.trainings if record is not None else 0,
                run_dir=str(run_dir),
            )
        )  # fmt: skip
    return rows


def rank(spec: SweepSpec, trials: list[TrialRow]) -> list[ConfigRow]:
    """The configurations, best mean score first among those with a finished seed, then the others.

    Ties: more seeds finished first.
    """
    rows = []
    for configuration in spec.configurations:
        mine = sorted((t for t in trials if t.key == configuration.key), key=lambda t: t.seed)
        scores = [t.score for t in mine]
        known = np.array([s for s in scores if s is not None], dtype=float)
        rows.append(
            ConfigRow(
                rank=0, key=configuration.key, params=configuration.params,
                mean=float(known.mean()) if known.size else None,
                std=float(known.std(ddof=1)) if known.size > 1 else (0.0 if known.size else None),
                scores=tuple(scores), finals=tuple(t.final for t in mine),
                finished=sum(t.status == FINISHED for t in mine), seeds=tuple(t.seed for t in mine),
            )
        )  # fmt: skip
    rows.sort(key=lambda row: (row.mean is None, row.finished == 0, -(row.mean or 0.0), -row.finished))
    return [ConfigRow(**{**asdict(row), "rank": index + 1}) for index, row in enumerate(rows)]


def counts(trials: list[TrialRow]) -> dict[str, int]:
    """How many trials ended each way: ``{"finished": 9, "stopped": 7, ...}``."""
    result: dict[str, int] = {}
    for trial in trials:
        result[trial.status] = result.get(trial.status, 0) + 1
    return result


def write_results(
    sweep_dir: Path, spec: SweepSpec, trials: list[TrialRow], configs: list[ConfigRow]
) -> list[Path]:
    """Writes ``results.csv``, ``trials.csv`` and ``results.json``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    names = list(spec.params)
    config_lines = [
        [row.rank, row.key, *(value_text(row.params[n]) for n in names), _number(row.mean), _number(row.std),
         row.finished, len(row.seeds), " ".join(_number(s) for s in row.scores)]
        for row in configs
    ]  # fmt: skip
    trial_lines = [
        [t.key, t.seed, *(value_text(t.params[n]) for n in names), t.status, t.steps, _number(t.score),
         _number(t.final), t.trainings, t.run_dir]
        for t in trials
    ]  # fmt: skip
    metric = spec.metric
    paths = [sweep_dir / RESULTS_CSV, sweep_dir / TRIALS_CSV, sweep_dir / RESULTS_JSON]
    atomic_write_bytes(
        paths[0],
        _csv(["rank", "config", *names, f"{metric}_mean", f"{metric}_std", "finished", "seeds", "scores"],
             config_lines),
    )  # fmt: skip
    atomic_write_bytes(
        paths[1],
        _csv(["config", "seed", *names, "status", "steps", f"{metric}_score", f"{metric}_final", "trainings",
              "run_dir"], trial_lines),
    )  # fmt: skip
    atomic_write_json(
        paths[2],
        jsonable({"sweep": spec.to_json(), "metric": metric, "counts": counts(trials),
                  "configurations": [asdict(row) for row in configs], "trials": [asdict(t) for t in trials]}),
    )  # fmt: skip
    return paths


def format_table(spec: SweepSpec, configs: list[ConfigRow], limit: int = 20) -> str:
    """The ranked configurations as aligned text (the best ``limit``)."""
    names = list(spec.params)
    header = ["rank", "config", *names, f"{spec.metric} (mean ± std over seeds)", "finished"]
    lines = [
        [str(row.rank), row.key, *(value_text(row.params[n]) for n in names),
         "n/a" if row.mean is None else f"{row.mean:.4g} ± {row.std or 0.0:.3g}",
         f"{row.finished}/{len(row.seeds)}"]
        for row in configs[:limit]
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            for line in [header, *lines]]  # fmt: skip
    if len(configs) > limit:
        text.append(f"... and {len(configs) - limit} more in {RESULTS_CSV}")
    return "\n".join(text)


def _number(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def _csv(header: list[str], rows: list[list[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()
