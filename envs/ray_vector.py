"""A Ray back-end for the lab's vector envs: worker groups are Ray actors, anywhere on a cluster.

``RayVectorEnv`` is :class:`envs.vector.SubprocVectorEnv` with Ray actors in place of worker
processes. Each actor owns ``envs_per_worker`` sub-envs and steps them one after another; the
main process makes one remote call per actor per step and gets back rewards, flags, infos and the
actor's observations as numpy arrays. The actors may run on any node of a Ray cluster, so one
training run can step more emulators than its own machine has cores::

    from envs.ray_vector import RayVectorEnv
    vec = RayVectorEnv(env_fns, envs_per_worker=4, address="auto")  # or "ray://head:10001"

Everything else is the subprocess back-end's contract, so that agents cannot tell them apart:

* Gymnasium's ``AutoresetMode.SAME_STEP``: when sub-env ``i`` ends an episode, the same step
  returns the first observation of its next one, with ``infos["final_obs"]`` and
  ``infos["final_info"]`` (dict-of-arrays with ``_key`` masks, merged by ``merge_infos``).
* The same observations for the same ``env_fns`` and seeds as ``SubprocVectorEnv``.
* Failure recovery: an actor whose sub-env raises (``"exception"``), whose process dies or is
  killed, ``ray.kill`` included (``"crash"``), or that does not reply within ``step_timeout``
  seconds (``"hang"``) is killed and replaced by a new actor; its sub-envs' episodes are dropped
  (reward 0, terminated, ``infos["dropped"]``), counted in ``restarts``, ``failure_counts`` and
  ``dropped_episodes``, and more than ``max_restarts`` failures within ``restart_window`` steps
  raise :class:`envs.vector.EnvWorkerError`. See :mod:`envs.vector` for why a dropped episode is
  a termination and how restarted sub-envs are seeded.

How observations travel: Ray returns objects up to ``max_direct_call_object_size`` (100 KiB by
default) inline in the reply of the remote call, and puts larger ones into the shared-memory
object store, which costs an extra round of inter-process messages per object. Four Mario
observations (4 x 4 x 84 x 84 bytes) are just over that limit, so each actor returns its
observations in chunks of rows that each fit inline (``num_returns`` = 1 + chunks): every step
then stays one request and one reply per actor.

Where actors run: every actor asks for no CPU of its own (``num_cpus=0``), as subprocess workers
ask the OS for nothing, and Ray's ``"SPREAD"`` strategy places them across the cluster's nodes.
Reserving a CPU per actor would make a second vector env (PPO's ``env_groups``) wait forever on a
small local Ray; pass ``actor_options={"num_cpus": 1}`` (or custom resources) on a shared
cluster. Every node needs the lab installed (the actors import ``envs``) and the emulator
packages the env_fns use.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import ray
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from envs.vector import (
    DEFAULT_MAX_RESTARTS,
    DEFAULT_RESTART_WINDOW,
    DEFAULT_STEP_TIMEOUT,
    EnvWorkerError,
    WorkerGroups,
    _last_line,
    _WorkerFailure,
    available_cpus,
    merge_infos,
    restart_seed,
)

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
# An actor's start includes a new Python process on its node (and, on an autoscaling cluster,
# maybe a new node): it gets longer than a step.
DEFAULT_START_TIMEOUT = 300.0
LOCAL_ADDRESSES = (None, "local")
# Ray's default max_direct_call_object_size; the actors read the same setting from this variable.
_INLINE_LIMIT = int(os.environ.get("RAY_max_direct_call_object_size", 100 * 1024))  # noqa: SIM112 (its name)
_INLINE_MARGIN = 4096  # the serialisation header of a numpy array, with room to spare


# -- starting Ray ---------------------------------------------------------------------------------


def ensure_ray(address: str | None = None, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
    """Starts a local Ray or connects to a cluster, once per process.

    Args:
        address: ``None`` or ``"local"``: reuse the Ray this process already runs, or start a local
            one with one CPU per core this process may use. ``"auto"``: the cluster that
            ``ray start`` runs on this machine (or ``RAY_ADDRESS``). ``"ray://host:port"``: a Ray
            Client server; ``"host:port"``: a cluster's head node (GCS).
        timeout: seconds to wait for the cluster's port to answer.

    Raises:
        ValueError: ``cannot reach the Ray cluster at ADDRESS: <reason>`` (one line), within
            ``timeout`` seconds when nothing answers.

    The cluster's port is probed before ``ray.init``, which would otherwise retry an unreachable
    address for a minute or more: a TCP connection, then a gRPC call (Ray's head node and Ray Client
    server both speak gRPC), since a firewall or proxy may accept connections that no Ray server
    answers. When Ray is already initialised in this process it is reused (after the probe): the
    first call decides which cluster the process uses.
    """
    if address in LOCAL_ADDRESSES:
        if not ray.is_initialized():
            ray.init(
                address="local",  # never RAY_ADDRESS's cluster: "local" promises this machine
                num_cpus=available_cpus(),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                ignore_reinit_error=True,
                # Ray runs its workers at nice 15 by default; env actors at that priority starve
                # behind any busy process (a nice-10 training run too), where subprocess workers,
                # at the user's own priority, do not.
                _system_config={"worker_niceness": 0},
            )
        return
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"cannot reach the Ray cluster at {address!r}: not an address")
    reason = _probe(*_host_and_port(address), timeout)
    if reason is not None:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {reason}")
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
    except Exception as error:  # ConnectionError, RuntimeError, grpc errors: all mean "not reachable"
        raise ValueError(f"cannot reach the Ray cluster at {address}: {_one_line(error)}") from None


def _host_and_port(address: str) -> tuple[str, int]:
    """The ``(host, port)`` to probe for ``address``; ValueError when there is none."""
    target = address
    if target == "auto":
        target = os.environ.get("RAY_ADDRESS") or "auto"
    if target == "auto":
        # How ray.init("auto") finds the cluster `ray start` began on this machine (private API).
        from ray._private import services

        try:
            target = services.canonicalize_bootstrap_address_or_die("auto")
        except Exception as error:
            raise ValueError(f"cannot reach the Ray cluster at {address}: {_one_line(error)}") from None
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"cannot reach the Ray cluster at {address}: expected ray://host:port, host:port or auto"
        )
    return host.strip("[]"), int(port)


def _probe(host: str, port: int, timeout: float) -> str | None:
    """Why no Ray server answers at ``host:port`` within ``timeout`` seconds; None when one does."""
    deadline = time.monotonic() + timeout
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g} s"
    except OSError as error:
        return _one_line(error)
    import grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:  # Ray's own channel: TLS (RAY_USE_TLS) and token authentication as the cluster expects
        from ray._private.grpc_utils import init_grpc_channel

        channel = init_grpc_channel(target)
    except Exception:  # a private API: any change falls back to a plain channel
        channel = grpc.insecure_channel(target)
    # A method no server has: a gRPC server answers UNIMPLEMENTED at once. A plain HTTP/2 server
    # (some proxies) answers too, with an HTTP status that gRPC reports in the details.
    ping = channel.unary_unary("/agent_lab.Probe/Ping")
    try:
        ping(b"", timeout=max(0.1, deadline - time.monotonic()))
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{host}:{port} accepts connections, but no Ray server answered within {timeout:g} s"
        if code == grpc.StatusCode.UNAVAILABLE or "http2 header with status" in details:
            return (
                f"no Ray server at {host}:{port} ({code.name}{': ' + _one_line(details) if details else ''})"
            )
    finally:
        channel.close()
    return None


def _one_line(error: BaseException | str) -> str:
    """An exception (or a message) as one short line: its first non-empty line, or its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


