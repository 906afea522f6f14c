"""Helpers of the experiment scripts that drive ``lab`` as a user would (``ssl_rl_experiment``,
``fast_mario``): child processes at a niceness, a run's history as far as it got, curves on a common
grid, bootstrap bands over seeds, and small committed records of finished runs."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


def set_niceness(nice: int) -> None:
    """Raise this process's niceness to ``nice`` (absolute, not an increment: a child of a process
    that is nice already must not add its share again)."""
    os.nice(max(0, nice - os.nice(0)))


def run_lab(
    command: list[str],
    nice: int,
    stop: Callable[[], bool] | None = None,
    capture: bool = False,
    poll: float = 30.0,
) -> tuple[int, str]:
    """``lab COMMAND`` in a child process at ``nice``; prints the command and its wall time. When
    ``stop()`` turns true (asked every ``poll`` seconds) the child gets SIGTERM, which saves and exits 130.
    Exits with the child's status unless it is 0, or 130 after a stop. Returns the status and, with
    ``capture``, the child's stdout (its last line is the ``--json`` summary)."""
    print(f"$ nice -n {nice} lab {' '.join(command)}", flush=True)
    started = time.time()
    child = subprocess.Popen(
        [sys.executable, "-m", "lab", *command],
        preexec_fn=lambda: set_niceness(nice),
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    stopped = False
    while True:
        try:
            # communicate() drains a captured stdout while it waits (a full pipe would block the child).
            out, _ = child.communicate(timeout=poll)
            break
        except subprocess.TimeoutExpired:
            if not stopped and stop is not None and stop():
                child.send_signal(signal.SIGTERM)
                stopped = True
    status = child.returncode
    print(f"  exit {status} after {(time.time() - started) / 60:.1f} min", flush=True)
    if status not in (0, 130) or (status == 130 and not stopped):
        raise SystemExit(status)
    return status, out or ""


def parse_seeds(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """``--seeds 1,2,3`` as integers; anything else is the parser's one-line error (exit 2)."""
    try:
        return [int(seed) for seed in text.split(",") if seed]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {text!r}")


def checkpoint_step(run_dir: Path) -> int:
    """The agent step of a run's newest checkpoint, from its file name (0 without one)."""
    from core.checkpoint import list_checkpoints

    names = list_checkpoints(run_dir / "checkpoints")
    return int(names[-1].stem.rsplit("_", 1)[-1]) if names else 0


class RunState(NamedTuple):
    """What a run recorded as far as it got (metrics.json when it finished, else its newest checkpoint)."""

    history: list[dict[str, Any]]  # the per-update records
    evals: list[dict[str, Any]]  # the greedy evaluations
    until: dict[str, Any] | None  # the summary's --until outcome; None before the run finished


def run_state(run_dir: Path) -> RunState:
    """The run's :class:`RunState` (empty lists without metrics.json or a checkpoint). metrics.json
    counts only when it is as far as the newest checkpoint: a finished run that was resumed and then
    stopped leaves the first finish's metrics.json behind."""
    from agents.engine import load_training_checkpoint

    metrics = run_dir / "metrics.json"
    saved = json.loads(metrics.read_text()) if metrics.exists() else {}
    if int(saved.get("steps", -1)) < checkpoint_step(run_dir):
        loaded = load_training_checkpoint(run_dir)
        saved = loaded[0] if loaded else {}
    return RunState(list(saved.get("history", [])), list(saved.get("evals", [])), saved.get("until"))


def run_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-update records of a run: metrics.json when it finished, else its newest checkpoint's."""
    return run_state(run_dir).history


def steps_reached(run_dir: Path) -> int:
    history = run_history(run_dir)
    return int(history[-1]["step"]) if history else 0


def curve(history: list[dict[str, Any]], key: str, grid: np.ndarray) -> np.ndarray:
    """``key`` of the records interpolated at the agent steps of ``grid`` (NaN before the first
    finite value and after the last record)."""
    xs = np.array([record["step"] for record in history], dtype=float)
    values = np.array([record.get(key, math.nan) for record in history], dtype=float)
    finite = np.isfinite(values)
    if not finite.any():
        return np.full(len(grid), math.nan)
    out = np.interp(grid, xs[finite], values[finite])
    out[(grid < xs[finite][0]) | (grid > xs[-1])] = math.nan
    return out


def bootstrap_band(
    curves: np.ndarray, rng: np.random.Generator, samples: int = 2000
) -> tuple[np.ndarray, ...]:
    """Mean over seeds (rows) and the 2.5 / 97.5 percentiles of the means of resampled seeds; NaN
    where no seed has reached that step."""
    with warnings.catch_warnings():  # the steps no seed reached yet are NaN columns, by design
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(curves, axis=0)
        if len(curves) < 2:
            return mean, mean, mean
        picks = rng.integers(0, len(curves), (samples, len(curves)))
        means = np.nanmean(curves[picks], axis=1)  # (samples, grid)
        return mean, np.nanpercentile(means, 2.5, axis=0), np.nanpercentile(means, 97.5, axis=0)


def save_record(path: Path, record: dict[str, Any]) -> None:
    """A finished run's record, small enough to commit (the run directories are gitignored)."""
    from core.files import atomic_write_json, jsonable

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, jsonable(record))
    print(f"  recorded {path}", flush=True)


def load_record(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None
