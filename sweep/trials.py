"""One trial of a sweep: an ordinary lab run directory, trained by the lab's own engine.

A trial is a configuration and a seed of a sweep. It lives in ``DIR/trials/<key>-seed<k>/``, a run
directory like any other (``config.json``, ``checkpoints/``, TensorBoard events, ``metrics.json``
once finished), so ``lab eval``, ``lab watch``, ``lab explain`` and ``lab compare`` take it as it
is. Two files of its own say what the sweep did with it:

* ``trial.json``: its status (running, finished, stopped early, error), each attempt (when, from
  which agent step, how it ended) and the final greedy evaluation;
* ``evals.jsonl``: one line per periodic greedy evaluation, the numbers the scheduler judged.

:func:`run_trial` is the whole of a trial and knows nothing of Ray: it is given ``report``, which
hands each periodic evaluation to the scheduler and answers whether to go on. A trial whose
``trial.json`` says finished is never trained again (a sweep killed after a trial finished, but
before Tune recorded it, starts that trial once more: it answers with its recorded result). An
unfinished one continues from its newest checkpoint.

A run has one writer: a trial holds its directory's lock while it trains (:func:`trial_lock`),
and a sweep's driver holds the sweep directory's (:func:`sweep_lock`), so a second
``lab sweep --resume DIR`` while one runs is refused. Both locks go with their process, SIGKILL
included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.checkpoint import latest_checkpoint
from core.files import atomic_write_json, jsonable
from core.runs import CHECKPOINTS, write_run_config
from sweep.spec import METRICS, SweepError, read_sweep

TRIALS = "trials"
TRIAL_FILE = "trial.json"
EVALS_FILE = "evals.jsonl"
LOCK_FILE = ".trial.lock"
SWEEP_LOCK_FILE = ".sweep.lock"
#: How long a trial waits for an earlier process of the same trial to let go of its directory.
LOCK_WAIT_SECONDS = 120.0
#: Eval summary keys a trial reports (those its env has).
REPORTED = (*METRICS, "return_std", "length_mean")

#: Per-trial statuses; ``running`` in a sweep that is not running means cut off (resume continues it).
FINISHED, STOPPED, ERROR, RUNNING, PENDING = "finished", "stopped", "error", "running", "pending"
#: The outcome of an attempt that found the trial finished already and trained nothing.
SKIPPED = "skipped: finished before"

#: ``report(result) -> go on?``: hands a periodic evaluation to the scheduler.
Reporter = Callable[[dict[str, Any]], bool]


def trial_dir(sweep_dir: Path, key: str, seed: int) -> Path:
    """``DIR/trials/<key>-seed<seed>``: the run directory of one configuration and seed."""
    return Path(sweep_dir) / TRIALS / f"{key}-seed{seed}"


@dataclass
class Attempt:
    """One process's go at a trial."""

    started: str
    from_step: int
    host: str
    pid: int
    outcome: str = RUNNING
    ended: str | None = None


@dataclass
class TrialRecord:
    """``trial.json``: what the sweep did with one trial.

    Attributes:
        key: the configuration's key.
        seed: the seed.
        params: the configuration's values.
        status: finished, stopped (by the scheduler), error, running (or cut off) or pending.
        attempts: every process that took the trial up, in order.
        final: the final greedy evaluation of a finished trial (eval summary keys, and ``step``).
        error: the one-line error of a failed trial.
    """

    key: str
    seed: int
    params: dict[str, Any]
    status: str = PENDING
    attempts: list[Attempt] = field(default_factory=list)
    final: dict[str, Any] | None = None
    error: str | None = None

    @property
    def trainings(self) -> int:
        """Attempts that trained (an attempt that found the trial finished does not count)."""
        return sum(1 for attempt in self.attempts if attempt.outcome != SKIPPED)

    def write(self, run_dir: Path) -> None:
        atomic_write_json(run_dir / TRIAL_FILE, jsonable(dataclasses.asdict(self)))

    @classmethod
    def read(cls, run_dir: Path) -> TrialRecord | None:
        """The record in ``run_dir``, or None when the trial never started (or it is unreadable)."""
        try:
            data = json.loads((Path(run_dir) / TRIAL_FILE).read_text())
            data["attempts"] = [Attempt(**attempt) for attempt in data.get("attempts", [])]
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError):
            return None


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    """The periodic evaluations of a trial by agent step; a step evaluated again after a resume
    keeps its last value."""
    by_step: dict[int, dict[str, Any]] = {}
    path = Path(run_dir) / EVALS_FILE
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            point = json.loads(line)
            by_step[int(point["step"])] = point
    return [by_step[step] for step in sorted(by_step)]


