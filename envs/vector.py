"""A subprocess vector env that steps several sub-envs per worker, observations in shared memory.

Why not Gymnasium's ``AsyncVectorEnv``: it runs exactly one sub-env per process. PPO wants 8-16
Mario envs, and on a machine with 2 cores that is 8-16 processes time-sharing 2 cores, with one
pipe message, one pickled info dict and one process wake-up per sub-env per step. Here each
worker owns ``envs_per_worker`` sub-envs and steps them one after another: one message each way
per worker per step, observations written straight into one shared array (never pickled), infos
merged with one numpy call per key (``merge_infos``), and by default one worker per core. The
main process then spends about half the CPU per step that it would with AsyncVectorEnv, time in
which the workers wait (``lab bench env``; benchmarks/RESULTS.md).

Semantics are Gymnasium's ``AutoresetMode.SAME_STEP``, as in ``SyncVectorEnv``: when a sub-env's
episode ends, the same step returns the first observation of its next episode, with
``infos["final_obs"]`` and ``infos["final_info"]`` (dict-of-arrays with ``_key`` masks).

Worker failures
---------------
Gymnasium's ``AsyncVectorEnv`` and SB3's ``SubprocVecEnv`` die with the first failed worker; a
Mario run of many hours must not. Three kinds of failure are caught, during ``step`` and ``reset``:

* ``"exception"``: a sub-env raised (the worker reports the traceback, then exits);
* ``"crash"``: the worker process died (segfault in the emulator, the OOM killer, ``kill -9``);
* ``"hang"``: no reply within ``step_timeout`` seconds and a grace of ``HANG_GRACE`` after it (the
  worker is then killed).

The failed worker is restarted: killed if still alive, then a new pipe and process rebuild its
sub-envs from the same ``env_fns`` and reset each with a fresh, deterministic seed (derived from
the sub-env's last reset seed, its index and the restart count). Its sub-envs' episodes are
*dropped*; the other workers' sub-envs are not touched. For each dropped sub-env ``i`` that step
returns

* ``obs[i]``: the first observation of a fresh episode;
* ``rewards[i] = 0``, ``terminations[i] = True``, ``truncations[i] = False``;
* ``infos["dropped"][i] = True`` (with its ``_dropped`` mask; the key is only there when
  something was dropped), ``infos["final_obs"][i]`` = the same reset observation, and no
  ``final_info`` entry, so episode statistics never count the cut-off episode.

Why a termination, not a truncation: the true last observation died with the worker, and agents
bootstrap a truncation from ``final_obs`` (PPO adds ``gamma * V(final_obs)``, DQN uses it as the
next state). Bootstrapping from a reset observation would chain the value of a fresh start onto
the old episode, so the dropped step is a termination with reward 0: nothing is bootstrapped and
GAE / n-step returns stop there. The price is one transition ``(obs_t, action_t)`` per failure
labelled "episode ends with reward 0", a small pessimistic bias on one sample among thousands;
agents that want none can mask the steps where ``infos["dropped"]`` is set out of their loss
(PPO) or not store them (DQN). (A truncation that bootstraps from the *previous* observation would
be nearly unbiased, but it needs a copy of every observation kept on the hot path, and
``copy=False`` would have none.)

Every failure is counted (``restarts``, ``failure_counts[kind]``, ``dropped_episodes``) and
logged as a warning on the ``envs.vector`` logger. More than ``max_restarts`` failures within
``restart_window`` vector steps mean the env is broken, not flaky: :class:`EnvWorkerError` (a
``RuntimeError``) is raised, naming the count and the last error, and training stops.
``max_restarts=0`` turns recovery off. A sub-env that cannot even be built at construction raises
at once. A failure inside ``call``/``set_attr`` raises ``RuntimeError`` in the caller; a crash or
hang there restarts the worker first, so the vector env stays usable.

Hot path cost of all this: one ``poll(2)`` per worker per step (the timeout), about 3 us, and
nothing else. Measured A/B against the version without recovery, 8 envs in 2 workers on a loaded
2-core machine: main-process CPU per step 273 vs 273 us with Mario-sized (4, 84, 84) observations,
220 vs 225 us with CartPole (medians of 6 runs; the differences are noise).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import math
import multiprocessing as mp
import multiprocessing.util
import os
import select
import signal
import time
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

logger = logging.getLogger(__name__)

FAILURE_KINDS = ("exception", "crash", "hang")
DEFAULT_STEP_TIMEOUT = 60.0
DEFAULT_MAX_RESTARTS = 5
DEFAULT_RESTART_WINDOW = 100
#: Seconds a worker still gets once its deadline has passed: a process group that was stopped (SIGSTOP,
#: Ctrl-Z) and continued finds every deadline gone although no worker could reply in the meantime.
HANG_GRACE = 2.0


# The vector envs not closed yet. At interpreter exit they are closed before multiprocessing's own
# exit handler runs: that handler sends SIGTERM to daemonic children and then joins them, and the
# workers ignore SIGTERM (stopping is the main process's business, see _worker), so a script that
# never closes its env, or a stop signal that arrives while an env is being built, would leave the
# process waiting for its workers forever. atexit runs the handlers registered last first, and
# multiprocessing.util (imported above) registered its handler already.
_OPEN_ENVS: weakref.WeakSet[SubprocVectorEnv] = weakref.WeakSet()


@atexit.register
def _close_open_envs() -> None:
    for vec_env in list(_OPEN_ENVS):
        vec_env.close(terminate=True)


class EnvWorkerError(RuntimeError):
    """A vector env worker failed for good: too many restarts, or it could not start at all."""


class _WorkerFailure(Exception):
    """One failed reply of one worker (internal: turned into a restart or an EnvWorkerError)."""

    def __init__(self, worker: int, kind: str, summary: str, details: str = "") -> None:
        super().__init__(summary)
        self.worker, self.kind, self.summary, self.details = worker, kind, summary, details


class WorkerGroups:
    """What :class:`SubprocVectorEnv` and ``envs.ray_vector.RayVectorEnv`` share: groups of sub-envs in
    workers, their restarts, and the commands sent to every sub-env.

    A failed worker (a process, or a Ray actor) is counted, logged and restarted through the class's
    ``_restart(worker, grace)``; more than ``max_restarts`` failures within ``restart_window`` vector
    steps close the env and raise :class:`EnvWorkerError`. The class sets ``max_restarts``,
    ``restart_window``, ``_seed``, ``_reset_seeds`` and ``_num_steps`` and calls :meth:`_init_recovery`.
    """

    unit = "worker"  # what one restart replaces, for the log
    num_envs: int
    max_restarts: int
    restart_window: int
    _seed: int | None
    _reset_seeds: list[int | None]
    _num_steps: int
    _slices: list[slice]  # the sub-envs of each worker

    def _init_recovery(self) -> None:
        self.restarts = 0
        self.failure_counts = dict.fromkeys(FAILURE_KINDS, 0)
        self.dropped_episodes = 0
        self._failure_steps: deque[int] = deque()  # step index of each recent failure

    def _restart(self, worker: int, grace: float) -> Any:
        raise NotImplementedError

    def _command(self, method: str, per_worker: Sequence[tuple[Any, ...]]) -> list[Any]:
        raise NotImplementedError

    def _seed_base(self, index: int) -> int:
        last = self._reset_seeds[index]
        return last if last is not None else (self._seed or 0) + index

    def _recover(self, failure: _WorkerFailure) -> Any:
        """Counts a failure, restarts the worker (again, if the restart fails too) or gives up."""
        while True:
            self._count_failure(failure)
            # A worker that raised is exiting by itself (it closes its envs first); crashed and
            # hung ones are killed at once.
            grace = 1.0 if failure.kind == "exception" else 0.0
            try:
                return self._restart(failure.worker, grace)
            except _WorkerFailure as again:
                failure = again

    def _count_failure(self, failure: _WorkerFailure) -> None:
        name = type(self).__name__
        self.restarts += 1
        self.failure_counts[failure.kind] += 1
        self._failure_steps.append(self._num_steps)
        while self._failure_steps and self._failure_steps[0] <= self._num_steps - self.restart_window:
            self._failure_steps.popleft()
        recent = len(self._failure_steps)
        if recent > self.max_restarts:
            if failure.details:
                logger.error("%s: last worker failure:\n%s", name, failure.details)
            self.close(terminate=True)  # type: ignore[attr-defined]  # VectorEnv's
            raise EnvWorkerError(
                f"env worker failed {recent} time{'s' if recent != 1 else ''} within {self.restart_window} steps "
                f"(max_restarts={self.max_restarts}); last error: {failure.kind}: {failure.summary}"
            )
        logger.warning(
            "%s: %s: %s; restarting the %s and dropping its episodes (restart %d, %s)%s",
            name,
            failure.kind,
            failure.summary,
            self.unit,
            self.restarts,
            ", ".join(f"{kind} {count}" for kind, count in self.failure_counts.items()),
            f"\n{failure.details}" if failure.details else "",
        )

    # -- commands to every sub-env, through the class's ``_command(method, per_worker)`` ----------

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Calls method (or reads attribute) ``name`` of every sub-env; one result per sub-env."""
        results = self._command("call", [(name, args, kwargs)] * len(self._slices))
        return tuple(result for worker_results in results for result in worker_results)

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """Reads attribute ``name`` of every sub-env."""
        return self.call(name)

    def set_attr(self, name: str, values: Any | Sequence[Any]) -> None:
        """Sets attribute ``name`` of every sub-env (one value for all, or one per sub-env)."""
        if not isinstance(values, list | tuple):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError(f"got {len(values)} values for {self.num_envs} envs")
        self._command("set_attr", [(name, values[part]) for part in self._slices])

    def render(self) -> tuple[Any, ...] | None:
        """Returns every sub-env's rendered frame."""
        return self.call("render")


