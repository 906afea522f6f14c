"""Memory tasks for recurrent agents: MiniGrid's observation encoding, a MiniGrid T-maze, a T-maze.

Observation format (all): a flat float32 vector, ready for an MLP or an LSTM/GRU/Transformer.

* MiniGrid (``OneHotGridObservation``): the agent's VxV egocentric partial view (7x7 by default,
  3x3 in the MiniGrid T-maze), each cell one-hot encoded as object type (11) + colour (6) + door
  state (3) = 20 features, flattened in (x, y, feature) order, followed by the one-hot facing
  direction (4): shape (V * V * 20 + 4,), (984,) for 7x7, (184,) for 3x3. The mission string is
  dropped (constant in the memory tasks). One-hot rather than the raw indices because index 5
  (key) and 6 (ball) are categories, not intensities.
* T-maze (``TMazeEnv``): (3,) = [cue says up, cue says down, at the junction].

Which memory task for what:

* ``MiniGrid-MemoryS7-v0`` (preset ``minigrid-memory-s7``) starts the agent anywhere between the
  cue and the hallway, so in most episodes it must first turn round to look at the cue, then
  remember it, then compare it with the objects at the split. Recurrent PPO stayed at the coin
  flip there within a CPU budget: greedy success 0.55 after 1M steps (16 minutes; a GRU with the
  settings of ``minigrid-tmaze``), and 0.45 after 400k steps with a 3x3 view (an LSTM).
* ``MiniGridTMazeEnv`` (preset ``minigrid-tmaze``) is that task with the agent starting beside the
  cue and a 3x3 view: MiniGrid's maze, objects, actions, observation and rewards, and a cue seen
  on the first step only. Recurrent PPO (GRU) reaches greedy success 1.0 in about 100k steps
  (2-3 minutes on two CPU cores); feed-forward PPO stays at 0.5.
* ``TMazeEnv`` (Bakker 2002) isolates memory further: three numbers, the cue visible on the first
  step only, a corridor that looks the same everywhere. An LSTM solves it in about 50k steps.

In both T-mazes a feed-forward policy sees the same things at the junction whatever the cue was:
it cannot do better than a coin flip (greedy success 0.5), whatever it learns.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from minigrid.core.world_object import Ball, Key
from minigrid.envs import MemoryEnv

from envs.wrappers import _require_int

# Sizes of MiniGrid's cell encoding (minigrid.core.constants): 11 object types, 6 colours, 3 states.
NUM_OBJECTS, NUM_COLORS, NUM_STATES = 11, 6, 3
CELL_FEATURES = NUM_OBJECTS + NUM_COLORS + NUM_STATES
NUM_DIRECTIONS = 4


class OneHotGridObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """MiniGrid ``{"image": (V, V, 3), "direction", "mission"}`` -> flat one-hot float32 vector.

    Args:
        env: a MiniGrid environment (a ``Dict`` space with an ``image`` Box of cell indices).
        flatten: True gives ``(V * V * 20 + 4,)``; False gives channel-first ``(20, V, V)`` (no
            direction), for convolutional encoders.
    """

    def __init__(self, env: gym.Env, flatten: bool = True):
        gym.utils.RecordConstructorArgs.__init__(self, flatten=flatten)
        gym.ObservationWrapper.__init__(self, env)
        space = env.observation_space
        if not isinstance(space, spaces.Dict) or "image" not in space.spaces:
            raise ValueError(f"OneHotGridObservation needs MiniGrid's Dict space with 'image', got {space}")
        image = space["image"]
        if len(image.shape) != 3 or image.shape[2] != 3:
            raise ValueError(f"MiniGrid image must be (V, V, 3) cell indices, got {image.shape}")
        if not isinstance(flatten, bool):
            raise TypeError(f"flatten must be a bool, got {flatten!r}")
        self.flatten = flatten
        self._view = image.shape[:2]
        # Index offsets so that one lookup table row per feature covers all three one-hots.
        self._offsets = np.array([0, NUM_OBJECTS, NUM_OBJECTS + NUM_COLORS], dtype=np.int64)
        if flatten:
            size = self._view[0] * self._view[1] * CELL_FEATURES + NUM_DIRECTIONS
            self.observation_space = spaces.Box(0.0, 1.0, (size,), np.float32)
        else:
            self.observation_space = spaces.Box(0.0, 1.0, (CELL_FEATURES, *self._view), np.float32)

    def observation(self, observation: dict[str, Any]) -> np.ndarray:
        cells = np.asarray(observation["image"], dtype=np.int64)  # (V, V, 3) indices
        if cells.max() >= NUM_OBJECTS:  # every channel's index is below 11
            raise ValueError(f"unexpected MiniGrid cell index {int(cells.max())}")
        onehot = np.zeros((*self._view, CELL_FEATURES), dtype=np.float32)  # (V, V, 20)
        np.put_along_axis(onehot, cells + self._offsets, 1.0, axis=-1)
        if not self.flatten:
            return np.ascontiguousarray(onehot.transpose(2, 0, 1))  # (20, V, V)
        direction = np.zeros(NUM_DIRECTIONS, dtype=np.float32)
        direction[int(observation.get("direction", 0))] = 1.0
        return np.concatenate([onehot.reshape(-1), direction])


class TMazeEnv(gym.Env):
    """A T-maze that needs memory: remember the cue seen at the start, choose at the junction.

    The agent starts at the west end of a corridor of ``corridor_length`` cells. On the first
    step only, the observation shows a cue: the goal is up or down. At the east end (the
    junction), moving up or down ends the episode. Rewards as in MiniGrid's Memory env:
    ``1 - 0.9 * steps / max_steps`` if the move matches the cue, 0 if not. Moving up/down inside
    the corridor, west at the start or east at the junction, wastes a step. The episode is
    truncated after ``max_steps`` steps (default ``4 * corridor_length + 10``), with reward 0.

    Why these rewards: a memoryless policy's best is to guess at once (expected return about
    0.5, success 0.5); waiting for the time-out earns 0. (With +1/-1 for right/wrong and 0 for a
    time-out, guessing and waiting were worth the same, and such a policy learnt to wait.)

    Observation: float32 (3,) = [cue up, cue down, at junction]; all zeros inside the corridor.
    Actions: Discrete(4): 0 east, 1 west, 2 up, 3 down.
    ``info["success"]`` is set on the final step; the return is > 0 exactly when it is True.

    Args:
        corridor_length: cells between the start and the junction (>= 1); the memory span.
        max_steps: truncation limit (None: 4 * corridor_length + 10).
        render_mode: None or ``"rgb_array"`` (a small picture of the maze).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    EAST, WEST, UP, DOWN = 0, 1, 2, 3

    def __init__(
        self, corridor_length: int = 6, max_steps: int | None = None, render_mode: str | None = None
    ):
        self.corridor_length = _require_int("corridor_length", corridor_length, 1)
        self.max_steps = (
            4 * self.corridor_length + 10 if max_steps is None else _require_int("max_steps", max_steps, 1)
        )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0.0, 1.0, (3,), np.float32)
        self.action_space = spaces.Discrete(4)
        self._position = 0
        self._cue = 0  # 0: the goal is up, 1: the goal is down
        self._steps = 0
        self._outcome: bool | None = None

    def _obs(self) -> np.ndarray:
        obs = np.zeros(3, dtype=np.float32)
        if self._steps == 0:
            obs[self._cue] = 1.0
        if self._position == self.corridor_length:
            obs[2] = 1.0
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._position, self._steps, self._outcome = 0, 0, None
        self._cue = int(self.np_random.integers(2))
        return self._obs(), {"cue": self._cue}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        action = int(action)
        self._steps += 1
        reward, terminated, info = 0.0, False, {}
        at_junction = self._position == self.corridor_length
        if action == self.EAST and not at_junction:
            self._position += 1
        elif action == self.WEST and self._position > 0:
            self._position -= 1
        elif action in (self.UP, self.DOWN) and at_junction:
            success = (action == self.UP) == (self._cue == 0)
            reward = 1.0 - 0.9 * self._steps / self.max_steps if success else 0.0
            terminated, self._outcome = True, success
            info["success"] = success
        truncated = not terminated and self._steps >= self.max_steps
        if truncated:
            info["success"] = False
        return self._obs(), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        cell, length = 16, self.corridor_length + 1
        frame = np.zeros((3 * cell, length * cell, 3), dtype=np.uint8)
        frame[cell : 2 * cell] = 80  # the corridor
        frame[:, -cell:] = 80  # the arms of the T
        goal_row = 0 if self._cue == 0 else 2
        frame[goal_row * cell : (goal_row + 1) * cell, -cell:] = (40, 160, 40)
        frame[cell : 2 * cell, :cell] = (200, 200, 40) if self._cue == 0 else (40, 200, 200)  # the cue
        x = self._position * cell
        frame[cell + 4 : 2 * cell - 4, x + 4 : x + cell - 4] = (220, 40, 40)  # the agent
        return frame


