"""Replay buffer: stacks rebuilt from single frames, n-step targets, prioritized sampling, memory.

The oracle is a real Gymnasium vector env (same-step autoreset, Gymnasium's FrameStackObservation)
whose every transition is also recorded naively; each transition's action is a unique id, so a
sampled transition can be looked up in that record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.wrappers import FrameStackObservation, TimeLimit, TransformObservation

from agents.buffers import ReplayBuffer, SumTree, replay_memory_bytes

GAMMA = 0.9


class TaggedFrames(gym.Env):
    """Frames that name their env, episode and step, plus noise; random rewards and episode ends."""

    def __init__(self, tag: int, channels: int = 0, vector: bool = False, end_prob: float = 0.15) -> None:
        self.tag, self.channels, self.vector, self.end_prob = tag, channels, vector, end_prob
        if vector:
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        else:
            shape = (channels, 3, 2) if channels else (3, 2)
            self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)
        self.action_space = gym.spaces.Discrete(2**31 - 1)  # actions are unique transition ids
        self.episode, self.t = -1, 0

    def _frame(self) -> np.ndarray:
        if self.vector:
            return np.array([self.tag, self.episode, self.t + self.np_random.random()], dtype=np.float32)
        frame = self.np_random.integers(0, 256, self.observation_space.shape, dtype=np.uint8)
        frame[..., 0, 0], frame[..., 0, 1], frame[..., 1, 0] = self.tag, self.episode % 256, self.t % 256
        return frame

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return self._frame(), {}

    def step(self, action):
        self.t += 1
        reward = float(self.np_random.normal())
        terminated = bool(self.np_random.random() < self.end_prob)
        return self._frame(), reward, terminated, False, {}


def make_vector_env(num_envs: int, kind: str, stack: int, seed: int = 0) -> SyncVectorEnv:
    def make(index: int) -> gym.Env:
        if kind == "vector":
            env = TaggedFrames(index, vector=True)
        elif kind == "rgb":  # (k, 2, 3, 2) -> (2k, 3, 2), like RGB Mario's (3k, H, W)
            env = FrameStackObservation(TaggedFrames(index, channels=2), stack)
            space = gym.spaces.Box(0, 255, (2 * stack, 3, 2), np.uint8)
            env = TransformObservation(env, lambda o: o.reshape(2 * stack, 3, 2), space)
        else:  # "reset" or "zero" padding of the first stack
            env = FrameStackObservation(TaggedFrames(index), stack, padding_type=kind)
        return TimeLimit(env, max_episode_steps=9)  # truncations as well as terminations

    env = SyncVectorEnv(
        [lambda i=i: make(i) for i in range(num_envs)], autoreset_mode=AutoresetMode.SAME_STEP
    )
    env.reset(seed=seed)
    return env


@dataclass
class Record:
    """Every transition of a run, as the env produced it."""

    by_id: dict[int, dict] = field(default_factory=dict)
    episodes: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (env, episode) -> ids
    ended: set[tuple[int, int]] = field(default_factory=set)
    slot: dict[int, int] = field(default_factory=dict)  # id -> absolute slot (layout oracle)
    slots_used: dict[int, int] = field(default_factory=dict)  # env -> slots written


def run(buffer: ReplayBuffer, env: SyncVectorEnv, steps: int, rng: np.random.Generator, check_every: int = 0):
    """Steps ``env`` with unique-id actions, adds everything to ``buffer`` and records it naively."""
    record = Record()
    obs, _ = env.reset(seed=int(rng.integers(1000)))
    episode = np.zeros(env.num_envs, dtype=int)
    starting = np.ones(env.num_envs, dtype=bool)
    next_id = 0
    for step in range(steps):
        ids = np.arange(next_id, next_id + env.num_envs)
        next_id += env.num_envs
        next_obs, rewards, terminations, truncations, infos = env.step(ids)
        real_next_obs = next_obs.copy()
        for i in np.flatnonzero(terminations | truncations):
            real_next_obs[i] = infos["final_obs"][i]
        buffer.add(obs, real_next_obs, ids, rewards, terminations, truncations)
        for i, transition_id in enumerate(ids):
            key = (i, int(episode[i]))
            record.episodes.setdefault(key, []).append(int(transition_id))
            used = record.slots_used.get(i, 0) + (buffer.frame_stack if starting[i] else 0)
            record.slot[int(transition_id)] = used - 1
            record.slots_used[i] = used + 1
            record.by_id[int(transition_id)] = dict(
                obs=obs[i].copy(), next_obs=real_next_obs[i].copy(), reset_obs=next_obs[i].copy(),
                reward=float(rewards[i]), terminated=bool(terminations[i]), truncated=bool(truncations[i]),
                key=key, t=len(record.episodes[key]) - 1,
            )  # fmt: skip
            if terminations[i] or truncations[i]:
                record.ended.add(key)
        starting = terminations | truncations
        episode += starting
        obs = next_obs
        if check_every and (step + 1) % check_every == 0:
            check_against_record(buffer, record)
    return record


def naive_target(record: Record, transition_id: int, n: int) -> dict | None:
    """The n-step target computed from the episode's list; None while the window is incomplete."""
    entry = record.by_id[transition_id]
    episode = record.episodes[entry["key"]]
    t = entry["t"]
    remaining = len(episode) - t
    if entry["key"] not in record.ended and remaining < n:
        return None
    m = min(n, remaining)
    window = [record.by_id[i] for i in episode[t : t + m]]
    terminated = window[-1]["terminated"] and t + m == len(episode)
    return dict(
        obs=entry["obs"],
        returns=sum(GAMMA**step * w["reward"] for step, w in enumerate(window)),
        discount=GAMMA**m * (not terminated),
        next_obs=window[-1]["next_obs"],
    )


