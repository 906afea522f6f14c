"""Super Mario Bros: the wrappers and the factory behind the ``mario*`` and ``lost-levels*`` presets.

The stack, innermost first (per-frame wrappers below the frame skip, per-agent-step ones above)::

    SuperMarioBrosEnv (nes-py, 240x256 RGB, 60 frames/s, shaped reward clipped to [-15, 15]/frame)
    MapJoypadAction          Discrete(n) index -> NES button byte       (per frame)
    StickyAction             optional, Gymnasium's, ALE-style           (per frame)
    MaxAndSkipNESObservation repeat k frames, max of the last 2, native grayscale screen copy
    ShowHeldJump             optional: a corner block that says whether A is held
    FilterInfo               keep the info keys training reads (a vector env pays per key)
    RandomStage              optional: one stack above per stage, a stage drawn per episode
    RecordMarioProgress      info["x_pos_max"] furthest x this episode, info["stages_cleared"]
    CropObservation          optional (e.g. the score bar)
    ResizeObservation        Gymnasium's, cv2 INTER_AREA -> (84, 84)
    FrameStackObservation    Gymnasium's -> (4, 84, 84) uint8, channel-first, every frame its own array
    NoopResetEpisode         optional random no-op starts (evaluation)
    TimeLimit                truncation after max_episode_steps agent steps
    TruncateWithoutProgress  optional: cut an episode whose furthest x stalls (evaluation)
    RecordEpisodeStatistics  info["episode"] = {"r", "l", "t"} in the game's reward units
    FlagBonus                optional: extra reward on reaching a flag (training)
    TerminateOnLifeLoss      optional, whole-game presets only
    ScaleReward              reward / 15 by default, so a typical step lies in [-1, 1]

Speed: the emulator dominates; the wrappers add a fraction of it (``lab bench env``). The two
choices that matter are reading the screen with nes-py's native grayscale copy (several times
cheaper than cv2 on nes-py's strided RGB view, and far cheaper than Gymnasium's float
GrayscaleObservation) and reading it only on the two frames that are max-pooled.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, SupportsFloat

import gym_super_mario_bros  # noqa: F401  (registers the SuperMarioBros* ids)
import gymnasium as gym
import numpy as np
from gym_super_mario_bros import SuperMarioBrosEnv
from gym_super_mario_bros.actions import COMPLEX_MOVEMENT, RIGHT_ONLY, SIMPLE_MOVEMENT
from gymnasium import spaces
from gymnasium.wrappers import (
    FrameStackObservation,
    RecordEpisodeStatistics,
    ResizeObservation,
    StickyAction,
    TimeLimit,
)
from nes_py import NESEnv

from envs.wrappers import (
    ChannelFirstObservation,
    CropObservation,
    FilterInfo,
    MergeStackChannels,
    NoopResetEpisode,
    ScaleReward,
    _require_int,
)

#: Named action sets (lists of NES button combinations) from gym-super-mario-bros.
ACTION_SETS: dict[str, list[list[str]]] = {
    "right_only": RIGHT_ONLY,
    "simple": SIMPLE_MOVEMENT,
    "complex": COMPLEX_MOVEMENT,
}

#: Bit of each NES button in the controller byte (nes-py's layout).
BUTTONS: dict[str, int] = {
    "right": 0b10000000,
    "left": 0b01000000,
    "down": 0b00100000,
    "up": 0b00010000,
    "start": 0b00001000,
    "select": 0b00000100,
    "B": 0b00000010,
    "A": 0b00000001,
    "NOOP": 0b00000000,
}

#: Info keys kept by default: what training, evaluation and ``lab watch`` read. Everything numeric.
INFO_KEYS: tuple[str, ...] = (
    "x_pos",
    "y_pos",
    "flag_get",
    "life",
    "world",
    "stage",
    "time",
    "score",
    "coins",
)

#: The NES runs at 60 frames per second.
NES_FPS = 60


class MapJoypadAction(gym.ActionWrapper, gym.utils.RecordConstructorArgs):
    """Maps a ``Discrete(n)`` action to one of ``n`` NES button combinations.

    The Gymnasium counterpart of nes-py's ``JoypadSpace``, which is a plain ``Wrapper`` without
    ``RecordConstructorArgs`` (so ``env.spec`` cannot rebuild a stack that uses it).

    Args:
        env: an nes-py environment (its action space is the controller byte, ``Discrete(256)``).
        actions: ``"right_only"`` (5 actions), ``"simple"`` (7) or ``"complex"`` (12), or a list of
            button lists such as ``[["NOOP"], ["right", "A"]]``.
    """

    def __init__(self, env: gym.Env, actions: str | Sequence[Sequence[str]] = "simple"):
        gym.utils.RecordConstructorArgs.__init__(self, actions=actions)
        gym.ActionWrapper.__init__(self, env)
        if not isinstance(env.unwrapped, NESEnv):
            raise TypeError(
                f"MapJoypadAction needs an nes-py environment, got {type(env.unwrapped).__name__}"
            )
        if isinstance(actions, str):
            if actions not in ACTION_SETS:
                raise ValueError(f"unknown action set {actions!r}; valid: {', '.join(ACTION_SETS)}")
            combos = ACTION_SETS[actions]
        else:
            combos = [list(combo) for combo in actions]
        if not combos:
            raise ValueError("the action set is empty")
        codes = []
        for combo in combos:
            if isinstance(combo, str) or not combo:
                raise ValueError(f"each action must be a non-empty list of buttons, got {combo!r}")
            unknown = [button for button in combo if button not in BUTTONS]
            if unknown:
                raise ValueError(f"unknown button(s) {unknown}; valid: {', '.join(BUTTONS)}")
            code = 0
            for button in combo:
                code |= BUTTONS[button]
            codes.append(code)
        self._codes = codes
        #: Human-readable names of the actions, e.g. "right A B" (read by ``lab watch``).
        self.action_names = [" ".join(combo) for combo in combos]
        self.action_space = spaces.Discrete(len(codes))

    def action(self, action: Any) -> int:
        index = int(action)
        if not 0 <= index < len(self._codes):  # a negative index would silently wrap around
            raise ValueError(f"action {action!r} is outside Discrete({len(self._codes)})")
        return self._codes[index]

    def get_action_meanings(self) -> list[str]:
        """Returns the button combination of each action, like ALE's method of the same name."""
        return list(self.action_names)