def available_cpus() -> int:
    """Cores this process may run on (the affinity mask, which containers restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _worker(
    pipe: Any,
    inherited: Sequence[Any],
    env_fns: Sequence[Callable[[], gym.Env]],
    shared_obs: Any,
    obs_dtype: np.dtype,
    obs_shape: tuple[int, ...],
    num_envs: int,
    start: int,
    reset_seeds: Sequence[int] | None,
) -> None:
    """Owns sub-envs ``start .. start + len(env_fns) - 1``; serves commands from the main process.

    ``inherited`` are the main process's ends of the pipes, which a forked worker holds copies of:
    closed at once, so that each worker sees EOF (and exits) as soon as the main process dies,
    even when it is SIGKILLed. ``reset_seeds`` (a restarted worker) resets the new sub-envs with
    these seeds before reporting ready, and sends their reset infos with the "ready".
    """
    for connection in inherited:
        connection.close()
    # The main process decides when its workers end: it closes them when it stops (Ctrl-C, SIGTERM,
    # an error), and a worker that outlives it sees EOF. Ctrl-C in a terminal and `pkill -f "lab
    # train"` signal the workers too (they share the process group and the command line); ending
    # here first, they would be taken for crashes and restarted while the main process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    envs: list[gym.Env] = []
    try:
        envs = [env_fn() for env_fn in env_fns]
        # (num_envs, *obs_shape) over the whole shared buffer; this worker writes its own rows only.
        observations = np.frombuffer(shared_obs, dtype=obs_dtype).reshape(num_envs, *obs_shape)
        own = observations[start : start + len(envs)]
        ready_infos = None
        if reset_seeds is not None:
            ready_infos = []
            for index, (env, seed) in enumerate(zip(envs, reset_seeds, strict=True)):
                env.action_space.seed(seed)
                own[index], info = env.reset(seed=seed)
                ready_infos.append(info)
        pipe.send(("ready", ready_infos))
        while True:
            command, data = pipe.recv()
            if command == "step":
                rewards = np.empty(len(envs), dtype=np.float64)
                terminations = np.empty(len(envs), dtype=np.bool_)
                truncations = np.empty(len(envs), dtype=np.bool_)
                infos = []
                for index, (env, action) in enumerate(zip(envs, data, strict=True)):
                    obs, reward, terminated, truncated, info = env.step(action)
                    if terminated or truncated:
                        final_obs, final_info = obs, info
                        obs, info = env.reset()
                        info = {**info, "final_obs": final_obs, "final_info": final_info}
                    own[index] = obs
                    rewards[index], terminations[index], truncations[index] = reward, terminated, truncated
                    infos.append(info)
                pipe.send(("ok", (rewards, terminations, truncations, infos)))
            elif command == "reset":
                seeds, options = data
                infos = []
                for index, (env, seed) in enumerate(zip(envs, seeds, strict=True)):
                    own[index], info = env.reset(seed=seed, options=options)
                    infos.append(info)
                pipe.send(("ok", infos))
            elif command in ("call", "set_attr"):
                # An error here is the caller's (a missing attribute, bad arguments), not a broken
                # env: report it and keep serving.
                try:
                    if command == "call":
                        name, args, kwargs = data
                        results = []
                        for env in envs:
                            attribute = env.get_wrapper_attr(name)
                            results.append(attribute(*args, **kwargs) if callable(attribute) else attribute)
                    else:
                        name, values = data
                        for env, value in zip(envs, values, strict=True):
                            env.set_wrapper_attr(name, value)
                        results = None
                except Exception:
                    pipe.send(
                        (
                            "call_error",
                            f"sub-envs {start}..{start + len(envs) - 1}:\n{traceback.format_exc()}",
                        )
                    )
                else:
                    pipe.send(("ok", results))
            elif command == "close":
                break
            else:
                raise RuntimeError(f"unknown command {command!r}")
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass  # the main process is going away
    except Exception:  # sent to the caller, who restarts this worker or raises
        with contextlib.suppress(BrokenPipeError, OSError):
            pipe.send(("error", traceback.format_exc()))
    finally:
        for env in envs:
            with contextlib.suppress(Exception):  # closing after a crash: nothing left to do
                env.close()
        pipe.close()


def _last_line(text: str) -> str:
    """The last non-empty line of a traceback (``ValueError: boom``): short enough for one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def restart_seed(base: int, index: int, restarts: int) -> int:
    """The seed a restarted sub-env is reset with: deterministic, and distinct for each restart.

    Args:
        base: the sub-env's last reset seed (or the vector env's base seed plus its index).
        index: the sub-env's index in the vector env.
        restarts: the vector env's restart count, this restart included.

    Returns:
        A seed in ``[0, 2**32)``, decorrelated from ``base`` by numpy's ``SeedSequence`` hashing,
        so a restarted env does not replay the episodes of its first life.
    """
    sequence = np.random.SeedSequence(entropy=int(base) % 2**63, spawn_key=(int(index), int(restarts)))
    return int(sequence.generate_state(1)[0])