# -- the actor ------------------------------------------------------------------------------------


class _EnvGroup:
    """One group of a RayVectorEnv's sub-envs (one per env_fn), in one Ray actor.

    Every method that returns observations returns ``1 + len(chunks)`` values: a status
    ``("ok" | "ready", payload)`` or ``("error", traceback)``, then the rows of each chunk. A sub-env
    that raises is reported, never re-raised: the main process replaces the whole actor (its envs
    may be half-stepped), as the subprocess back-end replaces a worker.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        obs_shape: tuple[int, ...],
        obs_dtype: np.dtype,
        chunks: Sequence[tuple[int, int]],
    ) -> None:
        self._env_fns = list(env_fns)
        self._envs: list[gym.Env] = []
        # Rewritten at every step and reset; Ray serialises the returned rows as the method returns.
        self._obs = np.zeros((len(self._env_fns), *obs_shape), dtype=obs_dtype)
        self._chunks = [slice(start, stop) for start, stop in chunks]

    def _reply(self, status: str, payload: Any) -> tuple[Any, ...]:
        return ((status, payload), *(self._obs[chunk] for chunk in self._chunks))

    def _error(self) -> tuple[Any, ...]:
        return (("error", traceback.format_exc()), *(None for _ in self._chunks))

    def pid(self) -> int:
        """The actor's process id (for benchmarks and tests)."""
        return os.getpid()

    def start(self, reset_seeds: Sequence[int] | None) -> tuple[Any, ...]:
        """Builds the sub-envs; a restarted actor also resets them with ``reset_seeds``."""
        try:
            self._envs = [env_fn() for env_fn in self._env_fns]
            infos = None
            if reset_seeds is not None:
                infos = []
                for index, (env, seed) in enumerate(zip(self._envs, reset_seeds, strict=True)):
                    env.action_space.seed(seed)
                    self._obs[index], info = env.reset(seed=seed)
                    infos.append(info)
            return self._reply("ready", infos)
        except Exception:
            return self._error()

    def step(self, actions: np.ndarray) -> tuple[Any, ...]:
        """Steps each sub-env with its action; same-step autoreset, as ``envs.vector._worker``."""
        try:
            count = len(self._envs)
            rewards = np.empty(count, dtype=np.float64)
            terminations = np.empty(count, dtype=np.bool_)
            truncations = np.empty(count, dtype=np.bool_)
            infos = []
            for index, (env, action) in enumerate(zip(self._envs, actions, strict=True)):
                obs, reward, terminated, truncated, info = env.step(action)
                if terminated or truncated:
                    final_obs, final_info = obs, info
                    obs, info = env.reset()
                    info = {**info, "final_obs": final_obs, "final_info": final_info}
                self._obs[index] = obs
                rewards[index], terminations[index], truncations[index] = reward, terminated, truncated
                infos.append(info)
            return self._reply("ok", (rewards, terminations, truncations, infos))
        except Exception:
            return self._error()

    def reset(self, seeds: Sequence[int | None], options: dict[str, Any] | None) -> tuple[Any, ...]:
        """Resets each sub-env with its seed."""
        try:
            infos = []
            for index, (env, seed) in enumerate(zip(self._envs, seeds, strict=True)):
                self._obs[index], info = env.reset(seed=seed, options=options)
                infos.append(info)
            return self._reply("ok", infos)
        except Exception:
            return self._error()

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any]:
        """Calls method (or reads attribute) ``name`` of each sub-env.

        An error here is the caller's (a missing attribute, bad arguments), not a broken env: it
        is reported as ``"call_error"`` and the actor keeps serving.
        """
        try:
            results = []
            for env in self._envs:
                attribute = env.get_wrapper_attr(name)
                results.append(attribute(*args, **kwargs) if callable(attribute) else attribute)
        except Exception:
            return "call_error", traceback.format_exc()
        return "ok", results

    def set_attr(self, name: str, values: Sequence[Any]) -> tuple[str, Any]:
        """Sets attribute ``name`` of each sub-env to its value."""
        try:
            for env, value in zip(self._envs, values, strict=True):
                env.set_wrapper_attr(name, value)
        except Exception:
            return "call_error", traceback.format_exc()
        return "ok", None

    def close(self) -> None:
        """Closes the sub-envs (the actor itself is then killed by the main process)."""
        for env in self._envs:
            with contextlib.suppress(Exception):  # closing on the way out: nothing left to do
                env.close()
        self._envs = []