def check_against_record(buffer: ReplayBuffer, record: Record) -> None:
    """Every ready slot rebuilds exactly the naive transition, and every stored complete one is ready."""
    ready = np.flatnonzero(buffer.ready)
    assert len(buffer) == ready.size
    batch = buffer.transitions(ready)
    for j, transition_id in enumerate(batch.actions):
        expected = naive_target(record, int(transition_id), buffer.n_step)
        assert expected is not None, "an incomplete n-step window was marked ready"
        np.testing.assert_array_equal(batch.obs[j], expected["obs"])
        np.testing.assert_array_equal(batch.next_obs[j], expected["next_obs"])
        assert batch.returns[j] == pytest.approx(expected["returns"], abs=1e-5)
        assert batch.discounts[j] == pytest.approx(expected["discount"], abs=1e-6)
    # Layout oracle: a transition is still stored when its whole stack is within the last S slots.
    stored_complete = {
        transition_id
        for transition_id, slot in record.slot.items()
        if slot - buffer.frame_stack + 1
        >= record.slots_used[record.by_id[transition_id]["key"][0]] - buffer.slots_per_env
        and naive_target(record, transition_id, buffer.n_step) is not None
    }
    assert set(batch.actions.tolist()) == stored_complete


@pytest.mark.parametrize(
    ("kind", "stack", "n_step"),
    [("reset", 4, 1), ("reset", 4, 3), ("zero", 4, 3), ("rgb", 3, 2), ("vector", 1, 1), ("vector", 1, 4)],
)
def test_stacks_and_n_step_targets_match_the_env_across_episodes_and_wraparound(kind, stack, n_step):
    num_envs = 3
    env = make_vector_env(num_envs, kind, stack)
    obs_space = env.single_observation_space
    buffer = ReplayBuffer(
        capacity=num_envs * 40, num_envs=num_envs, obs_shape=obs_space.shape, obs_dtype=obs_space.dtype,
        frame_stack=stack, n_step=n_step, gamma=GAMMA,
    )  # fmt: skip
    record = run(buffer, env, steps=300, rng=np.random.default_rng(0), check_every=23)
    check_against_record(buffer, record)
    assert buffer.count.min() > 3 * buffer.slots_per_env, "the test must wrap around the buffer several times"
    assert any(r["truncated"] for r in record.by_id.values()) and any(
        r["terminated"] for r in record.by_id.values()
    )


def test_frames_are_stored_once():
    env = make_vector_env(2, "reset", 4)
    buffer = ReplayBuffer(200, 2, (4, 3, 2), np.uint8, frame_stack=4)
    run(buffer, env, steps=20, rng=np.random.default_rng(1))
    assert buffer.frames.shape == (2, 100, 1, 3, 2)  # one (1, 3, 2) frame per slot, not a (4, 3, 2) stack


def test_next_obs_of_an_episode_end_is_the_final_obs_never_the_autoreset_obs():
    env = make_vector_env(2, "reset", 4)
    buffer = ReplayBuffer(2 * 500, 2, (4, 3, 2), np.uint8, frame_stack=4)
    record = run(buffer, env, steps=150, rng=np.random.default_rng(2))
    batch = buffer.transitions(np.flatnonzero(buffer.ready))
    ends = 0
    for j, transition_id in enumerate(batch.actions):
        entry = record.by_id[int(transition_id)]
        if entry["terminated"] or entry["truncated"]:
            ends += 1
            np.testing.assert_array_equal(batch.next_obs[j], entry["next_obs"])
            assert not np.array_equal(batch.next_obs[j], entry["reset_obs"])
            assert batch.next_obs[j][-1, 0, 1] == entry["obs"][-1, 0, 1]  # the frames name the same episode
    assert ends > 10


