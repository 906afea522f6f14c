"""``make`` and ``make_vec``: a preset name or Gymnasium id in, a wrapped (vector) env out."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.error import DependencyNotInstalled
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv
from gymnasium.wrappers import (
    DtypeObservation,
    FlattenObservation,
    FrameStackObservation,
    GrayscaleObservation,
    RecordEpisodeStatistics,
    ResizeObservation,
)

from envs.gridworld import OneHotGridObservation
from envs.mario import make_mario
from envs.registry import Preset, is_image_space, resolve
from envs.vector import DEFAULT_MAX_RESTARTS, DEFAULT_RESTART_WINDOW, DEFAULT_STEP_TIMEOUT, SubprocVectorEnv
from envs.wrappers import ChannelFirstObservation, MergeStackChannels, OneHotObservation

BACKENDS = ("sync", "async", "ray")
_MARIO_OPTIONS = tuple(inspect.signature(make_mario).parameters)[1:]  # all but env_id


def make(name: str, **overrides: Any) -> gym.Env:
    """Builds one environment from a preset name or a registered Gymnasium id.

    Args:
        name: a preset (``envs.names()``) or a registered Gymnasium id with discrete actions.
        **overrides: replace the preset's ``env_kwargs``: Mario wrapper options (see
            :func:`envs.mario.make_mario`), ``render_mode``, ``max_episode_steps``, env constructor
            arguments (``corridor_length=10`` for the T-maze), and for image ids without a preset
            ``frame_stack``, ``resize`` and ``grayscale``.

    Returns:
        The wrapped env. It records ``info["episode"]`` at the end of each episode.

    Raises:
        ValueError: unknown name (with suggestions), a continuous action space, or a bad option.
    """
    preset = resolve(name)
    kwargs = {**preset.env_kwargs, **overrides}
    if preset.kind == "mario":
        unknown = sorted(set(kwargs) - set(_MARIO_OPTIONS))
        if unknown:
            raise ValueError(f"unknown Mario option(s) {unknown}; valid: {', '.join(_MARIO_OPTIONS)}")
        return make_mario(preset.env_id, **kwargs)
    if preset.kind == "minigrid":
        flatten = kwargs.pop("flatten", True)
        env = _gym_make(preset, kwargs)
        if isinstance(env.observation_space, spaces.Dict) and "image" in env.observation_space.spaces:
            env = OneHotGridObservation(env, flatten=flatten)
        return RecordEpisodeStatistics(env)
    image_options = {key: kwargs.pop(key) for key in ("frame_stack", "resize", "grayscale") if key in kwargs}
    env = _gym_make(preset, kwargs)
    if not isinstance(env.action_space, spaces.Discrete):
        env.close()
        raise ValueError(
            f"env {name!r} has action space {env.action_space}; only Discrete action spaces are supported"
        )
    return RecordEpisodeStatistics(default_wrappers(env, **image_options))


def _gym_make(preset: Preset, kwargs: dict[str, Any]) -> gym.Env:
    try:
        return gym.make(preset.env_id, **kwargs)
    except DependencyNotInstalled as error:
        hint = " (pip install box2d)" if "box2d" in str(error).lower() else ""
        raise DependencyNotInstalled(f"env {preset.name!r} needs a missing package{hint}: {error}") from error


def default_wrappers(env: gym.Env, frame_stack: int = 4, resize: int = 84, grayscale: bool = True) -> gym.Env:
    """Wraps an env by its observation type so that the nets can take the observation.

    * image (uint8 (H, W[, C])): grayscale, resize to ``resize`` x ``resize``, stack ``frame_stack``
      frames -> (frame_stack, resize, resize) uint8, channel-first.
    * ``Discrete`` (FrozenLake, Taxi): one-hot float32.
    * ``Dict``/``Tuple``: flattened float32.
    * any other ``Box``: float32 as it is.
    """
    space = env.observation_space
    if is_image_space(space):
        if len(space.shape) == 3 and space.shape[2] == 3 and grayscale:
            env = GrayscaleObservation(env, keep_dim=False)
        elif len(space.shape) == 3 and space.shape[2] == 1:
            env = gym.wrappers.ReshapeObservation(env, space.shape[:2])
        env = ResizeObservation(env, (resize, resize))
        if frame_stack > 1:
            env = FrameStackObservation(env, stack_size=frame_stack)
        if len(env.observation_space.shape) == 4:  # RGB kept: (k, H, W, 3) -> (3k, H, W)
            env = MergeStackChannels(env)
        elif len(env.observation_space.shape) == 3 and frame_stack == 1 and not grayscale:
            env = ChannelFirstObservation(env)
        return env
    if isinstance(space, spaces.Discrete):
        return OneHotObservation(env)
    if isinstance(space, spaces.Dict | spaces.Tuple):
        env = FlattenObservation(env)
    if isinstance(env.observation_space, spaces.Box) and env.observation_space.dtype != np.float32:
        env = DtypeObservation(env, np.float32)
    return env


def eval_overrides(name: str) -> dict[str, Any]:
    """Returns the ``make`` overrides for evaluation: Mario starts with 0-30 random no-ops.

    Why: the emulator is deterministic and every episode starts from the same saved state, so
    greedy evaluation episodes would all be the same one.
    """
    return dict(resolve(name).eval_kwargs)


def _make_seeded(name: str, seed: int, overrides: dict[str, Any]) -> gym.Env:
    """Builds one sub-env and seeds its RNGs (used inside the worker processes too)."""
    env = make(name, **overrides)
    # Seed at construction so that a vector env replays the same episodes even when the caller's
    # first reset() passes no seed; later autoresets draw from the same, now seeded, generator.
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def make_vec(
    name: str,
    num_envs: int,
    seed: int = 0,
    backend: str = "sync",
    envs_per_worker: int | None = None,
    step_timeout: float | None = DEFAULT_STEP_TIMEOUT,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    restart_window: int = DEFAULT_RESTART_WINDOW,
    ray_address: str | None = None,
    **overrides: Any,
) -> VectorEnv:
    """Builds ``num_envs`` copies of an env as one vector env with same-step autoreset.

    When sub-env ``i`` ends an episode at a step, that step returns its ``terminations[i]`` or
    ``truncations[i]``, ``obs[i]`` is already the first observation of the next episode,
    ``infos["final_obs"][i]`` is the true last observation and ``infos["final_info"]`` the last
    info (with ``episode`` = {"r", "l", "t"}, and for Mario ``x_pos_max`` and ``flag_get``), in
    Gymnasium's dict-of-arrays form with ``_key`` masks. With ``backend="async"`` or ``"ray"``, a
    worker that raises, crashes or hangs is restarted and its sub-envs' episodes are dropped (that
    step marks them terminated with reward 0 and ``infos["dropped"]``; see :mod:`envs.vector`).

    Args:
        name: a preset name or a registered Gymnasium id.
        num_envs: number of sub-envs (>= 1).
        seed: sub-env ``i`` is seeded ``seed + i``; the same seed replays the same episodes (given
            the same actions), with or without ``reset(seed=seed)``.
        backend: ``"sync"`` (one process, Gymnasium's SyncVectorEnv), ``"async"`` (worker
            processes, observations in shared memory) or ``"ray"`` (Ray actors, on this machine or
            anywhere on the cluster of ``ray_address``; see :mod:`envs.ray_vector`).
        envs_per_worker: async and ray: sub-envs stepped one after another in each worker; None
            picks ``ceil(num_envs / cpu_count)`` (ray: the cluster's CPUs), one worker per core.
        step_timeout: async and ray: seconds without a worker's reply before it counts as hung and
            is restarted (None: wait forever).
        max_restarts: async and ray: worker failures (exception, crash, hang) tolerated within
            ``restart_window`` steps, each restarting the worker and dropping its episodes; one more
            raises ``envs.vector.EnvWorkerError``. 0: the first failure raises.
        restart_window: async and ray: that window, in vector steps.
        ray_address: ray only: None starts (or reuses) a local Ray; ``"auto"``, ``"host:port"`` or
            ``"ray://host:port"`` joins a cluster (``ValueError`` when it cannot be reached).
        **overrides: passed to :func:`make` for every sub-env.

    Returns:
        A ``gymnasium.vector.VectorEnv``.
    """
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if envs_per_worker is not None and (not isinstance(envs_per_worker, int) or envs_per_worker < 1):
        raise ValueError(f"envs_per_worker must be None or an int >= 1, got {envs_per_worker!r}")
    resolve(name)  # fail here, in the caller's process, with the helpful message
    env_fns = [partial(_make_seeded, name, int(seed) + index, dict(overrides)) for index in range(num_envs)]
    if backend == "sync":
        vector_env: VectorEnv = SyncVectorEnv(env_fns, autoreset_mode=AutoresetMode.SAME_STEP)
    elif backend == "ray":
        from envs.ray_vector import RayVectorEnv  # imports Ray only for this back-end

        vector_env = RayVectorEnv(
            env_fns,
            envs_per_worker=envs_per_worker,
            step_timeout=step_timeout,
            max_restarts=max_restarts,
            restart_window=restart_window,
            seed=int(seed),
            address=ray_address,
        )
    else:
        vector_env = SubprocVectorEnv(
            env_fns,
            envs_per_worker=envs_per_worker,
            step_timeout=step_timeout,
            max_restarts=max_restarts,
            restart_window=restart_window,
            seed=int(seed),
        )
    vector_env.action_space.seed(int(seed))
    return vector_env