_RemoteEnvGroup = ray.remote(_EnvGroup)


# -- the vector env -------------------------------------------------------------------------------


class RayVectorEnv(WorkerGroups, VectorEnv):
    """Steps ``len(env_fns)`` envs in Ray actors, ``envs_per_worker`` per actor.

    The interface, semantics and failure recovery of :class:`envs.vector.SubprocVectorEnv`; see
    the module docstring for what differs underneath.

    Args:
        env_fns: picklable callables that each build one sub-env (``functools.partial`` of a
            module-level function: the actors import it); all with the same spaces and a ``Box``
            observation space.
        envs_per_worker: sub-envs per actor; None: ``ceil(num_envs / cluster CPUs)``.
        copy: ``reset``/``step`` return a new observation array (True), or one array that the
            next call overwrites.
        step_timeout: seconds to wait for an actor's reply (to a step, reset or call) before it
            counts as hung and is killed and replaced; None waits forever.
        max_restarts: failures tolerated within ``restart_window`` vector steps; one more raises
            :class:`EnvWorkerError`. 0 turns recovery off (the first failure raises).
        restart_window: the length of that window, in calls to ``step``.
        seed: base of the seeds of restarted sub-envs when ``reset`` was never given a seed
            (sub-env ``i`` counts from ``seed + i``).
        address: the Ray cluster (see :func:`ensure_ray`); None starts or reuses a local Ray.
        start_timeout: seconds for a new actor to be placed, built and report ready (at
            construction and at each restart); None waits forever. Overrun: a ``"hang"``.
        actor_options: passed to ``.options()`` of every actor, over ``{"num_cpus": 0,
            "scheduling_strategy": "SPREAD"}`` (e.g. ``{"num_cpus": 1}``, ``{"resources": ...}``).

    Attributes:
        restarts: actor restarts so far (one per failure).
        failure_counts: failures so far by kind: ``{"exception": n, "crash": n, "hang": n}``.
        dropped_episodes: sub-env episodes cut short by a restart during ``step``.
    """

    unit = "actor"

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        envs_per_worker: int | None = None,
        copy: bool = True,
        step_timeout: float | None = DEFAULT_STEP_TIMEOUT,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        restart_window: int = DEFAULT_RESTART_WINDOW,
        seed: int | None = None,
        address: str | None = None,
        start_timeout: float | None = DEFAULT_START_TIMEOUT,
        actor_options: dict[str, Any] | None = None,
    ):
        self.num_envs = len(env_fns)
        if self.num_envs < 1:
            raise ValueError("RayVectorEnv needs at least one env_fn")
        if envs_per_worker is not None and (
            isinstance(envs_per_worker, bool) or not isinstance(envs_per_worker, int) or envs_per_worker < 1
        ):
            raise ValueError(f"envs_per_worker must be None or an int >= 1, got {envs_per_worker!r}")
        for option, value in (("step_timeout", step_timeout), ("start_timeout", start_timeout)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf
            ):
                raise ValueError(f"{option} must be None or a positive number of seconds, got {value!r}")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        if isinstance(restart_window, bool) or not isinstance(restart_window, int) or restart_window < 1:
            raise ValueError(f"restart_window must be an int >= 1, got {restart_window!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        self._closed = True  # until the actors exist: close() and __del__ have nothing to do
        ensure_ray(address)

        self.copy = copy
        self.step_timeout = None if step_timeout is None else float(step_timeout)
        self.start_timeout = None if start_timeout is None else float(start_timeout)
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._init_recovery()

        # One sub-env in this process tells the spaces and metadata, as in SubprocVectorEnv.
        dummy = env_fns[0]()
        self.single_observation_space = dummy.observation_space
        self.single_action_space = dummy.action_space
        self.metadata = {**dummy.metadata, "autoreset_mode": AutoresetMode.SAME_STEP}
        self.render_mode = dummy.render_mode
        self.spec = dummy.spec
        dummy.close()
        if not isinstance(self.single_observation_space, spaces.Box):
            raise TypeError(
                f"RayVectorEnv needs a Box observation space, got {self.single_observation_space}"
            )
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._obs_dtype = np.dtype(self.single_observation_space.dtype)
        self._obs_shape = tuple(self.single_observation_space.shape)
        # The copy=False array; with copy=True every call returns a new one instead.
        self._observations = np.zeros((self.num_envs, *self._obs_shape), dtype=self._obs_dtype)

        if envs_per_worker is None:
            cluster_cpus = int(ray.cluster_resources().get("CPU", 0)) or available_cpus()
            envs_per_worker = math.ceil(self.num_envs / cluster_cpus)
        self.envs_per_worker = envs_per_worker
        self._actor_options = {"num_cpus": 0, "scheduling_strategy": "SPREAD", **(actor_options or {})}
        self._env_fns = list(env_fns)
        self._seed = None if seed is None else int(seed)
        self._reset_seeds: list[int | None] = [None] * self.num_envs  # the last seeds given to reset
        self._num_steps = 0
        self._pending_step: list[list[Any]] | None = None  # the step's object refs, one list per actor
        self._slices = [
            slice(start, min(start + envs_per_worker, self.num_envs))
            for start in range(0, self.num_envs, envs_per_worker)
        ]
        num_workers = len(self._slices)
        self._actors: list[Any] = [None] * num_workers
        self._step_calls: list[Any] = [None] * num_workers  # actor.step with its num_returns, made once
        self._reset_calls: list[Any] = [None] * num_workers
        self._closed = False
        starting = [self._start_actor(worker, reset_seeds=None) for worker in range(num_workers)]
        _, failures = self._collect(starting, self.start_timeout)
        for worker, failure in failures.items():
            self.close(terminate=True)
            if failure.details:
                logger.error("RayVectorEnv worker %d failed to start:\n%s", worker, failure.details)
            hint = ""
            if failure.kind == "hang":
                hint = f" (is there a node with the resources the actors ask for: {self._actor_options}?)"
            raise EnvWorkerError(
                f"RayVectorEnv worker {worker} failed to start: {failure.summary}{hint}"
            ) from None

    # -- actors ---------------------------------------------------------------------------------

    def _chunks(self, worker: int) -> list[tuple[int, int]]:
        """Row ranges of an actor's observations that each travel inline in a reply."""
        count = self._slices[worker].stop - self._slices[worker].start
        row_bytes = max(1, math.prod(self._obs_shape) * self._obs_dtype.itemsize)
        rows = max(1, (_INLINE_LIMIT - _INLINE_MARGIN) // row_bytes)
        return [(start, min(start + rows, count)) for start in range(0, count, rows)]

    def _start_actor(self, worker: int, reset_seeds: list[int] | None) -> list[Any]:
        """Creates the actor of ``worker``; returns the object refs of its ``start`` reply."""
        chunks = self._chunks(worker)
        actor = _RemoteEnvGroup.options(**self._actor_options).remote(
            self._env_fns[self._slices[worker]], self._obs_shape, self._obs_dtype, chunks
        )
        self._actors[worker] = actor
        returns = 1 + len(chunks)
        self._step_calls[worker] = actor.step.options(num_returns=returns)
        self._reset_calls[worker] = actor.reset.options(num_returns=returns)
        return actor.start.options(num_returns=returns).remote(reset_seeds)

    def _kill_actor(self, worker: int, grace: float) -> None:
        """Kills an actor, after ``grace`` seconds to close its envs (a live, answering actor)."""
        actor = self._actors[worker]
        if actor is None:
            return
        if grace > 0:
            with contextlib.suppress(RayError):
                ray.wait([actor.close.remote()], timeout=grace)
        with contextlib.suppress(RayError, ValueError):  # already dead, or Ray already shut down
            ray.kill(actor, no_restart=True)
        self._actors[worker] = self._step_calls[worker] = self._reset_calls[worker] = None

    def _restart(self, worker: int, grace: float) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
        """Replaces a failed actor; returns the reset infos and observations of its new sub-envs."""
        self._kill_actor(worker, grace)
        part = self._slices[worker]
        seeds = [
            restart_seed(self._seed_base(index), index, self.restarts)
            for index in range(part.start, part.stop)
        ]
        refs = self._start_actor(worker, reset_seeds=seeds)
        deadline = None if self.start_timeout is None else time.monotonic() + self.start_timeout
        _, infos, observations = self._receive(worker, refs, deadline, self.start_timeout)
        return infos, observations

    # -- plumbing -------------------------------------------------------------------------------

    def _where(self, worker: int) -> str:
        part = self._slices[worker]
        return f"sub-envs {part.start}..{part.stop - 1}"

    def _receive(
        self, worker: int, refs: list[Any], deadline: float | None, timeout: float | None
    ) -> tuple[str, Any, list[Any]]:
        """One actor's reply as ``(status, payload, observation chunks)``; _WorkerFailure when it failed.

        ``timeout`` is the whole time the reply was given (``deadline`` is when it ends), for the message.
        """
        try:
            values = ray.get(
                refs, timeout=None if deadline is None else max(0.0, deadline - time.monotonic())
            )
        except GetTimeoutError:
            raise _WorkerFailure(
                worker, "hang", f"{self._where(worker)}: no reply within {timeout:g} s"
            ) from None
        except RayActorError as error:
            raise _WorkerFailure(
                worker, "crash", f"{self._where(worker)}: the worker actor died ({_actor_death(error)})"
            ) from None
        except RayError as error:  # the node died, an object was lost: the actor is as good as gone
            raise _WorkerFailure(
                worker, "crash", f"{self._where(worker)}: {type(error).__name__}: {_one_line(error)}"
            ) from None
        status, payload = values[0]
        if status == "error":
            raise _WorkerFailure(
                worker, "exception", f"{self._where(worker)} raised {_last_line(payload)}", details=payload
            )
        return status, payload, values[1:]

    def _collect(
        self, pending: Sequence[list[Any]], timeout: float | None
    ) -> tuple[list[tuple[str, Any, list[Any]] | None], dict[int, _WorkerFailure]]:
        """Every actor's reply to the last call (None where one failed), and the failures.

        One ``ray.get`` for all actors when all answer within ``timeout`` seconds (None: no limit),
        the hot path; actor by actor, against the same deadline, when any of them failed, to tell which.
        """
        if self._closed:
            raise RuntimeError("RayVectorEnv is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        flat = [ref for refs in pending for ref in refs]
        try:
            values = ray.get(flat, timeout=timeout)
        except RayError:
            values = None
        replies: list[tuple[str, Any, list[Any]] | None] = [None] * len(pending)
        failures: dict[int, _WorkerFailure] = {}
        start = 0
        for worker, refs in enumerate(pending):
            try:
                if values is None:
                    replies[worker] = self._receive(worker, refs, deadline, timeout)
                else:
                    status, payload = values[start]
                    if status == "error":
                        raise _WorkerFailure(
                            worker,
                            "exception",
                            f"{self._where(worker)} raised {_last_line(payload)}",
                            details=payload,
                        )
                    replies[worker] = (status, payload, values[start + 1 : start + len(refs)])
            except _WorkerFailure as failure:
                failures[worker] = failure
            start += len(refs)
        return replies, failures

    def _gather(self, chunks: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        """The observations of all actors as one array, in sub-env order."""
        parts = [chunk for worker_chunks in chunks for chunk in worker_chunks]
        if self.copy:
            return np.concatenate(parts)
        return np.concatenate(parts, out=self._observations)

    # -- the VectorEnv API ----------------------------------------------------------------------

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Resets every sub-env; an int ``seed`` seeds sub-env ``i`` with ``seed + i``.

        An actor that fails here is replaced like in :meth:`step`; its sub-envs start with derived
        seeds and their infos carry ``dropped``.
        """
        if self._pending_step is not None:
            raise RuntimeError("reset called between step_async and step_wait")
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, int | np.integer):
            seeds = [int(seed) + index for index in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} envs")
        if self._closed:
            raise RuntimeError("RayVectorEnv is closed")
        for index, value in enumerate(seeds):
            if value is not None:
                self._reset_seeds[index] = int(value)
        pending = [
            self._reset_calls[worker].remote(seeds[part], options) for worker, part in enumerate(self._slices)
        ]
        replies, failures = self._collect(pending, self.step_timeout)
        infos = [reply[1] if reply is not None else [] for reply in replies]
        chunks = [reply[2] if reply is not None else [] for reply in replies]
        for worker, failure in failures.items():
            reset_infos, chunks[worker] = self._recover(failure)
            infos[worker] = [{**info, "dropped": True} for info in reset_infos]
        return self._gather(chunks), self._merge_infos(infos)

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Steps every sub-env with its action; same-step autoreset.

        The sub-envs of an actor that fails during the step get a dropped episode: a fresh reset
        observation, reward 0, ``terminations`` True and ``infos["dropped"]``.

        Raises:
            EnvWorkerError: more than ``max_restarts`` failures within ``restart_window`` steps.
        """
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Any) -> None:
        """Sends the actions and returns at once: the actors step while the caller computes."""
        if self._closed:
            raise RuntimeError("RayVectorEnv is closed")
        if self._pending_step is not None:
            raise RuntimeError("step_async called twice without step_wait")
        actions = np.asarray(actions)
        if len(actions) != self.num_envs:
            raise ValueError(f"got {len(actions)} actions for {self.num_envs} envs")
        self._num_steps += 1
        self._pending_step = [
            self._step_calls[worker].remote(actions[part]) for worker, part in enumerate(self._slices)
        ]

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """The results of the ``step_async`` call: ``(obs, rewards, terminations, truncations, infos)``."""
        if self._pending_step is None:
            raise RuntimeError("step_wait called without step_async")
        pending, self._pending_step = self._pending_step, None
        replies, failures = self._collect(pending, self.step_timeout)
        results = [reply[1] if reply is not None else None for reply in replies]
        chunks = [reply[2] if reply is not None else [] for reply in replies]
        for worker, failure in failures.items():
            reset_infos, chunks[worker] = self._recover(failure)
            rows = np.concatenate(chunks[worker])
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
        return self._gather(chunks), rewards, terminations, truncations, infos

    def _merge_infos(self, per_worker: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
        infos = [info for worker_infos in per_worker for info in worker_infos]
        for info in infos:
            # Arrays that came through Ray's reply are read-only views of it; the subprocess
            # back-end's final observations are ordinary arrays, and agents may write to them.
            final_obs = info.get("final_obs")
            if isinstance(final_obs, np.ndarray) and not final_obs.flags.writeable:
                info["final_obs"] = final_obs.copy()
        return merge_infos(infos, self.num_envs)

    def _command(self, method: str, per_worker: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``call``/``set_attr`` on every actor; RuntimeError when any of them failed."""
        if self._closed:
            raise RuntimeError("RayVectorEnv is closed")
        pending = [
            [getattr(actor, method).remote(*arguments)]
            for actor, arguments in zip(self._actors, per_worker, strict=True)
        ]
        replies, failures = self._collect(pending, self.step_timeout)
        errors = [reply[1] for reply in replies if reply is not None and reply[0] != "ok"]
        for failure in failures.values():
            self._recover(failure)  # keeps the vector env usable; the caller still hears of it
            errors.append(f"{failure.summary} (the actor was restarted, its episodes reset)")
        if errors:
            raise RuntimeError(f"RayVectorEnv {method} failed in {errors[0]}")
        return [reply[1] for reply in replies]

    def actor_pids(self) -> list[int]:
        """The process id of each actor (on its own node)."""
        return ray.get([actor.pid.remote() for actor in self._actors])

    def close_extras(self, timeout: float = 5.0, terminate: bool = False, **kwargs: Any) -> None:
        """Stops the actors: lets them close their envs (unless ``terminate``), then kills them."""
        if self._closed:
            return
        self._closed = True
        self._pending_step = None
        if not ray.is_initialized():  # Ray shut down first (interpreter exit): the actors are gone
            return
        if not terminate:
            closing = [actor.close.remote() for actor in self._actors if actor is not None]
            with contextlib.suppress(RayError):
                if closing:
                    ray.wait(closing, num_returns=len(closing), timeout=timeout)
        for worker in range(len(self._actors)):
            self._kill_actor(worker, grace=0.0)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # at interpreter exit Ray may be half torn down
                self.close(terminate=True)


def _actor_death(error: RayActorError) -> str:
    """Why an actor died, in one line: Ray's reason and the node it ran on."""
    message = getattr(error, "error_msg", None) or str(error)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    node = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("ip:")), None)
    reason = lines[-1] if lines else type(error).__name__
    reason = reason.split(" Some common causes", 1)[0]  # Ray appends a paragraph of guesses
    if getattr(error, "actor_init_failed", False):
        reason = f"its creation failed: {_one_line(error)}"
    return f"{reason[:300]}{f' on node {node}' if node else ''}"