class MiniGridTMazeEnv(MemoryEnv):
    """MiniGrid's Memory task with the agent starting beside the cue: a T-maze in MiniGrid.

    The maze, objects, actions (7), observation and rewards are MiniGrid's ``MemoryEnv`` (the
    ``MiniGrid-MemoryS7-v0`` family): a green key or ball (the cue) in the start room, a hallway,
    and a split with a key at one end and a ball at the other; stepping next to the object that
    matches the cue gives ``1 - 0.9 * steps / max_steps``, next to the other one 0. Changes:

    * The agent starts at the west end of the start room facing east, with the cue beside it on
      its left: it sees the cue on the first step. (``MemoryEnv`` starts it anywhere between there
      and the hallway, so that it must first think of turning round to look.)
    * The view is 3x3 by default, and ``size`` must exceed ``agent_view_size + 2`` so that the
      cue is out of view from the split: the agent has to carry it down the hallway.
    * The key is always at the north end and the ball at the south (``shuffle_ends=False``), so
      the cue says which way to turn, as in the classic T-maze. ``MemoryEnv`` shuffles the ends:
      the agent must then compare the object it faces with the one it remembers (an XOR of memory
      and view); with the preset's settings, greedy success after 600k steps was 1.0, 0.77 and
      0.45 for seeds 2, 1 and 3.

    ``info["success"]`` is set on the final step (the return is > 0 exactly when it is True).

    Args:
        size: grid width and height (odd, > agent_view_size + 2); the hallway grows with it.
        agent_view_size: side of the agent's square view (odd, >= 3).
        shuffle_ends: shuffle the objects at the split, as ``MemoryEnv`` does.
        **kwargs: ``max_steps`` (default ``5 * size**2``), ``render_mode``, ... of ``MemoryEnv``.
    """

    def __init__(self, size: int = 7, agent_view_size: int = 3, shuffle_ends: bool = False, **kwargs: Any):
        if not isinstance(shuffle_ends, bool):
            raise TypeError(f"shuffle_ends must be a bool, got {shuffle_ends!r}")
        self.shuffle_ends = shuffle_ends
        _require_int("size", size, 5)
        _require_int("agent_view_size", agent_view_size, 3)
        if size % 2 == 0 or agent_view_size % 2 == 0:
            raise ValueError(f"size and agent_view_size must be odd, got {size} and {agent_view_size}")
        if size <= agent_view_size + 2:
            raise ValueError(
                f"size must exceed agent_view_size + 2 = {agent_view_size + 2} so that the cue is out "
                f"of view from the split, got size={size}"
            )
        super().__init__(size=size, agent_view_size=agent_view_size, **kwargs)

    def _gen_grid(self, width: int, height: int) -> None:
        super()._gen_grid(width, height)
        # The cue lies at (1, height // 2 - 1): start below it, facing east, so it is on the left.
        self.agent_pos = np.array((1, height // 2))
        self.agent_dir = 0
        if not self.shuffle_ends:  # the key at the north end, the ball at the south end
            split_x = width - 2
            north, south = (split_x, height // 2 - 2), (split_x, height // 2 + 2)
            self.grid.set(*north, Key("green"))
            self.grid.set(*south, Ball("green"))
            cue_is_key = isinstance(self.grid.get(1, height // 2 - 1), Key)
            above, below = (split_x, height // 2 - 1), (split_x, height // 2 + 1)
            self.success_pos, self.failure_pos = (above, below) if cue_is_key else (below, above)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        if terminated or truncated:
            info["success"] = tuple(self.agent_pos) == self.success_pos
        return obs, reward, terminated, truncated, info


TMAZE_ID = "lab/TMaze-v0"
MINIGRID_TMAZE_ID = "lab/MiniGrid-TMaze-v0"


def register_envs() -> None:
    """Registers the lab's own environments with Gymnasium (idempotent)."""
    if TMAZE_ID not in gym.registry:
        gym.register(id=TMAZE_ID, entry_point="envs.gridworld:TMazeEnv")
    if MINIGRID_TMAZE_ID not in gym.registry:
        gym.register(id=MINIGRID_TMAZE_ID, entry_point="envs.gridworld:MiniGridTMazeEnv")
