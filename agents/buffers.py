"""Replay memory for DQN on vector envs: every frame stored once, n-step returns and prioritized
sampling (Schaul et al. 2016) computed at sample time.

Layout. Each env ``i`` owns a circular timeline of ``slots_per_env`` slots. A slot holds one *frame*
(the newest frame of an observation; the whole observation when observations are not frame stacks)
and, when an action was taken from that observation, the transition fields (action, reward,
terminated, truncated). With k-frame stacks an episode of length L fills L + k slots::

    [pad_1 .. pad_{k-1}] [o_0] [o_1] ... [o_{L-1}] [o_L]
     first k-1 frames of  slots with an action       final obs (infos["final_obs"]), no action
     the reset stack

so the stack of an observation is simply the k slots that end at its own slot. Whatever the env's
frame stack puts in front of the first frame at reset (copies of it, zeros) is reproduced exactly,
no frame of a previous episode can leak into a stack, and sampling needs no boundary logic. The
final observation of an episode has its own slot, so a truncated episode bootstraps from its true
last state and an autoreset observation is never anybody's next observation.

A transition is *ready* (sampleable) when its k stack frames are still stored and its n-step window
is complete: every step up to n, or up to the episode's end if sooner, has been acted on. Readiness
is kept in a boolean array (and, for prioritized replay, as zero/non-zero leaves of a sum tree),
updated on each ``add``.

n-step target of the transition at slot t, with m = min(n, steps to the end of the episode):

    R = sum_{l < m} gamma^l r_{t+l},   discount = gamma^m * (1 - terminated),   next obs = obs at slot t+m

and the TD target is ``R + discount * Q_target(next_obs)``: a terminated episode does not bootstrap,
a truncated one bootstraps from its final observation.

Memory: 1M Mario transitions with (4, 84, 84) uint8 stacks take 1M * (84*84 + 12) bytes ~ 7.1 GB,
against 1M * 2 * 4*84*84 ~ 56 GB for Stable-Baselines3's ReplayBuffer, which stores obs and next_obs
stacks (see :func:`replay_memory_bytes`).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

# Bytes of the per-slot fields besides the frame: action (int32), reward (float32) and four flags.
_SLOT_FIELD_BYTES = 4 + 4 + 4
_SAVED_ARRAYS = ("frames", "actions", "rewards", "terminated", "truncated", "has_action", "ready", "count",
                 "cursor", "need_start")  # fmt: skip


class ReplaySample(NamedTuple):
    """A minibatch; ``returns`` and ``discounts`` already hold the n-step sums (see module doc)."""

    obs: np.ndarray  # (B, *obs_shape)
    actions: np.ndarray  # (B,) int64
    returns: np.ndarray  # (B,) float32, sum_{l<m} gamma^l r_{t+l}
    discounts: np.ndarray  # (B,) float32, gamma^m * (1 - terminated)
    next_obs: np.ndarray  # (B, *obs_shape), the obs m steps later (the final obs at an episode end)
    weights: np.ndarray  # (B,) float32 importance weights (all ones without prioritized replay)
    indices: np.ndarray  # (B,) int64 flat slot indices, for update_priorities


class SumTree:
    """Binary tree whose every node holds the sum of its two children; leaves are priorities.

    ``find`` maps a value in [0, total) to the leaf whose prefix-sum interval contains it, so drawing
    values uniformly samples leaves in proportion to their priority, in O(log n).
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"SumTree size must be >= 1, got {size}")
        self.size = size
        self.first_leaf = 1 << (size - 1).bit_length()  # leaves sit at [first_leaf, first_leaf + size)
        self.depth = self.first_leaf.bit_length() - 1
        self.nodes = np.zeros(2 * self.first_leaf, dtype=np.float64)  # nodes[1] is the root

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    @property
    def leaves(self) -> np.ndarray:
        return self.nodes[self.first_leaf : self.first_leaf + self.size]

    def set(self, index: np.ndarray, values: np.ndarray | float) -> None:
        """Sets leaves ``index`` to ``values`` and recomputes their ancestors (no drift from deltas)."""
        node = np.asarray(index, dtype=np.int64) + self.first_leaf
        if node.size == 0:
            return
        self.nodes[node] = values
        for _ in range(self.depth):
            node = np.unique(node >> 1)
            self.nodes[node] = self.nodes[2 * node] + self.nodes[2 * node + 1]

    def rebuild(self) -> None:
        """Recomputes every inner node from the leaves (after loading them)."""
        level = self.first_leaf
        while level > 1:
            parents = np.arange(level // 2, level)
            self.nodes[parents] = self.nodes[2 * parents] + self.nodes[2 * parents + 1]
            level //= 2

    def find(self, values: np.ndarray) -> np.ndarray:
        """Leaf index for each value in [0, total): descend left if value < left sum, else go right."""
        values = np.asarray(values, dtype=np.float64).copy()
        node = np.ones(values.shape, dtype=np.int64)
        for _ in range(self.depth):
            left = self.nodes[2 * node]
            go_right = values >= left
            values -= np.where(go_right, left, 0.0)
            node = 2 * node + go_right
        # Rounding can carry a value past the last real leaf into the zero padding: clamp it back.
        return np.minimum(node - self.first_leaf, self.size - 1)


class ReplayBuffer:
    """Circular replay memory for ``num_envs`` envs stepped together (a Gymnasium vector env).

    Args:
        capacity: Slots in all (rounded up to a multiple of num_envs). Each transition takes one slot,
            each episode k more (its first k - 1 stack frames and its final observation).
        num_envs: Envs whose steps arrive together in :meth:`add`.
        obs_shape: Shape of one observation, e.g. (4, 84, 84) or (4,).
        obs_dtype: Its dtype (uint8 frames are stored as uint8).
        frame_stack: k > 1 when observations are stacks of k frames along axis 0, newest last, each
            frame ``obs_shape[0] // k`` channels ((4, 84, 84) gray, (12, 84, 84) RGB); each frame is
            then stored once. 1 stores observations as they are.
        n_step: Steps summed into each target.
        gamma: Discount of the n-step return.
        prioritized: Proportional prioritized replay; else uniform.
        alpha: Priority exponent, P(i) = p_i^alpha / sum_j p_j^alpha.
        priority_eps: Added to |TD error| so that no transition gets probability 0.
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        obs_shape: tuple[int, ...],
        obs_dtype: np.dtype | type = np.float32,
        frame_stack: int = 1,
        n_step: int = 1,
        gamma: float = 0.99,
        prioritized: bool = False,
        alpha: float = 0.6,
        priority_eps: float = 1e-6,
    ) -> None:
        obs_shape = tuple(int(d) for d in obs_shape)
        if num_envs < 1 or n_step < 1 or frame_stack < 1:
            raise ValueError(
                f"num_envs, n_step and frame_stack must be >= 1, got {num_envs}, {n_step}, {frame_stack}"
            )
        if frame_stack > 1 and (len(obs_shape) < 2 or obs_shape[0] % frame_stack):
            raise ValueError(
                f"frame_stack={frame_stack} needs observations of shape ({frame_stack} * channels, ...), got {obs_shape}"
            )
        if not 0.0 <= gamma <= 1.0 or alpha < 0.0:
            raise ValueError(f"gamma must be in [0, 1] and alpha >= 0, got gamma={gamma}, alpha={alpha}")
        self.num_envs = num_envs
        self.slots_per_env = math.ceil(capacity / num_envs)
        minimum = 2 * (frame_stack + n_step) + 2
        if self.slots_per_env < minimum:
            raise ValueError(
                f"capacity {capacity} is too small: {num_envs} envs x frame_stack {frame_stack} and n_step {n_step} "
                f"need at least {minimum * num_envs} slots"
            )
        self.obs_shape = obs_shape
        self.obs_dtype = np.dtype(obs_dtype)
        self.frame_stack = frame_stack
        self.frame_shape = _frame_shape(obs_shape, frame_stack)
        self.frame_channels = self.frame_shape[0] if frame_stack > 1 else 0
        self.n_step = n_step
        self.gamma = gamma
        self.prioritized = prioritized
        self.alpha = alpha
        self.priority_eps = priority_eps

        shape = (num_envs, self.slots_per_env)
        self.frames = np.zeros((*shape, *self.frame_shape), dtype=self.obs_dtype)
        self.actions = np.zeros(shape, dtype=np.int32)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.terminated = np.zeros(shape, dtype=bool)
        self.truncated = np.zeros(shape, dtype=bool)
        self.has_action = np.zeros(shape, dtype=bool)  # an action was taken from this slot's observation
        self.ready = np.zeros(shape, dtype=bool)  # a sampleable transition starts at this slot

        self.count = np.zeros(num_envs, dtype=np.int64)  # slots ever written per env (next absolute slot)
        self.cursor = np.full(num_envs, -1, dtype=np.int64)  # absolute slot of each env's current obs
        self.need_start = np.ones(num_envs, dtype=bool)  # the next add() starts a new episode
        self.num_ready = 0
        self.added = 0  # transitions ever added
        self.max_priority = 1.0
        self.tree = SumTree(num_envs * self.slots_per_env) if prioritized else None

    # -----------------------------------------------------------------------------------------
    # Size
    # -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Transitions that can be sampled now."""
        return self.num_ready

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays this buffer allocated (what :func:`replay_memory_bytes` predicts)."""
        arrays = [getattr(self, name) for name in _SAVED_ARRAYS]
        return sum(a.nbytes for a in arrays) + (self.tree.nodes.nbytes if self.tree is not None else 0)

    # -----------------------------------------------------------------------------------------
    # Adding
    # -----------------------------------------------------------------------------------------

    def add(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        terminations: np.ndarray,
        truncations: np.ndarray,
    ) -> None:
        """Stores one vector step.

        Args:
            obs: (N, *obs_shape) observations the actions were taken from.
            next_obs: (N, *obs_shape) next observations; for an env whose episode ended at this step,
                its true last observation (``infos["final_obs"][i]`` under same-step autoreset), never
                the first observation of its next episode.
            actions, rewards, terminations, truncations: (N,) each.

        Raises:
            ValueError: shapes do not match, or the data do not form consecutive frame stacks
                (``next_obs[:, :-1] != obs[:, 1:]``, e.g. a reset observation passed as next_obs), or
                ``obs`` of a running episode is not the ``next_obs`` of the previous call.
        """
        n_envs, k, slots = self.num_envs, self.frame_stack, self.slots_per_env
        obs, next_obs = np.asarray(obs), np.asarray(next_obs)
        expected = (n_envs, *self.obs_shape)
        if obs.shape != expected or next_obs.shape != expected:
            raise ValueError(
                f"obs and next_obs must have shape {expected}, got {obs.shape} and {next_obs.shape}"
            )
        channels = self.frame_channels
        if k > 1 and not np.array_equal(next_obs[:, :-channels], obs[:, channels:]):
            raise ValueError(
                "next_obs is not obs shifted by one frame: pass infos['final_obs'] as next_obs for finished envs "
                "(not the reset observation), and frame_stack=1 for observations that are not frame stacks"
            )
        running = np.flatnonzero(~self.need_start)
        if running.size and not np.array_equal(
            self.frames[running, self.cursor[running] % slots], self._newest_frame(obs[running])
        ):
            raise ValueError(
                "obs does not continue the next_obs of the previous add() (call break_episodes() after a reset)"
            )

        # A new episode: store the whole stack of its first observation (k frames, padding included).
        for env in np.flatnonzero(self.need_start):
            first_frames = obs[env].reshape(k, *self.frame_shape)  # (k, *frame_shape)
            self._write(np.array([env]), first_frames[None])
            self.cursor[env] = self.count[env] - 1

        # The transition fields live in the slot of the observation the action was taken from.
        every_env = np.arange(n_envs)
        acted_slot = self.cursor.copy()
        position = acted_slot % slots
        self.actions[every_env, position] = actions
        self.rewards[every_env, position] = rewards
        self.terminated[every_env, position] = terminations
        self.truncated[every_env, position] = truncations
        self.has_action[every_env, position] = True
        self.added += n_envs

        # The next observation's newest frame: the next step's obs, or the episode's final obs.
        self._write(every_env, self._newest_frame(next_obs)[:, None])
        self.cursor[:] = self.count - 1
        self.need_start = np.logical_or(terminations, truncations).astype(bool)

        # Transitions whose n-step window includes the slot just acted on may have become complete.
        candidates = acted_slot[:, None] - np.arange(self.n_step)  # (N, n)
        self._mark_ready(np.repeat(every_env, self.n_step), candidates.ravel())

    def break_episodes(self) -> None:
        """Forgets the running episodes: the next :meth:`add` starts new ones (e.g. after a resume).

        Their last n - 1 transitions never become sampleable: their n-step windows stay incomplete.
        """
        self.need_start[:] = True

    def _newest_frame(self, obs: np.ndarray) -> np.ndarray:
        """(N, *obs_shape) -> (N, *frame_shape): the last frame_channels channels of a stack."""
        return obs[:, -self.frame_channels :] if self.frame_stack > 1 else obs

    def _write(self, env: np.ndarray, frames: np.ndarray) -> None:
        """Appends ``frames`` (M, j, *frame_shape) to the timelines of envs ``env`` (M,)."""
        slots, j = self.slots_per_env, frames.shape[1]
        rows = env[:, None]  # (M, 1): broadcasts against the (M, ...) position grids below
        first = self.count[env][:, None]
        written = (first + np.arange(j)) % slots  # (M, j)
        self.frames[rows, written] = frames
        self.has_action[rows, written] = False
        self.terminated[rows, written] = False
        self.truncated[rows, written] = False
        self.rewards[rows, written] = 0.0
        # Overwriting absolute slot c destroys the transition at c - S and the stacks of c - S + 1 ..
        # c - S + k - 1, i.e. positions c .. c + k - 1: none of them is ready any more.
        doomed = (first + np.arange(j + self.frame_stack - 1)) % slots  # (M, j + k - 1)
        self.num_ready -= int(np.count_nonzero(self.ready[rows, doomed]))
        self.ready[rows, doomed] = False
        if self.tree is not None:
            self.tree.set((rows * slots + doomed).ravel(), 0.0)
        self.count[env] += j

    def _complete(self, env: np.ndarray, slot: np.ndarray) -> np.ndarray:
        """Whether transitions starting at absolute slots ``slot`` (M,) of envs ``env`` can be sampled."""
        slots, k, n = self.slots_per_env, self.frame_stack, self.n_step
        count = self.count[env]
        # Its k stack frames are still stored (not overwritten by the circular buffer).
        stored = (slot >= 0) & (slot - k + 1 >= np.maximum(count - slots, 0))
        window = slot[:, None] + np.arange(n)  # (M, n) absolute slots of the n-step window
        position = window % slots
        acted = self.has_action[env[:, None], position] & (window < count[:, None])
        ended = (self.terminated[env[:, None], position] | self.truncated[env[:, None], position]) & acted
        alive = np.ones_like(acted)  # step l belongs to the episode: no end before it
        alive[:, 1:] = np.cumsum(ended[:, :-1], axis=1) == 0
        return stored & np.all(acted | ~alive, axis=1)

    def _mark_ready(self, env: np.ndarray, slot: np.ndarray) -> None:
        complete = self._complete(env, slot)
        env, position = env[complete], slot[complete] % self.slots_per_env
        new = ~self.ready[env, position]
        env, position = env[new], position[new]
        self.ready[env, position] = True
        self.num_ready += int(env.size)
        if self.tree is not None:
            # New transitions get the highest priority seen so far, so each is replayed at least once soon.
            self.tree.set(env * self.slots_per_env + position, self.max_priority**self.alpha)

    # -----------------------------------------------------------------------------------------
    # Sampling
    # -----------------------------------------------------------------------------------------

    def sample(self, batch_size: int, rng: np.random.Generator, beta: float = 1.0) -> ReplaySample:
        """Draws ``batch_size`` transitions (with replacement) and builds their n-step targets.

        Args:
            batch_size: Transitions to draw.
            rng: The numpy Generator of the run (checkpointed with it, so resumes replay the same draws).
            beta: Importance-sampling exponent of prioritized replay, w_i = (N P(i))^-beta / max_j w_j.
        """
        if self.num_ready == 0:
            raise ValueError("the replay buffer holds no complete transition yet")
        if self.tree is not None:
            flat, weights = self._sample_prioritized(batch_size, rng, beta)
        else:
            flat, weights = self._sample_uniform(batch_size, rng), np.ones(batch_size, dtype=np.float32)
        return self.transitions(flat, weights)

    def transitions(self, indices: np.ndarray, weights: np.ndarray | None = None) -> ReplaySample:
        """The ready transitions at flat slot ``indices`` (B,) with their n-step targets."""
        flat = np.asarray(indices, dtype=np.int64)
        if not np.all(self.ready.reshape(-1)[flat]):
            raise ValueError("transitions() was asked for slots that hold no complete transition")
        env, position = np.divmod(flat, self.slots_per_env)
        slot = self._absolute(env, position)

        # n-step window: rewards up to and including the first episode end.
        window = slot[:, None] + np.arange(self.n_step)  # (B, n)
        window_position = window % self.slots_per_env
        rewards = self.rewards[env[:, None], window_position]
        terminated = self.terminated[env[:, None], window_position]
        ended = terminated | self.truncated[env[:, None], window_position]
        alive = np.ones_like(ended)
        alive[:, 1:] = np.cumsum(ended[:, :-1], axis=1) == 0
        steps = alive.sum(axis=1)  # m = min(n, steps to the episode end)
        returns = (alive * self.gamma ** np.arange(self.n_step) * rewards).sum(axis=1)
        discounts = self.gamma**steps * ~np.any(alive & terminated, axis=1)
        return ReplaySample(
            obs=self._stack(env, slot),
            actions=self.actions[env, position].astype(np.int64),
            returns=returns.astype(np.float32),
            discounts=discounts.astype(np.float32),
            next_obs=self._stack(env, slot + steps),
            weights=np.ones(flat.size, dtype=np.float32) if weights is None else weights,
            indices=flat,
        )

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """Sets p_i = |TD error| + eps for the sampled transitions that are still stored."""
        if self.tree is None:
            raise ValueError("update_priorities needs a prioritized buffer")
        priorities = np.abs(np.asarray(td_errors, dtype=np.float64)) + self.priority_eps
        indices = np.asarray(indices, dtype=np.int64)
        still = self.ready.reshape(-1)[indices]
        self.max_priority = max(self.max_priority, float(priorities.max(initial=0.0)))
        self.tree.set(indices[still], priorities[still] ** self.alpha)

    def _sample_uniform(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Uniform over ready slots: draw among the filled slots of all envs and reject the unready."""
        filled = np.minimum(self.count, self.slots_per_env)
        ends = np.cumsum(filled)
        chosen: list[np.ndarray] = []
        needed = batch_size
        while needed > 0:
            draw = rng.integers(0, ends[-1], size=2 * needed + 8)
            env = np.searchsorted(ends, draw, side="right")
            position = draw - (ends[env] - filled[env])
            flat = env * self.slots_per_env + position
            flat = flat[self.ready[env, position]][:needed]
            chosen.append(flat)
            needed -= flat.size
        return np.concatenate(chosen)

    def _sample_prioritized(
        self, batch_size: int, rng: np.random.Generator, beta: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Proportional sampling, stratified: one draw in each of batch_size equal slices of the total."""
        assert self.tree is not None
        total = self.tree.total
        values = (np.arange(batch_size) + rng.random(batch_size)) * (total / batch_size)
        flat = self.tree.find(np.minimum(values, np.nextafter(total, 0.0)))
        # Rounding can land on an empty leaf at a slice border: redraw those anywhere.
        while np.any(empty := self.tree.leaves[flat] <= 0.0):
            flat[empty] = self.tree.find(rng.random(int(empty.sum())) * total)
        probabilities = self.tree.leaves[flat] / total
        weights = (self.num_ready * probabilities) ** -beta
        return flat, (weights / weights.max()).astype(np.float32)

    def _absolute(self, env: np.ndarray, position: np.ndarray) -> np.ndarray:
        """The absolute slot now stored at ``position``: the newest c < count with c = position mod S."""
        newest = self.count[env] - 1
        return newest - (newest - position) % self.slots_per_env

    def _stack(self, env: np.ndarray, slot: np.ndarray) -> np.ndarray:
        """Observations ending at absolute slots ``slot``: (B, *obs_shape)."""
        if self.frame_stack == 1:
            return self.frames[env, slot % self.slots_per_env]
        window = slot[:, None] + np.arange(1 - self.frame_stack, 1)  # (B, k), oldest first
        stacks = self.frames[env[:, None], window % self.slots_per_env]  # (B, k, c, H, W)
        return stacks.reshape(len(env), *self.obs_shape)

    # -----------------------------------------------------------------------------------------
    # Saving (optional part of a checkpoint)
    # -----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, step: int) -> None:
        """Writes the buffer to ``path`` (.npz, no pickle) atomically: temp file, fsync, rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                np.savez(file, **self._state(step))
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def load(self, path: str | os.PathLike) -> int:
        """Restores what :meth:`save` wrote into this (identically configured) buffer.

        Returns:
            The step the buffer was saved at.

        Raises:
            ValueError: the file is unreadable or belongs to a differently configured buffer.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                if "layout" not in data.files or not np.array_equal(data["layout"], self._layout()):
                    raise ValueError("it was written by a differently configured buffer")
                # One array at a time, so loading needs at most one extra copy of the largest array.
                for name in _SAVED_ARRAYS:
                    getattr(self, name)[...] = data[name]
                self.added = int(data["added"])
                self.max_priority = float(data["max_priority"])
                if self.tree is not None:
                    self.tree.leaves[...] = data["priorities"]
                    self.tree.rebuild()
                step = int(data["step"])
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot load replay buffer file {path}: {error}") from None
        self.num_ready = int(np.count_nonzero(self.ready))
        return step

    def _layout(self) -> np.ndarray:
        numbers = [self.num_envs, self.slots_per_env, self.frame_stack, self.n_step, int(self.prioritized),
                   *self.obs_shape, self.obs_dtype.num]  # fmt: skip
        return np.array(numbers, dtype=np.int64)

    def _state(self, step: int) -> dict[str, np.ndarray]:
        state = {name: getattr(self, name) for name in _SAVED_ARRAYS}
        state.update(
            layout=self._layout(),
            added=np.int64(self.added),
            max_priority=np.float64(self.max_priority),
            step=np.int64(step),
        )
        if self.tree is not None:
            state["priorities"] = self.tree.leaves
        return state


def replay_memory_bytes(
    capacity: int,
    obs_shape: tuple[int, ...],
    obs_dtype: np.dtype | type = np.uint8,
    num_envs: int = 1,
    frame_stack: int = 1,
    prioritized: bool = False,
) -> int:
    """Bytes a :class:`ReplayBuffer` with these settings allocates, computed without allocating it.

    For 1M Mario transitions, ``replay_memory_bytes(1_000_000, (4, 84, 84), np.uint8, 8, 4)`` is about
    7.07e9 bytes (one 84x84 frame plus 12 bytes per slot; each episode takes k slots more than its
    length). Stable-Baselines3's ReplayBuffer for the same data stores obs and next_obs stacks,
    1M * (2 * 4*84*84 + 20) ~ 5.65e10 bytes.
    """
    slots_per_env = math.ceil(capacity / num_envs)
    frame_shape = _frame_shape(tuple(obs_shape), frame_stack)
    frame_bytes = math.prod(frame_shape) * np.dtype(obs_dtype).itemsize
    total = num_envs * slots_per_env * (frame_bytes + _SLOT_FIELD_BYTES) + num_envs * (8 + 8 + 1)
    if prioritized:
        total += 2 * (1 << (num_envs * slots_per_env - 1).bit_length()) * 8
    return total


def _frame_shape(obs_shape: tuple[int, ...], frame_stack: int) -> tuple[int, ...]:
    """(k * c, H, W) stacks are stored as (c, H, W) frames; unstacked observations as they are."""
    return (obs_shape[0] // frame_stack, *obs_shape[1:]) if frame_stack > 1 else obs_shape