_SCALAR_TYPES = (int, float, bool)


def merge_infos(infos: Sequence[dict[str, Any]], num_envs: int) -> dict[str, Any]:
    """Batches per-env info dicts into Gymnasium's dict-of-arrays form with ``_key`` masks.

    The same result as calling ``VectorEnv._add_info`` once per env, but one numpy call per key
    instead of one per key and env: the main process merges the infos of all sub-envs at every
    step while the workers wait, so this is on the critical path.
    """
    merged: dict[str, Any] = {}
    keys = dict.fromkeys(key for info in infos for key in info)
    for key in keys:
        present = [index for index, info in enumerate(infos) if key in info]
        values = [infos[index][key] for index in present]
        first = values[0]
        if key == "final_obs":  # kept as an object array of per-env observations, as Gymnasium does
            array = np.full(num_envs, None, dtype=object)
            for index, value in zip(present, values, strict=True):
                array[index] = value
        elif isinstance(first, dict):
            array = merge_infos([info.get(key, {}) for info in infos], num_envs)
        else:
            if type(first) in _SCALAR_TYPES:
                dtype, shape = np.dtype(type(first)), ()
            elif isinstance(first, np.number | np.ndarray):
                dtype, shape = first.dtype, np.shape(first)
            else:
                dtype, shape = np.dtype(object), ()
            if len(present) == num_envs and dtype.kind != "O":
                array = np.array(values, dtype=dtype)
            else:
                array = (
                    np.zeros((num_envs, *shape), dtype=dtype)
                    if dtype.kind != "O"
                    else np.full(num_envs, None)
                )
                for index, value in zip(present, values, strict=True):
                    array[index] = value
        mask = np.zeros(num_envs, dtype=np.bool_)
        mask[present] = True
        merged[key] = array
        merged[f"_{key}"] = mask
    return merged


