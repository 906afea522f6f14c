"""Generic Gymnasium wrappers the presets need and Gymnasium 1.x does not ship.

Each wrapper follows Gymnasium's conventions: ``<Verb><Target>`` names, the narrowest base class
(``ObservationWrapper`` / ``RewardWrapper`` before ``Wrapper``), ``RecordConstructorArgs`` so that
``env.spec`` can rebuild the whole stack (the env checker does), and loud argument validation.
Where Gymnasium has a wrapper that is as fast (``ResizeObservation``, ``FrameStackObservation``,
``TimeLimit``, ``RecordEpisodeStatistics``, ``StickyAction``), the presets use Gymnasium's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces


def _require_int(name: str, value: Any, minimum: int) -> int:
    """Returns ``value`` if it is an int >= ``minimum``; raises a TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class CropObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Crops an image observation ``(H, W)`` or ``(H, W, C)`` by whole rows and columns.

    Used before resizing to drop parts of the screen that carry no information for the agent
    (for Mario: optionally the score bar at the top). The result is a view of the input, so it
    costs nothing; the resize after it makes the new array.

    Args:
        env: environment with a uint8 ``Box`` image observation space.
        top, bottom, left, right: pixels removed from each edge (>= 0).
    """

    def __init__(self, env: gym.Env, top: int = 0, bottom: int = 0, left: int = 0, right: int = 0):
        gym.utils.RecordConstructorArgs.__init__(self, top=top, bottom=bottom, left=left, right=right)
        gym.ObservationWrapper.__init__(self, env)
        space = env.observation_space
        if not isinstance(space, spaces.Box) or len(space.shape) not in (2, 3):
            raise ValueError(f"CropObservation needs a Box image space (H, W[, C]), got {space}")
        for name, value in (("top", top), ("bottom", bottom), ("left", left), ("right", right)):
            _require_int(name, value, 0)
        height, width = space.shape[:2]
        if top + bottom >= height or left + right >= width:
            raise ValueError(
                f"crop (top={top}, bottom={bottom}, left={left}, right={right}) leaves nothing of a "
                f"{height}x{width} image"
            )
        self._rows = slice(top, height - bottom)
        self._cols = slice(left, width - right)
        self.observation_space = spaces.Box(
            low=space.low[self._rows, self._cols],
            high=space.high[self._rows, self._cols],
            dtype=space.dtype,
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[self._rows, self._cols]


class ScaleReward(gym.RewardWrapper, gym.utils.RecordConstructorArgs):
    """Multiplies every reward by a constant ``scale`` (e.g. 1/15 for Mario's [-15, 15] reward).

    Args:
        env: environment to wrap.
        scale: finite, non-zero multiplier.
    """

    def __init__(self, env: gym.Env, scale: float):
        gym.utils.RecordConstructorArgs.__init__(self, scale=scale)
        gym.RewardWrapper.__init__(self, env)
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not np.isfinite(scale)
            or scale == 0
        ):
            raise ValueError(f"scale must be a finite non-zero number, got {scale!r}")
        self.scale = float(scale)

    def reward(self, reward: SupportsFloat) -> float:
        return float(reward) * self.scale


class NoopResetEpisode(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Starts each episode with a random number (0..``noop_max``) of no-op actions.

    The classic evaluation protocol of Mnih et al. (2015): a deterministic emulator plus a
    deterministic policy would replay one single episode forever; random no-ops make evaluation
    episodes differ. The count is drawn from the env's own ``np_random``, so a seeded reset still
    replays the same episodes.

    Args:
        env: environment with a discrete action space.
        noop_max: the largest number of no-ops (>= 0; 0 disables the wrapper's effect).
        noop_action: the action that does nothing (Mario: 0, "NOOP").
        skip_if: info keys of which any, when true at reset, says the episode starts where something
            below has put it (Mario's route starts and retries, often mid-jump): no no-ops then.
    """

    def __init__(
        self, env: gym.Env, noop_max: int = 30, noop_action: int = 0, skip_if: str | Sequence[str] = ()
    ):
        gym.utils.RecordConstructorArgs.__init__(
            self, noop_max=noop_max, noop_action=noop_action, skip_if=skip_if
        )
        gym.Wrapper.__init__(self, env)
        self.noop_max = _require_int("noop_max", noop_max, 0)
        if not isinstance(env.action_space, spaces.Discrete):
            raise ValueError(f"NoopResetEpisode needs a Discrete action space, got {env.action_space}")
        if not env.action_space.contains(noop_action):
            raise ValueError(f"noop_action {noop_action!r} is not in the action space {env.action_space}")
        self.noop_action = int(noop_action)
        self.skip_if = (skip_if,) if isinstance(skip_if, str) else tuple(skip_if)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        noops = int(self.np_random.integers(0, self.noop_max + 1)) if self.noop_max else 0
        if any(info.get(key) for key in self.skip_if):
            return obs, info
        for _ in range(noops):
            obs, _, terminated, truncated, info = self.env.step(self.noop_action)
            if terminated or truncated:  # a no-op ended the episode (rare): start again, no no-ops
                obs, info = self.env.reset()
        return obs, info


class FilterInfo(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Keeps only the listed keys of ``info`` (at reset and at every step).

    Why: a vector env turns every info key of every sub-env into an array at every step, and an
    async one pickles the dict through a pipe first. Mario's native info has 40 keys (strings and
    a nested dict among them); keeping the dozen that training and evaluation read saves that
    work in the main process, which on a small machine shares its cores with the workers.

    Args:
        env: environment to wrap.
        keys: the info keys to keep; a key missing from the env's info raises at the first reset.
    """

    def __init__(self, env: gym.Env, keys: Sequence[str]):
        gym.utils.RecordConstructorArgs.__init__(self, keys=tuple(keys))
        gym.Wrapper.__init__(self, env)
        if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"keys must be a sequence of strings, got {keys!r}")
        self.keys = tuple(keys)

    def _filter(self, info: dict[str, Any]) -> dict[str, Any]:
        return {key: info[key] for key in self.keys if key in info}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        missing = [key for key in self.keys if key not in info]
        if missing:
            raise KeyError(f"info has no key(s) {missing}; available: {sorted(info)}")
        return obs, self._filter(info)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self._filter(info)


class OneHotObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Turns a ``Discrete(n)`` observation (FrozenLake, Taxi, ...) into a float32 one-hot (n,)."""

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        if not isinstance(env.observation_space, spaces.Discrete):
            raise ValueError(
                f"OneHotObservation needs a Discrete observation space, got {env.observation_space}"
            )
        self._n = int(env.observation_space.n)
        self._start = int(env.observation_space.start)
        self.observation_space = spaces.Box(0.0, 1.0, (self._n,), np.float32)

    def observation(self, observation: Any) -> np.ndarray:
        encoded = np.zeros(self._n, dtype=np.float32)
        encoded[int(observation) - self._start] = 1.0
        return encoded


class ChannelFirstObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Transposes an image observation (H, W, C) to channel-first (C, H, W), as torch wants it."""

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        space = env.observation_space
        if not isinstance(space, spaces.Box) or len(space.shape) != 3:
            raise ValueError(f"ChannelFirstObservation needs a Box (H, W, C) space, got {space}")
        self.observation_space = spaces.Box(
            low=np.transpose(space.low, (2, 0, 1)),
            high=np.transpose(space.high, (2, 0, 1)),
            dtype=space.dtype,
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        # A contiguous copy: torch.as_tensor of a transposed view would copy later anyway.
        return np.ascontiguousarray(np.transpose(observation, (2, 0, 1)))


class MergeStackChannels(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Stacked colour frames (k, H, W, C) -> channel-first (k * C, H, W), as a CNN takes them."""

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        space = env.observation_space
        if not isinstance(space, spaces.Box) or len(space.shape) != 4:
            raise ValueError(f"MergeStackChannels needs a Box (k, H, W, C) space, got {space}")
        k, height, width, channels = space.shape
        self.observation_space = spaces.Box(
            low=space.low.transpose(0, 3, 1, 2).reshape(k * channels, height, width),
            high=space.high.transpose(0, 3, 1, 2).reshape(k * channels, height, width),
            dtype=space.dtype,
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        k, height, width, channels = observation.shape
        return np.ascontiguousarray(observation.transpose(0, 3, 1, 2)).reshape(k * channels, height, width)