def test_an_autoreset_obs_passed_as_next_obs_is_refused():
    env = make_vector_env(1, "reset", 4)
    buffer = ReplayBuffer(100, 1, (4, 3, 2), np.uint8, frame_stack=4)
    obs, _ = env.reset(seed=0)
    while True:
        next_obs, rewards, terminations, truncations, _ = env.step(np.array([0]))
        if terminations[0] or truncations[0]:
            with pytest.raises(ValueError, match="final_obs"):
                buffer.add(obs, next_obs, np.array([0]), rewards, terminations, truncations)  # the reset obs
            break
        buffer.add(obs, next_obs, np.array([0]), rewards, terminations, truncations)
        obs = next_obs


def test_obs_that_does_not_continue_the_previous_step_is_refused():
    buffer = ReplayBuffer(100, 1, (3,), np.float32)
    zeros, ones = np.zeros((1, 3), np.float32), np.ones((1, 3), np.float32)
    no = np.zeros(1, dtype=bool)
    buffer.add(zeros, ones, np.array([0]), np.array([1.0]), no, no)
    with pytest.raises(ValueError, match="continue"):
        buffer.add(zeros, ones, np.array([0]), np.array([1.0]), no, no)


def test_break_episodes_orphans_the_incomplete_windows():
    buffer = ReplayBuffer(100, 1, (1,), np.float32, n_step=3)
    no = np.zeros(1, dtype=bool)
    for t in range(5):
        buffer.add(
            np.array([[t]], np.float32), np.array([[t + 1]], np.float32), np.array([t]), np.ones(1), no, no
        )
    assert len(buffer) == 3  # t = 0, 1, 2 have their 3 steps; 3 and 4 wait for theirs
    buffer.break_episodes()  # e.g. a resume: the envs were reset mid-episode
    for t in range(10, 16):
        buffer.add(
            np.array([[t]], np.float32), np.array([[t + 1]], np.float32), np.array([t]), np.ones(1), no, no
        )
    batch = buffer.transitions(np.flatnonzero(buffer.ready))
    assert sorted(batch.actions.tolist()) == [0, 1, 2, 10, 11, 12, 13]
    np.testing.assert_allclose(batch.next_obs[:, 0], batch.obs[:, 0] + 3)  # never across the break


def test_uniform_sampling_covers_ready_transitions_evenly():
    env = make_vector_env(2, "vector", 1)
    buffer = ReplayBuffer(2 * 60, 2, (3,), np.float32)
    run(buffer, env, steps=100, rng=np.random.default_rng(3))
    rng = np.random.default_rng(0)
    counts = np.zeros(buffer.ready.size)
    for _ in range(400):
        batch = buffer.sample(64, rng)
        assert np.all(batch.weights == 1.0)
        np.add.at(counts, batch.indices, 1)
    ready = buffer.ready.reshape(-1)
    assert counts[~ready].sum() == 0
    expected = counts.sum() / ready.sum()
    assert np.all(np.abs(counts[ready] - expected) < 6 * np.sqrt(expected))


def test_sum_tree_samples_in_proportion_to_priorities():
    tree = SumTree(11)  # not a power of two: padding leaves must never be drawn
    priorities = np.array([0.0, 1.0, 2.0, 0.0, 4.0, 0.5, 0.5, 3.0, 0.0, 1.0, 8.0])
    tree.set(np.arange(11), priorities)
    assert tree.total == pytest.approx(priorities.sum())
    tree.set(np.array([3, 10]), np.array([2.0, 6.0]))  # updates keep every ancestor exact
    priorities[[3, 10]] = 2.0, 6.0
    assert tree.total == pytest.approx(priorities.sum())
    values = np.random.default_rng(0).random(200_000) * tree.total
    counts = np.bincount(tree.find(values), minlength=11)
    expected = priorities / priorities.sum() * values.size
    assert np.all(counts[priorities == 0] == 0)
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 1)


def test_sum_tree_of_one_leaf():
    tree = SumTree(1)
    tree.set(np.array([0]), np.array([2.5]))
    assert tree.total == 2.5 and tree.find(np.array([0.0, 2.4])).tolist() == [0, 0]