@contextlib.contextmanager
def trial_lock(run_dir: Path, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Holds the trial's directory for this process: a run has one writer.

    An earlier process of the same trial (one a killed sweep left behind) may still be saving its
    checkpoint; the lock waits for it, then raises if it never lets go.
    """
    with open(run_dir / LOCK_FILE, "a+") as handle:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SweepError(f"{run_dir} is in use by another process for {wait:.0f} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """One driver per sweep directory: a second ``lab sweep --resume DIR`` while the first runs is
    refused (the lock goes with the process, SIGKILL included)."""
    path = Path(sweep_dir) / SWEEP_LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            raise SweepError(
                f"{sweep_dir} is being run by another `lab sweep` (pid {pid}); wait for it to end"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class StopTrial(Exception):
    """The scheduler stopped the trial (internal: turned into a saved, closed run)."""


def run_trial(sweep_dir: str | Path, key: str, seed: int, report: Reporter) -> dict[str, Any] | None:
    """Trains (or continues) one trial of the sweep in ``sweep_dir`` in its run directory.

    Args:
        sweep_dir: the sweep's directory (``sweep.json`` says the rest).
        key: the configuration's key.
        seed: the seed.
        report: called with each periodic evaluation (agent ``step`` and the eval summary's
            numbers); returns False when the scheduler stops the trial. The run then stops as on
            Ctrl-C: it waits for the update in flight, saves a checkpoint and closes its envs.

    Returns:
        The final result (``step``, the final greedy evaluation's numbers, ``finished``: True), or
        None when the scheduler stopped the trial.

    Raises:
        Whatever training raised, after ``trial.json`` recorded it as the trial's error.
    """
    spec = read_sweep(sweep_dir)
    configuration = spec.configuration(key)
    run_dir = trial_dir(Path(sweep_dir), key, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    with trial_lock(run_dir):
        record = TrialRecord.read(run_dir) or TrialRecord(key, seed, configuration.params)
        start = _checkpoint_step(run_dir)
        attempt = Attempt(_now(), start, socket.gethostname(), os.getpid())
        record.attempts.append(attempt)
        if record.status == FINISHED and record.final is not None:
            attempt.outcome, attempt.ended = SKIPPED, _now()
            record.write(run_dir)
            return record.final
        module, config = spec.trial_config(configuration, seed)
        write_run_config(run_dir, "algo", module.ALGO, config)
        record.status, record.error = RUNNING, None
        record.write(run_dir)

        def on_eval(step: int, summary: dict[str, Any], final: bool) -> None:
            if final:  # reported once the run has finished and written its metrics
                return
            point = {"step": int(step), **{k: float(summary[k]) for k in REPORTED if k in summary}}
            with open(run_dir / EVALS_FILE, "a") as handle:
                handle.write(json.dumps(point) + "\n")
            # The last periodic evaluation is not the scheduler's to judge: the final one follows
            # within the interval, and a stop now would only lose it.
            if step + config.eval_every <= config.total_steps and not report(point):
                raise StopTrial

        try:
            summary = module.train(config, run_dir, resume=start > 0, progress=False, on_eval=on_eval)
        except BaseException as error:
            stopped = _raised(error, StopTrial)
            record.status = STOPPED if stopped else ERROR
            attempt.outcome = record.status
            if not stopped:
                record.error = " ".join(str(error).split()) or type(error).__name__
            attempt.ended = _now()
            record.write(run_dir)
            if stopped:
                return None
            raise
        final = {"step": int(summary["steps"]), "finished": True}
        final.update({k: summary[f"eval_{k}"] for k in REPORTED if f"eval_{k}" in summary})
        record.status, record.final = FINISHED, final
        attempt.outcome, attempt.ended = FINISHED, _now()
        record.write(run_dir)
        return final


def _raised(error: BaseException, kind: type[BaseException]) -> bool:
    """``error`` is ``kind`` or was caused by it (the engine wraps errors of a run in TrainingStopped)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, kind):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _checkpoint_step(run_dir: Path) -> int:
    sidecar = latest_checkpoint(run_dir / CHECKPOINTS)
    return 0 if sidecar is None else int(sidecar.stem.rsplit("_", 1)[-1])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
