"""The Ray Tune driver of ``lab sweep``: the grid of configurations x seeds, ASHA, and resuming.

Each trial is a :class:`LabTrial`, a Tune ``Trainable`` whose ``step`` is one periodic greedy
evaluation of a lab run (:func:`sweep.trials.run_trial`, trained by the lab's engine in a thread
of the trial's actor). The run waits after each evaluation until Tune decides: the next ``step``
lets it go on; a stop (ASHA judged it poor) makes the run save a checkpoint and close its envs
before the actor goes, so a trial stopped early is still a loadable run directory.

Where things are (``DIR`` is the sweep's directory)::

    DIR/sweep.json                  the plan (sweep.spec.SweepSpec)
    DIR/trials/<key>-seed<k>/       each trial's lab run directory (sweep.trials)
    DIR/tune/                       Tune's experiment state, what ``Tuner.restore`` reads

``lab sweep --resume DIR`` restores the Tune experiment (``tune.Tuner.restore``): finished trials
are not run again, unfinished and failed ones continue from their newest lab checkpoint. Tune
saves its state every few seconds, so a trial may have finished after the last save: Tune then
starts it once more and the trial, finding ``trial.json`` finished, answers at once with its
recorded result. Tune's experiment state is pickled: restore only sweep directories you trust.

Resources: each trial asks Ray for ``trial_cpus`` CPUs (one by default, with ``threads=1``), so
as many trials run at once as the cluster has CPUs, and none fights another for a core.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

from sweep.spec import SweepSpec
from sweep.trials import run_trial

TUNE_DIR = "tune"
#: How long a stopped trial may take to save its checkpoint and close its envs before Ray ends it.
STOP_GRACE_SECONDS = 120.0
#: ASHA keeps the best 1/2 of the trials at each rung; the first rung is two evaluations in.
REDUCTION_FACTOR = 2
GRACE_EVALS = 2


class LabTrial(tune.Trainable):
    """One trial: a lab run in a thread; each ``step`` returns its next periodic evaluation.

    Tune's config of the trial: ``sweep_dir`` (absolute), ``configuration`` (the key) and ``seed``.
    """

    def setup(self, config: dict[str, Any]) -> None:
        self.results: queue.Queue[dict[str, Any] | BaseException] = queue.Queue()
        self.go_on = threading.Semaphore(0)  # released by each step after the first: "continue"
        self.stopping = threading.Event()
        self.first_step = True
        self.thread = threading.Thread(
            target=self._train, args=(config["sweep_dir"], config["configuration"], int(config["seed"])),
            name="lab-trial", daemon=True,
        )  # fmt: skip
        self.thread.start()

    def _train(self, sweep_dir: str, key: str, seed: int) -> None:
        try:
            final = run_trial(sweep_dir, key, seed, self._report)
        except BaseException as error:  # the trial's error, for Tune to record as the trial's
            self.results.put(RuntimeError(" ".join(str(error).split()) or type(error).__name__))
            return
        if final is not None:
            self.results.put({**final, "done": True})

    def _report(self, result: dict[str, Any]) -> bool:
        """Hands a periodic evaluation to Tune and waits for its decision (True: go on)."""
        self.results.put({**result, "finished": False})
        self.go_on.acquire()
        return not self.stopping.is_set()

    def step(self) -> dict[str, Any]:
        if not self.first_step:
            self.go_on.release()  # Tune asks for more: the run goes on
        self.first_step = False
        result = self.results.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def cleanup(self) -> None:
        # Finished, failed or stopped by the scheduler: a run still waiting for a decision stops,
        # saves and closes before the actor goes.
        self.stopping.set()
        self.go_on.release()
        self.thread.join(timeout=STOP_GRACE_SECONDS)


class SweepProgress(tune.Callback):
    """One line per evaluation, per trial stopped early and per failure, as they happen."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        value = result.get(self.metric)
        what = "final greedy eval" if result.get("finished") else "eval"
        text = "n/a" if value is None else f"{value:.3g}"
        print(f"  {trial}  step {int(result.get('step', 0)):>10,}  {what}: {self.metric} {text}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        last = trial.last_result or {}
        if not last.get("finished"):
            print(f"  {trial}  stopped early (ASHA) at step {int(last.get('step', 0)):,}", flush=True)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        print(f"  {trial}  failed; see its trial.json", flush=True)


def trial_name(trial: Trial) -> str:
    """``<key>-seed<k>``, as the trial's lab run directory is named."""
    return f"{trial.config['configuration']}-seed{trial.config['seed']}"


def param_space(spec: SweepSpec, sweep_dir: Path) -> dict[str, Any]:
    """Tune's grid: every configuration key times every seed."""
    return {
        "sweep_dir": str(sweep_dir),
        "configuration": tune.grid_search([configuration.key for configuration in spec.configurations]),
        "seed": tune.grid_search(list(spec.seeds)),
    }


def scheduler(spec: SweepSpec) -> ASHAScheduler | None:
    """ASHA on agent steps: rungs at 2, 4, 8... evaluations; never at the trial's end, where the
    final evaluation is reported and a stop would only lose it."""
    if spec.scheduler == "none":
        return None
    grace = min(GRACE_EVALS * spec.eval_every, spec.total_steps)
    return ASHAScheduler(
        time_attr="step", max_t=spec.total_steps + 1, grace_period=grace, reduction_factor=REDUCTION_FACTOR
    )


def run_sweep(sweep_dir: Path, spec: SweepSpec, resume: bool) -> dict[str, str]:
    """Runs (or continues) the sweep on the Ray this process is connected to (``ensure_ray``).

    Returns:
        Tune's status of each trial by name (``<key>-seed<k>``): TERMINATED (finished or stopped by
        the scheduler), ERROR, or PENDING/RUNNING/PAUSED when the sweep was interrupted.
    """
    # Tune's own tables and banners stay quiet (verbose=0 with the classic reporter); the
    # progress callback prints what a sweep needs.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's result tables come from its own trial logs, which trials restarted by a resume may lack;
    # the sweep reads its results from the trials' records instead, so that warning is noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    sweep_dir = Path(sweep_dir).resolve()
    trainable = tune.with_resources(LabTrial, {"cpu": spec.trial_cpus})
    experiment = sweep_dir / TUNE_DIR
    if resume and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    else:  # a new sweep, or one killed before Tune first saved its state
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec, sweep_dir),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode="max", scheduler=scheduler(spec),
                trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR, storage_path=str(sweep_dir), verbose=0,
                callbacks=[SweepProgress(spec.metric)],
                failure_config=tune.FailureConfig(max_failures=0),
                checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=0, checkpoint_at_end=False),
            ),
        )  # fmt: skip
    tuner.fit()
    return {trial_name(trial): trial.status for trial in tune.ExperimentAnalysis(str(experiment)).trials}