def test_prioritized_sampling_weights_and_updates():
    alpha, beta = 0.7, 0.5
    buffer = ReplayBuffer(64, 1, (1,), np.float32, prioritized=True, alpha=alpha)
    no = np.zeros(1, dtype=bool)
    for t in range(20):
        buffer.add(
            np.array([[t]], np.float32), np.array([[t + 1]], np.float32), np.array([t]), np.zeros(1), no, no
        )
    ready = np.flatnonzero(buffer.ready)
    assert np.all(buffer.tree.leaves[ready] == 1.0)  # new transitions at the max priority (1 at first)
    td_errors = np.arange(1, 21, dtype=np.float64)
    buffer.update_priorities(ready, td_errors)
    assert buffer.max_priority == pytest.approx(20 + buffer.priority_eps)
    rng = np.random.default_rng(0)
    counts = np.zeros(buffer.ready.size)
    for _ in range(2000):
        batch = buffer.sample(32, rng, beta=beta)
        np.add.at(counts, batch.indices, 1)
        probabilities = buffer.tree.leaves[batch.indices] / buffer.tree.total
        weights = (len(buffer) * probabilities) ** -beta
        np.testing.assert_allclose(batch.weights, weights / weights.max(), rtol=1e-5)
    p = (td_errors + buffer.priority_eps) ** alpha
    expected = p / p.sum() * counts.sum()
    assert np.all(np.abs(counts[ready] - expected) < 5 * np.sqrt(expected))
    # A new transition enters at the max priority seen so far.
    buffer.add(
        np.array([[20]], np.float32), np.array([[21]], np.float32), np.array([20]), np.zeros(1), no, no
    )
    newest = np.flatnonzero(buffer.actions.reshape(-1) == 20)[0]
    assert buffer.tree.leaves[newest] == pytest.approx((20 + buffer.priority_eps) ** alpha)


def test_prioritized_leaves_follow_readiness_through_wraparound():
    env = make_vector_env(2, "reset", 4)
    buffer = ReplayBuffer(
        2 * 30, 2, (4, 3, 2), np.uint8, frame_stack=4, n_step=3, gamma=GAMMA, prioritized=True
    )
    rng = np.random.default_rng(4)
    record = run(buffer, env, steps=120, rng=rng)
    np.testing.assert_array_equal(buffer.tree.leaves > 0, buffer.ready.reshape(-1))
    batch = buffer.sample(256, rng, beta=0.4)
    for j, transition_id in enumerate(batch.actions):
        expected = naive_target(record, int(transition_id), buffer.n_step)
        np.testing.assert_array_equal(batch.next_obs[j], expected["next_obs"])


def test_save_and_load_restore_the_same_samples(tmp_path):
    env = make_vector_env(2, "reset", 4)
    settings = dict(capacity=2 * 50, num_envs=2, obs_shape=(4, 3, 2), obs_dtype=np.uint8, frame_stack=4,
                    n_step=2, gamma=GAMMA, prioritized=True)  # fmt: skip
    buffer = ReplayBuffer(**settings)
    run(buffer, env, steps=80, rng=np.random.default_rng(5))
    buffer.update_priorities(np.flatnonzero(buffer.ready)[:10], np.arange(10.0))
    buffer.save(tmp_path / "replay.npz", step=160)
    restored = ReplayBuffer(**settings)
    assert restored.load(tmp_path / "replay.npz") == 160
    assert len(restored) == len(buffer) and restored.added == buffer.added
    a, b = (
        buffer.sample(64, np.random.default_rng(9), 0.5),
        restored.sample(64, np.random.default_rng(9), 0.5),
    )
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    other = ReplayBuffer(**{**settings, "n_step": 3})
    with pytest.raises(ValueError, match="differently configured"):
        other.load(tmp_path / "replay.npz")


@pytest.mark.parametrize(
    ("capacity", "obs_shape", "dtype", "num_envs", "stack", "prioritized"),
    [
        (1000, (4, 84, 84), np.uint8, 8, 4, False),
        (999, (12, 8, 8), np.uint8, 4, 4, True),
        (500, (4,), np.float32, 1, 1, True),
    ],
)
def test_memory_bytes_formula_matches_the_allocation(
    capacity, obs_shape, dtype, num_envs, stack, prioritized
):
    buffer = ReplayBuffer(capacity, num_envs, obs_shape, dtype, frame_stack=stack, prioritized=prioritized)
    assert replay_memory_bytes(capacity, obs_shape, dtype, num_envs, stack, prioritized) == buffer.nbytes


def test_a_million_mario_transitions_take_under_a_quarter_of_sb3s_buffer():
    from stable_baselines3.common.buffers import ReplayBuffer as SB3ReplayBuffer

    obs_space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    sb3 = SB3ReplayBuffer(1000, obs_space, gym.spaces.Discrete(7), device="cpu", n_envs=1)
    sb3_bytes_per_transition = (
        sum(
            a.nbytes
            for a in (
                sb3.observations,
                sb3.next_observations,
                sb3.actions,
                sb3.rewards,
                sb3.dones,
                sb3.timeouts,
            )
        )
        / 1000
    )
    ours = replay_memory_bytes(1_000_000, (4, 84, 84), np.uint8, num_envs=8, frame_stack=4)
    sb3_total = 1_000_000 * sb3_bytes_per_transition
    assert ours < 7.1e9 and sb3_total > 5.6e10
    assert ours <= sb3_total / 4