class MaxAndSkipNESObservation(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Repeats an action for ``skip`` frames and returns the max of the last two screens.

    Like Gymnasium's ``MaxAndSkipObservation`` but reading the screen straight from the emulator:
    nes-py's native grayscale (or contiguous RGB) copy, and only on the two frames that are pooled,
    so two of every four frames are never converted. The max over two frames removes the sprite
    flicker of the NES (at most 8 sprites a scan line). Each returned array is new: nes-py's own
    observation is a view of a buffer it overwrites every frame.

    An episode that ends inside the skip returns the max of the frames it has (Gymnasium's
    version returns stale frames from the previous step then).

    Args:
        env: an nes-py environment (possibly wrapped by per-frame wrappers).
        skip: frames per agent step (>= 1).
        grayscale: return (240, 256) luma instead of (240, 256, 3) RGB.
    """

    def __init__(self, env: gym.Env, skip: int = 4, grayscale: bool = True):
        gym.utils.RecordConstructorArgs.__init__(self, skip=skip, grayscale=grayscale)
        gym.Wrapper.__init__(self, env)
        if not isinstance(env.unwrapped, NESEnv):
            raise TypeError(
                f"MaxAndSkipNESObservation needs an nes-py environment, got {type(env.unwrapped).__name__}"
            )
        self.skip = _require_int("skip", skip, 1)
        if not isinstance(grayscale, bool):
            raise TypeError(f"grayscale must be a bool, got {grayscale!r}")
        self.grayscale = grayscale
        self._nes: NESEnv = env.unwrapped
        self._mode = "grayscale" if grayscale else "rgb_array_contiguous"
        shape = env.observation_space.shape[:2] if grayscale else env.observation_space.shape
        self.observation_space = spaces.Box(0, 255, shape, np.uint8)
        # One recorded frame per agent step plays at 60 / skip frames per second.
        self.metadata = {**env.metadata, "render_fps": NES_FPS / self.skip}

    def _screen(self) -> np.ndarray:
        return self._nes.observation(self._mode)  # a new contiguous uint8 array every call

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        _, info = self.env.reset(seed=seed, options=options)
        return self._screen(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        total_reward = 0.0
        previous = latest = None
        terminated = truncated = False
        info: dict[str, Any] = {}
        for frame in range(self.skip):
            _, reward, terminated, truncated, info = self.env.step(action)
            total_reward += float(reward)
            done = terminated or truncated
            if frame >= self.skip - 2 or done:
                previous, latest = latest, self._screen()
            if done:
                break
        obs = latest if previous is None else np.maximum(previous, latest, out=latest)
        return obs, total_reward, terminated, truncated, info

    def close(self) -> None:
        # nes-py raises on a second close(); Gymnasium expects close() to be idempotent.
        if self._nes._env is not None:
            self.env.close()

    def render(self) -> Any:
        if self.render_mode == "rgb_array":
            # A copy: nes-py's render() returns its live screen buffer, so a list of frames
            # collected for a video would otherwise hold one and the same (last) picture.
            return self._nes.observation("rgb_array_contiguous")
        return self.env.render()


# Where Super Mario Bros. keeps the controller as the game read it on the last frame (SavedJoypad1Bits),
# and A's bit there (the NES order: A, B, select, start, up, down, left, right from bit 7 down).
JOYPAD_BITS = 0x06FC
A_BIT = 0x80


def jump_held(emulator: NESEnv) -> bool:
    """Whether the game read the jump button (A) as held on the emulator's last frame."""
    return bool(emulator.ram[JOYPAD_BITS] & A_BIT)


#: The side of ShowHeldJump's block in screen pixels (240x256): about 4 pixels once resized to 84x84.
HELD_JUMP_BLOCK = 12


class ShowHeldJump(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Draws whether the jump button (A) is held into the screen's top-left corner.

    Super Mario Bros. jumps on a new press of A only, so an agent that keeps choosing a jump action
    holds A and does not jump again: stuck against a step, its frames stay the same, and a greedy
    policy repeats the action until the episode is cut (about half of the greedy failures of the 1-1
    agents measured, most of them at the last staircase; RESULTS.md, "How greedy episodes fail").
    The frames alone cannot say whether A is held; this block can, as the button under a player's
    thumb does: ``size`` x ``size`` pixels at the top-left (the border above the score bar) are 255
    when the game read A as held on the last frame (:func:`jump_held`), else 0. The game's own
    record of the controller is read, so sticky actions are accounted for.

    Args:
        env: the frame-skipped stack (:class:`MaxAndSkipNESObservation`), full-size frames
            (240, 256) or (240, 256, 3).
        size: the block's side in screen pixels (12: about 4 pixels once resized to 84x84).
    """

    def __init__(self, env: gym.Env, size: int = HELD_JUMP_BLOCK):
        gym.utils.RecordConstructorArgs.__init__(self, size=size)
        gym.ObservationWrapper.__init__(self, env)
        if not isinstance(env.unwrapped, NESEnv):
            raise TypeError(f"ShowHeldJump needs an nes-py environment, got {type(env.unwrapped).__name__}")
        self.size = _require_int("size", size, 1)
        self._nes: NESEnv = env.unwrapped

    def observation(self, observation: np.ndarray) -> np.ndarray:
        held = jump_held(self._nes)
        # The frame is a new array every step (MaxAndSkipNESObservation), so drawing in place is safe.
        observation[: self.size, : self.size] = 255 if held else 0
        return observation


class RecordMarioProgress(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Adds ``info["x_pos_max"]`` (furthest x so far this episode) and ``info["stages_cleared"]``.

    gym-super-mario-bros' own ``x_pos_max`` restarts after every life; this one covers the whole
    episode. ``stages_cleared`` counts the rising edges of ``flag_get`` (whole-game presets can
    clear several stages in one episode). Both end up in a vector env's ``final_info``.
    """

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)
        self._x_pos_max = 0
        self._stages_cleared = 0
        self._flag = False

    def _record(self, info: dict[str, Any]) -> dict[str, Any]:
        self._x_pos_max = max(self._x_pos_max, int(info.get("x_pos", 0)))
        flag = bool(info.get("flag_get", info.get("clear", False)))
        if flag and not self._flag:
            self._stages_cleared += 1
        self._flag = flag
        info["x_pos_max"] = self._x_pos_max
        info["stages_cleared"] = self._stages_cleared
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._x_pos_max, self._stages_cleared, self._flag = 0, 0, False
        return obs, self._record(info)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self._record(info)


class RandomStage(gym.Env):
    """Each episode plays a stage drawn at random from a list, each stage its own emulator.

    gym-super-mario-bros 9.x has no random-stages env, and one emulator cannot jump between stages
    without replaying the start-up sequence, so this holds one per-frame stack (emulator, action
    mapping, sticky actions, frame skip, info filter) per stage and forwards to the one drawn at
    ``reset``. The draw uses this env's ``np_random``, so a seeded env replays the same stages.
    ``info["world"]`` and ``info["stage"]`` say which stage is playing.

    Args:
        stacks: one env per stage, all with the same spaces (built by :func:`make_mario`).
        labels: the stages' names, e.g. ``("1-1", "1-2")``, for ``stage_label``.
    """

    def __init__(self, stacks: Sequence[gym.Env], labels: Sequence[str]):
        if not stacks or len(stacks) != len(labels):
            raise ValueError("RandomStage needs one env per stage label")
        self.stacks = list(stacks)
        self.labels = tuple(labels)
        self.current = 0
        self.observation_space = stacks[0].observation_space
        self.action_space = stacks[0].action_space
        self.metadata = dict(stacks[0].metadata)
        self.render_mode = stacks[0].render_mode
        self._seeded = False
        self.probabilities: np.ndarray | None = None  # None: uniform

    def set_stage_weights(self, weights: dict[str, float]) -> None:
        """Draws the next stages with probabilities proportional to ``weights`` ({label: weight > 0},
        every stage named); the training's adaptive stage sampling sets them between updates."""
        if sorted(weights) != sorted(self.labels) or not all(w > 0 for w in weights.values()):
            raise ValueError(
                f"stage weights must give each of {', '.join(self.labels)} a weight > 0, got {weights}"
            )
        values = np.array([weights[label] for label in self.labels], dtype=np.float64)
        self.probabilities = values / values.sum()

    @property
    def stage_label(self) -> str:
        """The stage being played, e.g. ``"1-3"``."""
        return self.labels[self.current]

    @property
    def action_names(self) -> list[str]:
        return self.stacks[0].get_wrapper_attr("action_names")

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        if seed is not None or not self._seeded:
            # Each stage's stack gets its own seed (sticky actions draw from it), derived from ours.
            seeds = self.np_random.integers(0, 2**31 - 1, size=len(self.stacks))
            for stack, stack_seed in zip(self.stacks, seeds, strict=True):
                stack.reset(seed=int(stack_seed))
            self._seeded = True
        if self.probabilities is None:
            self.current = int(self.np_random.integers(len(self.stacks)))
        else:
            self.current = int(self.np_random.choice(len(self.stacks), p=self.probabilities))
        return self.stacks[self.current].reset(options=options)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        return self.stacks[self.current].step(action)

    def render(self) -> Any:
        return self.stacks[self.current].render()

    def get_action_meanings(self) -> list[str]:
        return list(self.action_names)

    def close(self) -> None:
        for stack in self.stacks:
            stack.close()


def playing_emulator(env: gym.Env) -> Any:
    """The nes-py env under ``env`` that plays now (a multi-stage env's current stage's)."""
    base = env.unwrapped
    return base.stacks[base.current].unwrapped if isinstance(base, RandomStage) else base


def parse_stages(stages: Sequence[str]) -> list[tuple[int, int]]:
    """``["1-1", "1-4"]`` -> ``[(1, 1), (1, 4)]``; ValueError naming the bad entry otherwise."""
    parsed = []
    for label in stages:
        parts = str(label).split("-")
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise ValueError(f"stage {label!r} is not of the form W-S, e.g. 1-2")
        world, stage = int(parts[0]), int(parts[1])
        if not (1 <= world <= 8 and 1 <= stage <= 4):
            raise ValueError(f"stage {label!r} does not exist; worlds are 1-8 and stages 1-4")
        parsed.append((world, stage))
    if not parsed:
        raise ValueError("stages must name at least one stage, e.g. 1-1")
    return parsed


def stage_of(env_id: str) -> str | None:
    """``"SuperMarioBros-1-3-v0"`` -> ``"1-3"``; None for an id that plays the whole game."""
    parts = env_id.split("-")
    return f"{parts[1]}-{parts[2]}" if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit() else None


def stage_label(info: Mapping[str, Any]) -> str | None:
    """``"1-3"`` for an info or episode record of world 1, stage 3; None when it names no stage."""
    if "world" not in info or "stage" not in info:
        return None
    return f"{int(info['world'])}-{int(info['stage'])}"


def _per_frame_stack(
    env_id: str,
    actions: str | Sequence[Sequence[str]],
    sticky_prob: float,
    frame_skip: int,
    grayscale: bool,
    info_keys: Sequence[str] | None,
    render_mode: str | None,
    show_held_jump: bool,
) -> gym.Env:
    """The emulator and the wrappers that act per frame, up to the frame skip and the info filter."""
    env = gym.make(env_id, render_mode=render_mode)
    env = MapJoypadAction(env, actions)
    if sticky_prob > 0:
        env = StickyAction(env, repeat_action_probability=float(sticky_prob))
    env = MaxAndSkipNESObservation(env, skip=frame_skip, grayscale=grayscale)
    if show_held_jump:
        env = ShowHeldJump(env)
    if info_keys is not None and isinstance(env.unwrapped, SuperMarioBrosEnv):
        env = FilterInfo(env, keys=tuple(info_keys))
    return env


#: Recent deaths per stage whose start states an env keeps for retries (the oldest goes first).
RETRY_POOL = 8


class Retry(NamedTuple):
    """A start state shortly before a death: the emulator some steps earlier and the actions that
    led from there to the hand-over (a frame stack's worth, to refill the stack)."""

    snapshot: Any
    actions: list[int]
    back: int  # agent steps from the hand-over to the death


class RouteStarts(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Starts some episodes part-way along a known route through the stage (a start-state curriculum),
    and some shortly before where a recent episode died (retries).

    On 1-3 the progress reward leads the agent along the low tree tops to a tree it cannot climb; the
    high ones that lead past it pay no more until then, and no entropy bonus found them (issue 26;
    ``benchmarks/mario_jump_probe.py``). Starting episodes along a route that takes the high way
    (Salimans and Chen 2018, "Learning Montezuma's Revenge from a single demonstration") lets the
    agent learn the stage's later parts, and then the way there, from nearer starts.

    At reset, with probability ``prob``, the wrapper replays the first ``n`` actions of the stage's
    route, with sticky actions off (the emulator is then deterministic, so the replay passes where
    the route passed) and hands over from there. ``n`` is uniform in the stage's window ``[low,
    high)`` of :meth:`set_route_windows`, by default ``0..len(route)``; the training's backward
    schedule moves a narrow window from the flag back to the start. The replayed steps are not the
    agent's: their rewards are dropped, and episode statistics and time limits outside the wrapper
    start after them. ``info["route_start"]`` is the number of replayed steps (0 for an episode from
    the stage's start), so the training curves can leave these episodes out. Stages without a route
    start as usual.

    A route's replay hands over in the route's own states: on 1-3 the agent clears 85-90% of the
    starts along the stretch where most of its episodes from the start die, since it arrives there
    otherwise (another lift phase, another speed). Retries practise the states it reaches itself
    (the "restart from a save state" of speed-runners; Go-Explore's return to a state): every
    ``tail``-th step of an episode keeps a snapshot, and when the episode dies (terminated without
    the flag; not a retry itself) a snapshot from ``tail`` to ``retry_back`` steps before the death
    goes to the stage's pool of the :data:`RETRY_POOL` latest. With probability ``retry_prob`` a
    reset then loads one from the pool and replays the ``tail`` actions the episode took from there, sticky actions off
    (so not exactly its path: a slightly other start), and hands over. ``info["retry_start"]`` is
    the number of steps between the hand-over and the death it retries (0 otherwise).

    A replay from the stage's start costs as much emulation as the agent steps it skips, which near
    the flag is many times the episode itself. So every ``tail``-th position the replays pass is kept
    as an emulator snapshot (nes-py's ``dump_state``: quick, but hundreds of KB each, hence not every
    position), and a later start loads the last snapshot at least
    ``tail`` actions before it and replays ``tail`` to ``2 * tail - 1`` actions, which refills the
    frame stack and the wrappers' last action exactly as a replay from the start would.

    Args:
        env: a Mario env stack whose info carries ``world`` and ``stage`` (below the no-op starts,
            whose random wait would throw the replay off its route; they skip a route start).
        routes: ``{"1-3": [action, ...]}``, indices into the env's action set from the stage's start.
        prob: the probability that an episode starts along the route, in [0, 1].
        windows: ``{"1-3": (low, high)}``, the first windows (:meth:`set_route_windows`).
        retry_prob: the probability that an episode retries a recent death, in [0, 1] (0: never; the
            route-start draw then takes the others).
        retry_back: the most agent steps before a death that a retry hands over.
    """

    def __init__(
        self,
        env: gym.Env,
        routes: dict[str, Sequence[int]],
        prob: float,
        windows: dict[str, tuple[int, int]] | None = None,
        retry_prob: float = 0.0,
        retry_back: int = 40,
    ):
        gym.utils.RecordConstructorArgs.__init__(
            self, routes=routes, prob=prob, windows=windows, retry_prob=retry_prob, retry_back=retry_back
        )
        gym.Wrapper.__init__(self, env)
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"route_start_prob must be in [0, 1], got {prob}")
        if not 0.0 <= float(retry_prob) <= 1.0:
            raise ValueError(f"retry_prob must be in [0, 1], got {retry_prob}")
        self.routes = {str(label): [int(action) for action in route] for label, route in routes.items()}
        self.prob = float(prob)
        self.windows = {label: (0, len(route) + 1) for label, route in self.routes.items()}
        self.set_route_windows(windows or {})
        below = _wrappers_below(env)
        self.sticky = [wrapper for wrapper in below if isinstance(wrapper, StickyAction)]
        stacks = [wrapper.stack_size for wrapper in below if isinstance(wrapper, FrameStackObservation)]
        self.tail = max(stacks, default=1)  # the actions replayed after a snapshot: a whole frame stack
        #: {stage: {n: the emulator after the route's first n actions}}, n a multiple of tail
        self.snapshots: dict[str, dict[int, Any]] = {label: {} for label in self.routes}
        self.replayed = 0
        self.retry_prob = float(retry_prob)
        self.retry_back = max(int(retry_back), self.tail)
        self.retries: dict[str, deque[Retry]] = {}  # {stage: its latest deaths' start states}
        self.retried = 0
        # This episode's snapshots, (steps taken, emulator), every tail-th step, and its latest actions
        # as (index, action): enough to hand over up to retry_back steps before a death.
        self.label = ""
        self.taken = 0
        self.episode_snapshots: deque[tuple[int, Any]] = deque(maxlen=self.retry_back // self.tail + 2)
        self.episode_actions: deque[tuple[int, int]] = deque(maxlen=self.retry_back + 2 * self.tail)

    def set_route_windows(self, windows: dict[str, tuple[int, int]]) -> None:
        """Later starts of each named stage replay ``low <= n < high`` actions of its route (the
        training sets them between updates; stages not named keep theirs)."""
        for label, (low, high) in windows.items():
            route = self.routes.get(label)
            if route is None or not 0 <= low < high <= len(route) + 1:
                raise ValueError(
                    f"route window {label}: ({low}, {high}) needs a route of that stage and "
                    f"0 <= low < high <= {len(route) + 1 if route else 'its length + 1'}"
                )
            self.windows[label] = (int(low), int(high))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        self.replayed = self.retried = self.taken = 0
        self.episode_snapshots.clear()
        self.episode_actions.clear()
        self.label = label = stage_label(info) or ""  # no route is keyed by ""
        route, pool = self.routes.get(label), self.retries.get(label)
        if pool and self.np_random.random() < self.retry_prob:
            obs, info = self._retry(pool[int(self.np_random.integers(len(pool)))], obs, info)
        elif route and self.np_random.random() < self.prob:
            obs, info = self._replay(label, int(self.np_random.integers(*self.windows[label])), obs, info)
        return obs, {**info, **self._start_info()}

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        # A retry's own death is not kept: retries of retries would creep ever nearer the death,
        # past the steps where it could still be avoided.
        keeping = self.retry_prob and not self.retried
        if keeping:
            emulator = self._emulator()
            if emulator is not None and self.taken % self.tail == 0:
                self.episode_snapshots.append((self.taken, emulator.dump_state()))  # ~30 us
            self.episode_actions.append((self.taken, int(action)))
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.taken += 1
        if keeping and terminated and not info.get("flag_get"):
            self._keep_retry()
        # Every step says how the episode began, so the episode statistics can tell them apart.
        return obs, reward, terminated, truncated, {**info, **self._start_info()}

    def _start_info(self) -> dict[str, int]:
        return (
            {"route_start": self.replayed, "retry_start": self.retried}
            if self.retry_prob
            else {"route_start": self.replayed}
        )

    def _keep_retry(self) -> None:
        """Keeps a start state ``tail`` to ``retry_back`` steps before this episode's death."""
        fits = [(n, snapshot) for n, snapshot in self.episode_snapshots
                if self.tail <= self.taken - (n + self.tail) <= self.retry_back]  # fmt: skip
        if not fits:  # a death within the episode's first steps
            return
        n, snapshot = fits[int(self.np_random.integers(len(fits)))]
        actions = [action for index, action in self.episode_actions if n <= index < n + self.tail]
        pool = self.retries.setdefault(self.label, deque(maxlen=RETRY_POOL))
        pool.append(Retry(snapshot, actions, self.taken - n - self.tail))

    def _retry(self, retry: Retry, obs: Any, info: dict) -> tuple[Any, dict]:
        """Loads a retry's snapshot and replays its actions; an episode that ends in the replay
        starts again from the stage's start."""
        emulator = self._emulator()
        if emulator is None:
            return obs, info
        emulator.load_state(retry.snapshot)
        with self._sticky_off():
            for action in retry.actions:
                obs, _, terminated, truncated, info = self.env.step(action)
                if terminated or truncated:
                    return self.env.reset()
        self.retried = retry.back
        return obs, info

    @contextlib.contextmanager
    def _sticky_off(self) -> Iterator[None]:
        """Sticky actions off for a replay (the emulator is then deterministic), back on after it."""
        sticky_probs = [wrapper.repeat_action_probability for wrapper in self.sticky]
        for wrapper in self.sticky:
            wrapper.repeat_action_probability = 0.0
        try:
            yield
        finally:
            for wrapper, sticky_prob in zip(self.sticky, sticky_probs, strict=True):
                wrapper.repeat_action_probability = sticky_prob

    def _replay(self, label: str, length: int, obs: Any, info: dict) -> tuple[Any, dict]:
        """Plays the first ``length`` actions of the stage's route, from the nearest snapshot at
        least ``tail`` actions before when there is one."""
        route, snapshots, emulator = self.routes[label], self.snapshots[label], self._emulator()
        start = max((n for n in snapshots if n <= length - self.tail), default=0)
        if start and emulator is not None:
            emulator.load_state(snapshots[start])
        with self._sticky_off():
            for n in range(start + 1, length + 1):
                obs, _, terminated, truncated, info = self.env.step(route[n - 1])
                if terminated or truncated:  # the route's end (the flag), or one that does not fit
                    return self.env.reset()
                if emulator is not None and n % self.tail == 0 and n not in snapshots:
                    snapshots[n] = emulator.dump_state()
        self.replayed = length
        return obs, info

    def _emulator(self) -> Any:
        """The playing stage's nes-py emulator, None for an env without snapshots."""
        base = playing_emulator(self.env)
        return base if hasattr(base, "dump_state") and hasattr(base, "load_state") else None


def load_stage_route(path: str, preset: str) -> tuple[str, list[int]]:
    """The stage of a single-stage preset (``"mario-1-3"`` -> ``"1-3"``) and its route in the file
    ``path`` (:func:`load_routes`); ValueError naming the stages the file has when it lacks that one."""
    stage = preset.removeprefix("mario-")
    routes = load_routes(path)
    if stage not in routes:
        raise ValueError(f"{path} holds no route for {stage} (it has {', '.join(routes)})")
    return stage, routes[stage]


def load_routes(paths: str, action_set: str = "simple", option: str = "route_starts") -> dict[str, list[int]]:
    """Reads route files for :class:`RouteStarts`, one or several separated by commas (a multi-stage
    preset takes one per stage, e.g. ``envs/routes/1-2.json,envs/routes/1-3.json``), each
    ``{"actions": "simple", "routes": {"1-3": [...]}}``; errors name them as the value of ``option``.

    Raises:
        ValueError: one line naming what is wrong (no such file, not JSON, an unknown action set, a
            stage that does not exist, an action outside the file's set or missing from the training's
            set, a stage in two files).
    """
    routes: dict[str, list[int]] = {}
    for path in (part.strip() for part in paths.split(",")):
        for label, route in load_route_file(path, action_set, option).items():
            if label in routes:
                raise ValueError(f"{option}={paths!r} gives two routes of {label}; give each stage one")
            routes[label] = route
    return routes


def load_route_file(path: str, action_set: str, option: str = "route_starts") -> dict[str, list[int]]:
    """One route file of :func:`load_routes`."""
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except OSError as error:
        raise ValueError(f"{option}={path!r}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{option}={path!r} is not JSON ({error.msg}, line {error.lineno})") from None
    routes = content.get("routes") if isinstance(content, dict) else None
    if not isinstance(routes, dict) or not routes:
        raise ValueError(f'{option}={path!r} needs {{"actions": ..., "routes": {{"W-S": [action, ...]}}}}')
    written_for = content.get("actions", "simple")
    if written_for not in ACTION_SETS:
        raise ValueError(
            f"{option}={path!r} is for the action set {written_for!r}; valid: {', '.join(ACTION_SETS)}"
        )
    parse_stages(list(routes))
    written, training = ACTION_SETS[written_for], ACTION_SETS[action_set]
    for label, route in routes.items():
        if not isinstance(route, list) or not all(
            isinstance(action, int) and 0 <= action < len(written) for action in route
        ):
            raise ValueError(
                f"{option}={path!r}: the route of {label} must be a list of actions 0..{len(written) - 1}"
            )
        # A route of another set replays the same when each action it uses is the same buttons at the
        # same index in the training's set (the sets are prefixes of one another, e.g. simple's 0..4
        # are right_only).
        for action in route:
            if action >= len(training) or training[action] != written[action]:
                raise ValueError(
                    f"{option}={path!r}: the route of {label} uses action {action} of the "
                    f"{written_for!r} set, which the {action_set!r} set the run trains on does not have"
                )
    return {str(label): list(route) for label, route in routes.items()}


def _wrappers_below(env: gym.Env) -> list[gym.Env]:
    """Every wrapper under ``env``, through :class:`RandomStage`'s stage stacks too."""
    found, pending = [], [env]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(getattr(current, "stacks", []))
        if isinstance(current, gym.Wrapper):
            pending.append(current.env)
    return found


class TruncateWithoutProgress(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Ends an episode (as a truncation) when Mario's furthest x has not grown for ``patience`` agent
    steps, and says so in ``info["stalled"]``.

    For evaluation: a greedy policy that walks into a wall forever would otherwise play until the
    stage clock or the time limit runs out, minutes of emulation for an outcome already known.

    Args:
        env: an env whose info carries ``x_pos_max`` (:class:`RecordMarioProgress` below it).
        patience: agent steps without a new furthest x before the episode is cut (>= 1).
    """

    def __init__(self, env: gym.Env, patience: int):
        gym.utils.RecordConstructorArgs.__init__(self, patience=patience)
        gym.Wrapper.__init__(self, env)
        self.patience = _require_int("patience", patience, 1)
        self._best = 0
        self._since = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._best, self._since = int(info.get("x_pos_max", 0)), 0
        info["stalled"] = False
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        furthest = int(info.get("x_pos_max", 0))
        self._best, self._since = (furthest, 0) if furthest > self._best else (self._best, self._since + 1)
        stalled = self._since >= self.patience and not (terminated or truncated)
        info["stalled"] = stalled
        return obs, reward, terminated, truncated or stalled, info


class FlagBonus(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Adds ``bonus`` to the reward of the step on which Mario reaches a flag (each flag once).

    Why: the game pays 50 for a flag, clipped with the rest of a frame's reward to 15, about three
    frames of running; where a dead end pays more progress than the way to the flag (1-2's warp zone
    against its exit pipe), no discount makes the flag the better return (RESULTS.md, "Where the
    distilled network fails"). Training only; put it above ``RecordEpisodeStatistics`` so that
    ``info["episode"]["r"]`` stays the game's own return.

    Args:
        env: an env whose info carries ``flag_get``.
        bonus: the extra reward, in the game's units (``reward_scale`` applies to it as to the rest).
    """

    def __init__(self, env: gym.Env, bonus: float):
        gym.utils.RecordConstructorArgs.__init__(self, bonus=bonus)
        gym.Wrapper.__init__(self, env)
        self.bonus = float(bonus)
        self._flag = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        self._flag = False
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        flag = bool(info.get("flag_get", False))
        if flag and not self._flag:
            reward = float(reward) + self.bonus
        self._flag = flag
        return obs, reward, terminated, truncated, info


class TerminateOnLifeLoss(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Episodic life for whole-game Mario: losing a life ends the episode for the learner.

    The game itself goes on: the next ``reset()`` after a life loss returns the current
    observation instead of restarting (the trick of Mnih et al. 2015 for Atari). Only a game over
    resets the emulator. Put it above ``RecordEpisodeStatistics`` so that ``info["episode"]``
    still describes whole games. Single-stage presets do not need it: dying ends them anyway.
    """

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)
        self._lives: int | None = None
        self._game_over = True
        self._last: tuple[Any, dict[str, Any]] | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        if self._game_over or seed is not None or self._last is None:
            obs, info = self.env.reset(seed=seed, options=options)
            self._game_over = False
        else:
            obs, info = self._last
        self._lives = int(info.get("life", 0))
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._game_over = terminated or truncated
        lives = int(info.get("life", 0))
        # The life counter runs 2, 1, 0 and wraps to 255 at game over.
        lost = self._lives is not None and (lives < self._lives or (lives == 255 and self._lives != 255))
        self._lives = lives
        self._last = (obs, info)
        return obs, reward, terminated or lost, truncated, info


def make_mario(
    env_id: str = "SuperMarioBros-1-1-v0",
    *,
    actions: str | Sequence[Sequence[str]] = "simple",
    frame_skip: int = 4,
    grayscale: bool = True,
    resize: int | tuple[int, int] | None = 84,
    crop_top: int = 0,
    frame_stack: int = 4,
    reward_scale: float = 1 / 15,
    episodic_life: bool = False,
    max_episode_steps: int | None = 3000,
    noop_max: int = 0,
    sticky_prob: float = 0.0,
    stall_patience: int = 0,
    flag_bonus: float = 0.0,
    show_held_jump: bool = False,
    info_keys: Sequence[str] | None = INFO_KEYS,
    render_mode: str | None = None,
    stages: Sequence[str] | None = None,
    route_starts: dict[str, Sequence[int]] | None = None,
    route_start_prob: float = 0.5,
    route_start_windows: dict[str, tuple[int, int]] | None = None,
    retry_prob: float = 0.0,
    retry_back: int = 40,
) -> gym.Env:
    """Builds a preprocessed Super Mario Bros environment.

    Args:
        env_id: a gym-super-mario-bros id: ``SuperMarioBros-W-S-v0`` (a stage), ``SuperMarioBros-v0``
            (the whole game), ``SuperMarioBros2-W-S-v0`` / ``SuperMarioBros2-v0`` (Lost Levels).
        actions: ``"simple"`` (7 actions, default: it can jump over the tall pipes of 1-1 and
            back off, the set most published PPO Mario agents use), ``"right_only"`` (5, easiest
            to explore, but cannot back off), ``"complex"`` (12), or a list of button lists.
        frame_skip: frames per agent step; the observation is the max of the last two.
        grayscale: native nes-py luma (True) or RGB frames (False; the stack is then (3*k, H, W)).
        resize: side of the square output (84), an ``(height, width)`` pair, or None to keep 240x256.
        crop_top: rows removed from the top before resizing (32 removes the score bar); 0 keeps
            the bar, whose clock the agent may use.
        frame_stack: frames per observation (1 disables stacking; the frame then has no channel axis
            in grayscale mode).
        reward_scale: factor on the game's shaped reward (progress + clock + death + score/coins/
            power-ups + flag, clipped to [-15, 15] per frame); 1/15 keeps most steps in [-1, 1].
            ``info["episode"]["r"]`` stays in the game's units.
        episodic_life: end the learner's episode at every life loss (whole-game presets).
        max_episode_steps: truncate after this many agent steps (None: only the game ends it;
            a stage's 400-tick clock runs out after ~2400 agent steps with skip 4).
        noop_max: start episodes with 0..noop_max random no-op steps (evaluation; 0 = off).
        sticky_prob: per-frame probability of repeating the previous action (ALE v5 uses 0.25).
        stall_patience: cut an episode after this many agent steps without a new furthest x
            (:class:`TruncateWithoutProgress`; evaluation presets use it; 0 = off).
        flag_bonus: extra reward, in the game's units, on the step a flag is reached
            (:class:`FlagBonus`; training only; not in ``info["episode"]["r"]``; 0 = off).
        show_held_jump: draw whether A is held into the frame's top-left corner
            (:class:`ShowHeldJump`), so a policy can tell that its held jump will not jump again.
        info_keys: info keys to keep (None keeps gym-super-mario-bros' full info).
        render_mode: None, ``"rgb_array"`` (full-resolution RGB frames for videos) or ``"human"``.
        stages: play a stage drawn at random from this list at every episode, e.g.
            ``("1-1", "1-2", "1-3", "1-4")`` (:class:`RandomStage`); ``env_id`` then only says which
            game (Super Mario Bros.). None plays ``env_id``.
        route_starts: ``{"1-3": [action, ...]}``: start a share of the episodes part-way along these
            routes (:class:`RouteStarts`; training only). None starts every episode at the start.
        route_start_prob: the share of the episodes that start along a route.
        route_start_windows: ``{"1-3": (low, high)}``: the replayed prefix's length is drawn from
            ``low..high-1`` (default: the whole route; :meth:`RouteStarts.set_route_windows`).
        retry_prob: the share of the episodes that start shortly before where a recent episode of
            this env died (:class:`RouteStarts`' retries; training only; 0 = off).
        retry_back: the most agent steps before the death that a retry hands over.

    Returns:
        The wrapped env; observation ``Box(0, 255, (frame_stack, 84, 84), uint8)`` by default.
    """
    if not isinstance(env_id, str) or not env_id.startswith("SuperMarioBros"):
        raise ValueError(f"make_mario needs a gym-super-mario-bros id, got {env_id!r}")
    if not 0.0 <= float(sticky_prob) < 1.0:
        raise ValueError(f"sticky_prob must be in [0, 1), got {sticky_prob}")
    if not isinstance(show_held_jump, bool):
        raise TypeError(f"show_held_jump must be a bool, got {show_held_jump!r}")
    frame_stack = _require_int("frame_stack", frame_stack, 1)
    if max_episode_steps is not None:
        max_episode_steps = _require_int("max_episode_steps", max_episode_steps, 1)

    if stages is None:
        env = _per_frame_stack(
            env_id, actions, sticky_prob, frame_skip, grayscale, info_keys, render_mode, show_held_jump
        )
    else:
        if not env_id.startswith("SuperMarioBros-"):
            raise ValueError(f"stages work with Super Mario Bros. ids only, got {env_id!r}")
        stacks = [
            _per_frame_stack(
                f"SuperMarioBros-{world}-{stage}-v0",
                actions,
                sticky_prob,
                frame_skip,
                grayscale,
                info_keys,
                render_mode,
                show_held_jump,
            )
            for world, stage in parse_stages(stages)
        ]
        env = RandomStage(stacks, [str(label) for label in stages])
    env = RecordMarioProgress(env)
    if crop_top:
        env = CropObservation(env, top=crop_top)
    if resize is not None:
        shape = (resize, resize) if isinstance(resize, int) else tuple(resize)
        env = ResizeObservation(env, shape=shape)
    if frame_stack > 1:
        # (k, H, W) for grayscale frames: channel-first already. FrameStackObservation copies the
        # frames into a new array at every step, and each frame came from a new array.
        env = FrameStackObservation(env, stack_size=frame_stack)
        if not grayscale:
            env = MergeStackChannels(env)
    elif not grayscale:
        env = ChannelFirstObservation(env)
    if route_starts or retry_prob:
        env = RouteStarts(
            env, route_starts or {}, route_start_prob, route_start_windows, retry_prob, retry_back
        )
    if noop_max:
        # A route start or a retry hands over where Mario was, often in the air: no-ops there would
        # drop him mid-jump, so they apply to the episodes from the stage's start only.
        env = NoopResetEpisode(env, noop_max=noop_max, noop_action=0, skip_if=("route_start", "retry_start"))
    if max_episode_steps is not None:
        env = TimeLimit(env, max_episode_steps=max_episode_steps)
    if stall_patience:
        env = TruncateWithoutProgress(env, patience=stall_patience)
    env = RecordEpisodeStatistics(env)
    if flag_bonus:
        env = FlagBonus(env, flag_bonus)
    if episodic_life:
        env = TerminateOnLifeLoss(env)
    if reward_scale != 1:
        env = ScaleReward(env, scale=reward_scale)
    return env