class SubprocVectorEnv(WorkerGroups, VectorEnv):
    """Steps ``len(env_fns)`` envs in worker processes, ``envs_per_worker`` per worker.

    A failed worker (exception, crash or hang) is restarted and its sub-envs' episodes dropped;
    see the module docstring for what such a step returns.

    Args:
        env_fns: picklable callables that each build one sub-env; all with the same spaces and a
            ``Box`` observation space.
        envs_per_worker: sub-envs per worker; None: ``ceil(num_envs / available_cpus())``.
        context: multiprocessing start method (None: the platform's default, fork on Linux).
        copy: return a copy of the shared observation array from ``reset``/``step`` (True), or the
            shared array itself, which the next step overwrites.
        step_timeout: seconds to wait for a worker's reply to a step, reset or call (to its start:
            this for each of its sub-envs) before it counts as hung and is killed and restarted;
            None waits forever.
        max_restarts: failures tolerated within ``restart_window`` vector steps; one more raises
            :class:`EnvWorkerError`. 0 turns recovery off (the first failure raises).
        restart_window: the length of that window, in calls to ``step``.
        seed: base of the seeds of restarted sub-envs when ``reset`` was never given a seed
            (sub-env ``i`` counts from ``seed + i``); ``envs.make_vec`` passes its seed.

    Attributes:
        restarts: worker restarts so far (one per failure).
        failure_counts: failures so far by kind: ``{"exception": n, "crash": n, "hang": n}``.
        dropped_episodes: sub-env episodes cut short by a restart during ``step``.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        envs_per_worker: int | None = None,
        context: str | None = None,
        copy: bool = True,
        step_timeout: float | None = DEFAULT_STEP_TIMEOUT,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        restart_window: int = DEFAULT_RESTART_WINDOW,
        seed: int | None = None,
    ):
        self.num_envs = len(env_fns)
        if self.num_envs < 1:
            raise ValueError("SubprocVectorEnv needs at least one env_fn")
        if envs_per_worker is None:
            envs_per_worker = math.ceil(self.num_envs / available_cpus())
        if isinstance(envs_per_worker, bool) or not isinstance(envs_per_worker, int) or envs_per_worker < 1:
            raise ValueError(f"envs_per_worker must be an int >= 1, got {envs_per_worker!r}")
        if step_timeout is not None and (
            isinstance(step_timeout, bool)
            or not isinstance(step_timeout, int | float)
            or not 0 < step_timeout < math.inf
        ):
            raise ValueError(
                f"step_timeout must be None or a positive number of seconds, got {step_timeout!r}"
            )
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        if isinstance(restart_window, bool) or not isinstance(restart_window, int) or restart_window < 1:
            raise ValueError(f"restart_window must be an int >= 1, got {restart_window!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        self.envs_per_worker = envs_per_worker
        self.copy = copy
        self.step_timeout = None if step_timeout is None else float(step_timeout)
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._init_recovery()

        # One sub-env in this process tells the spaces and metadata, as in Gymnasium's async env.
        dummy = env_fns[0]()
        self.single_observation_space = dummy.observation_space
        self.single_action_space = dummy.action_space
        self.metadata = {**dummy.metadata, "autoreset_mode": AutoresetMode.SAME_STEP}
        self.render_mode = dummy.render_mode
        self.spec = dummy.spec
        dummy.close()
        if not isinstance(self.single_observation_space, spaces.Box):
            raise TypeError(
                f"SubprocVectorEnv needs a Box observation space, got {self.single_observation_space}"
            )
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        self._obs_dtype = np.dtype(self.single_observation_space.dtype)
        self._obs_shape = tuple(self.single_observation_space.shape)
        self._ctx = mp.get_context(context)
        nbytes = self.num_envs * math.prod(self._obs_shape) * self._obs_dtype.itemsize
        # No lock: each worker owns its rows. Kept for the lifetime of the env: restarted workers
        # write into the same buffer.
        self._shared = self._ctx.RawArray(ctypes.c_uint8, max(nbytes, 1))
        self._observations = np.frombuffer(self._shared, dtype=self._obs_dtype).reshape(
            self.num_envs, *self._obs_shape
        )

        self._env_fns = list(env_fns)
        self._seed = None if seed is None else int(seed)
        self._reset_seeds: list[int | None] = [None] * self.num_envs  # the last seeds given to reset
        self._num_steps = 0
        self._pending_step: dict[int, _WorkerFailure] | None = (
            None  # failures at send, between step_async/wait
        )
        self._slices = [
            slice(start, min(start + envs_per_worker, self.num_envs))
            for start in range(0, self.num_envs, envs_per_worker)
        ]
        num_workers = len(self._slices)
        self._pipes: list[Any] = [None] * num_workers
        self._processes: list[Any] = [None] * num_workers
        self._pollers: list[Any] = [None] * num_workers
        self._closed = False
        _OPEN_ENVS.add(self)
        try:
            self._start_workers(num_workers)
        except BaseException:  # a construction error, or Ctrl-C or a stop while the workers start
            self.close(terminate=True)
            raise

    def _start_workers(self, num_workers: int) -> None:
        for worker in range(num_workers):
            self._start_worker(worker, reset_seeds=None)
        deadline = self._start_deadline()
        for worker in range(num_workers):  # "ready" from each worker, or its construction error
            try:
                self._receive(worker, deadline)
            except _WorkerFailure as failure:
                if failure.details:
                    logger.error("SubprocVectorEnv worker %d failed to start:\n%s", worker, failure.details)
                raise EnvWorkerError(
                    f"SubprocVectorEnv worker {worker} failed to start: {failure.summary}"
                ) from None

    # -- worker processes -----------------------------------------------------------------------

    def _start_worker(self, worker: int, reset_seeds: list[int] | None) -> None:
        part = self._slices[worker]
        parent_pipe, child_pipe = self._ctx.Pipe()
        # A forked child inherits the main process's end of every pipe open at fork time. It closes
        # them at once: each worker then sees EOF (and exits) the moment the main process dies,
        # instead of waiting for the siblings that hold its pipe to exit first.
        inherited = [parent_pipe]
        if self._ctx.get_start_method() == "fork":
            inherited += [pipe for pipe in self._pipes if pipe is not None]
        process = self._ctx.Process(
            target=_worker,
            name=f"SubprocVectorEnv-{part.start}",
            args=(
                child_pipe,
                inherited,
                self._env_fns[part],
                self._shared,
                self._obs_dtype,
                self._obs_shape,
                self.num_envs,
                part.start,
                reset_seeds,
            ),
            daemon=True,  # workers die with the main process
        )
        with warnings.catch_warnings():
            # Python 3.12+ warns when forking a process that has threads (torch's pool, once
            # the agent has run). The workers only step envs and never touch torch or the
            # parent's locks; pass context="forkserver" to avoid fork altogether.
            warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
            process.start()
        child_pipe.close()
        self._pipes[worker] = parent_pipe
        self._processes[worker] = process
        self._pollers[worker] = _poller(parent_pipe)

    def _stop_worker(self, worker: int, grace: float) -> None:
        """Kills a worker (after ``grace`` seconds to exit on its own), reaps it, closes its pipe."""
        process = self._processes[worker]
        if process is not None:
            process.join(timeout=grace)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
            with contextlib.suppress(ValueError):  # still running: an unkillable (D-state) process
                process.close()
        if self._pipes[worker] is not None:
            self._pipes[worker].close()
        self._pipes[worker] = self._processes[worker] = self._pollers[worker] = None

    def _restart(self, worker: int, grace: float) -> list[dict[str, Any]]:
        """Replaces a failed worker; returns the reset infos of its new sub-envs."""
        self._stop_worker(worker, grace)
        part = self._slices[worker]
        seeds = [
            restart_seed(self._seed_base(index), index, self.restarts)
            for index in range(part.start, part.stop)
        ]
        self._start_worker(worker, reset_seeds=seeds)
        return self._receive(worker, self._start_deadline())[1]

    # -- plumbing -------------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        return None if self.step_timeout is None else time.monotonic() + self.step_timeout

    def _start_deadline(self) -> float | None:
        # A worker builds (and resets) all its sub-envs before its "ready": a step_timeout for each.
        # One for all was too little for 8 multi-stage Mario envs (32 emulators) started at nice 10
        # on a loaded 2-core machine.
        if self.step_timeout is None:
            return None
        most = max(part.stop - part.start for part in self._slices)
        return time.monotonic() + self.step_timeout * most

    def _where(self, worker: int) -> str:
        part = self._slices[worker]
        return f"sub-envs {part.start}..{part.stop - 1}"

    def _exit_status(self, worker: int) -> str:
        process = self._processes[worker]
        process.join(timeout=1.0)  # EOF comes as the process exits: give it a moment to be reaped
        code = process.exitcode
        if code is None:
            return "its pipe closed while it still runs"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def _receive(self, worker: int, deadline: float | None) -> tuple[str, Any]:
        """The next reply of ``worker`` as ``(status, payload)``; _WorkerFailure when it failed."""
        pipe = self._pipes[worker]
        if deadline is not None:
            # The one extra syscall of the hot path: poll(2) with the time left to the deadline.
            remaining = deadline - time.monotonic()
            poller = self._pollers[worker]
            if poller is not None:
                ready = bool(poller.poll(max(0, math.ceil(remaining * 1000))))
                ready = ready or bool(poller.poll(math.ceil(HANG_GRACE * 1000)))
            else:  # no poll(2) on this platform
                ready = pipe.poll(max(remaining, 0.0)) or pipe.poll(HANG_GRACE)
            if not ready:
                raise _WorkerFailure(
                    worker, "hang", f"{self._where(worker)}: no reply within {self.step_timeout:g} s"
                )
        try:
            status, payload = pipe.recv()
        except (EOFError, OSError):
            raise _WorkerFailure(
                worker,
                "crash",
                f"{self._where(worker)}: the worker process died ({self._exit_status(worker)})",
            ) from None
        if status == "error":
            raise _WorkerFailure(
                worker, "exception", f"{self._where(worker)} raised {_last_line(payload)}", details=payload
            )
        return status, payload

    def _exchange(
        self, command: str, per_worker: Sequence[Any]
    ) -> tuple[list[tuple[str, Any] | None], dict[int, _WorkerFailure]]:
        """Sends one command to every worker, then collects every reply (None where one failed)."""
        return self._collect(self._send(command, per_worker))

    def _send(self, command: str, per_worker: Sequence[Any]) -> dict[int, _WorkerFailure]:
        """Sends one command to every worker; the failures of workers already dead."""
        if self._closed:
            raise RuntimeError("SubprocVectorEnv is closed")
        failures: dict[int, _WorkerFailure] = {}
        for worker, (pipe, data) in enumerate(zip(self._pipes, per_worker, strict=True)):
            try:
                pipe.send((command, data))
            except OSError:  # the worker died since its last reply (EPIPE)
                failures[worker] = _WorkerFailure(
                    worker,
                    "crash",
                    f"{self._where(worker)}: the worker process died ({self._exit_status(worker)})",
                )
        return failures

    def _collect(
        self, failures: dict[int, _WorkerFailure]
    ) -> tuple[list[tuple[str, Any] | None], dict[int, _WorkerFailure]]:
        """Every reply to the last command (None where a worker failed), and the failures."""
        deadline = self._deadline()  # one deadline for the whole exchange: a reply each, in time
        replies: list[tuple[str, Any] | None] = [None] * len(self._pipes)
        for worker in range(len(self._pipes)):
            if worker not in failures:
                try:
                    replies[worker] = self._receive(worker, deadline)
                except _WorkerFailure as failure:
                    failures[worker] = failure
        return replies, failures

    def _merge_infos(self, per_worker: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
        return merge_infos([info for worker_infos in per_worker for info in worker_infos], self.num_envs)

    def _obs(self) -> np.ndarray:
        return self._observations.copy() if self.copy else self._observations

    # -- the VectorEnv API ----------------------------------------------------------------------

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Resets every sub-env; an int ``seed`` seeds sub-env ``i`` with ``seed + i``.

        A worker that fails here is restarted like in :meth:`step`; its sub-envs start with
        derived seeds and their infos carry ``dropped``.
        """
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, int | np.integer):
            seeds = [int(seed) + index for index in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} envs")
        for index, value in enumerate(seeds):
            if value is not None:
                self._reset_seeds[index] = int(value)
        replies, failures = self._exchange("reset", [(seeds[part], options) for part in self._slices])
        per_worker = [reply[1] if reply is not None else [] for reply in replies]
        for worker, failure in failures.items():
            per_worker[worker] = [{**info, "dropped": True} for info in self._recover(failure)]
        return self._obs(), self._merge_infos(per_worker)

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Steps every sub-env with its action; same-step autoreset.

        The sub-envs of a worker that fails during the step get a dropped episode: a fresh reset
        observation, reward 0, ``terminations`` True and ``infos["dropped"]`` (module docstring).

        Raises:
            EnvWorkerError: more than ``max_restarts`` failures within ``restart_window`` steps.
        """
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Any) -> None:
        """Sends the actions and returns at once: the workers step while the caller computes.

        Off-policy learners overlap a gradient step with the env step this way (agents/dqn.py).
        Call ``step_wait`` for the results before any other method; the observation array of
        ``copy=False`` is rewritten by the workers meanwhile.
        """
        if self._pending_step is not None:
            raise RuntimeError("step_async called twice without step_wait")
        actions = np.asarray(actions)
        if len(actions) != self.num_envs:
            raise ValueError(f"got {len(actions)} actions for {self.num_envs} envs")
        self._num_steps += 1
        self._pending_step = self._send("step", [actions[part] for part in self._slices])

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """The results of the ``step_async`` call: ``(obs, rewards, terminations, truncations, infos)``."""
        if self._pending_step is None:
            raise RuntimeError("step_wait called without step_async")
        pending, self._pending_step = self._pending_step, None
        replies, failures = self._collect(pending)
        results = [reply[1] if reply is not None else None for reply in replies]
        for worker, failure in failures.items():
            reset_infos = self._recover(failure)
            rows = self._observations[self._slices[worker]]
            count = len(reset_infos)
            self.dropped_episodes += count
            infos = [
                {**info, "final_obs": row.copy(), "dropped": True}
                for info, row in zip(reset_infos, rows, strict=True)
            ]
            results[worker] = (np.zeros(count), np.ones(count, np.bool_), np.zeros(count, np.bool_), infos)
        rewards = np.concatenate([result[0] for result in results])
        terminations = np.concatenate([result[1] for result in results])
        truncations = np.concatenate([result[2] for result in results])
        infos = self._merge_infos([result[3] for result in results])
        return self._obs(), rewards, terminations, truncations, infos

    def _command(self, command: str, per_worker: Sequence[Any]) -> list[Any]:
        """``call``/``set_attr`` on every worker; RuntimeError when any of them failed."""
        replies, failures = self._exchange(command, per_worker)
        errors = [
            payload for reply in replies if reply is not None for status, payload in [reply] if status != "ok"
        ]
        for failure in failures.values():
            self._recover(failure)  # keeps the vector env usable; the caller still hears of it
            errors.append(f"{failure.summary} (the worker was restarted, its episodes reset)")
        if errors:
            raise RuntimeError(f"SubprocVectorEnv {command} failed in {errors[0]}")
        return [reply[1] for reply in replies]

    def close_extras(self, timeout: float = 5.0, terminate: bool = False, **kwargs: Any) -> None:
        """Stops the workers (politely unless ``terminate``), waiting ``timeout`` seconds at most."""
        if self._closed:
            return
        self._closed = True
        _OPEN_ENVS.discard(self)
        if not terminate:
            for pipe in self._pipes:
                if pipe is not None:
                    with contextlib.suppress(BrokenPipeError, OSError):
                        pipe.send(("close", None))
        for process in self._processes:
            if process is None:
                continue
            process.join(timeout=0 if terminate else timeout)
            if process.is_alive():  # workers ignore SIGTERM (see _worker): SIGKILL
                process.kill()
                process.join(timeout=1)
        for pipe in self._pipes:
            if pipe is not None:
                pipe.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close(terminate=True)


def _poller(pipe: Any) -> Any:
    """A ``select.poll`` object watching ``pipe``, made once: polling then costs one syscall."""
    if not hasattr(select, "poll"):
        return None
    poller = select.poll()
    poller.register(pipe.fileno(), select.POLLIN)
    return poller
