"""envs/: presets, wrappers, the T-maze, vector envs (sync and async), seeding. Mario has its own file."""

from __future__ import annotations

import dataclasses
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.gridworld import CELL_FEATURES, MiniGridTMazeEnv, OneHotGridObservation, TMazeEnv
from envs.vector import SubprocVectorEnv, merge_infos
from envs.wrappers import CropObservation, FilterInfo, NoopResetEpisode, OneHotObservation, ScaleReward

NON_MARIO = [name for name in envs.names() if envs.get_preset(name).kind != "mario"]
PPO_FIELDS = {"total_steps", "num_envs", "num_steps", "learning_rate", "gamma", "gae_lambda", "num_minibatches",
              "update_epochs", "clip_coef", "ent_coef", "vf_coef", "max_grad_norm", "anneal_lr", "net"}  # fmt: skip
DQN_FIELDS = {"total_steps", "num_envs", "buffer_size", "learning_rate", "gamma", "batch_size", "learning_starts",
              "train_frequency", "target_network_frequency", "tau", "exploration_fraction", "start_e", "end_e",
              "n_step", "double", "dueling", "prioritized", "net"}  # fmt: skip


def checked(env: gym.Env) -> None:
    """Gymnasium's env checker; any warning other than "this env is wrapped" fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    problems = [str(w.message) for w in caught if "different from the unwrapped" not in str(w.message)]
    # CartPole declares an unbounded Box; the checker's remark about infinities is not our doing.
    problems = [p for p in problems if "infinity" not in p]
    assert not problems, problems


# -- the registry ---------------------------------------------------------------------------------


def test_names_cover_every_mario_stage_and_the_other_families():
    names = envs.names()
    for world in range(1, 9):
        for stage in range(1, 5):
            assert f"mario-{world}-{stage}" in names
    for name in ["mario", "lost-levels", "lost-levels-1-1", "lost-levels-D-4", "cartpole", "acrobot",
                 "mountaincar", "lunarlander", "tmaze", "minigrid-tmaze", "minigrid-memory-s7"]:  # fmt: skip
        assert name in names
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", envs.names())
def test_every_preset_is_complete(name):
    preset = envs.get_preset(name)
    assert preset.name == name and preset.kind in ("mario", "classic", "minigrid", "gym")
    assert preset.env_id in gym.registry, preset.env_id
    # The agreed names at least; the agents' owner may add more fields of their configs.
    assert set(preset.ppo) >= PPO_FIELDS, PPO_FIELDS - set(preset.ppo)
    assert set(preset.dqn) >= DQN_FIELDS, DQN_FIELDS - set(preset.dqn)
    assert preset.dqn["net"] in ("mlp", "nature", "impala")  # DQN needs a feed-forward encoder
    assert preset.net and preset.description


def test_get_preset_returns_a_copy():
    preset = envs.get_preset("cartpole")
    learning_rate = preset.ppo["learning_rate"]
    preset.ppo["learning_rate"] = 123.0
    assert envs.get_preset("cartpole").ppo["learning_rate"] == learning_rate
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.name = "other"  # type: ignore[misc]


def test_resolve_builds_presets_for_registered_ids():
    assert envs.resolve("CartPole-v1").name == "cartpole"  # an id that a preset wraps
    assert envs.resolve("SuperMarioBros-2-3-v0").name == "mario-2-3"
    frozen = envs.resolve("FrozenLake-v1")
    assert frozen.kind == "gym" and frozen.env_id == "FrozenLake-v1"
    assert envs.resolve("MiniGrid-MemoryS11-v0").kind == "minigrid"
    assert envs.resolve("Mario-1-1").name == "mario-1-1"  # case-insensitive


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("mario-1-5", "mario-1-4"),
        ("cartpol", "cartpole"),
        ("Cartpole-v1", "CartPole-v1"),
        ("lunarlandr", "lunarlander"),
    ],
)
def test_unknown_names_suggest_close_matches(name, suggestion):
    with pytest.raises(ValueError, match="unknown env") as error:
        envs.resolve(name)
    assert repr(suggestion) in str(error.value) and "lab list envs" in str(error.value)


def test_continuous_action_spaces_are_refused():
    with pytest.raises(ValueError, match="Discrete"):
        envs.resolve("Pendulum-v1")


def test_eval_overrides_randomise_mario_starts_only():
    assert envs.eval_overrides("mario-1-1") == {"noop_max": 30, "stall_patience": 200}
    assert envs.eval_overrides("cartpole") == {}


# -- single envs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NON_MARIO + ["FrozenLake-v1"])
def test_env_checker_passes(name):
    env = envs.make(name)
    checked(env)
    env.close()


@pytest.mark.parametrize("name", NON_MARIO)
def test_observations_stay_in_the_space(name):
    env = envs.make(name)
    obs, _ = env.reset(seed=3)
    env.action_space.seed(3)
    assert obs in env.observation_space
    for _ in range(300):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert obs in env.observation_space, obs
        assert np.isfinite(reward)
        if terminated or truncated:
            assert set(info["episode"]) >= {"r", "l"}
            obs, _ = env.reset()
            assert obs in env.observation_space
    env.close()


def test_classic_overrides_reach_gym_make():
    env = envs.make("cartpole", max_episode_steps=7)
    env.reset(seed=0)
    steps, truncated = 0, False
    while not truncated:
        _, _, terminated, truncated, _ = env.step(steps % 2)  # alternate: the pole stays up for 7 steps
        steps += 1
        assert not terminated
    assert steps == 7


# -- memory tasks ---------------------------------------------------------------------------------


def test_tmaze_shows_the_cue_only_on_the_first_step_and_rewards_memory():
    env = TMazeEnv(corridor_length=4)
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        cue = info["cue"]
        assert obs[cue] == 1 and obs[1 - cue] == 0 and obs[2] == 0
        seen = []
        for _ in range(4):
            obs, reward, terminated, truncated, _ = env.step(TMazeEnv.EAST)
            seen.append(obs.copy())
            assert reward == 0 and not terminated and not truncated
        assert all(not o[:2].any() for o in seen), "the cue must be invisible after the first step"
        assert seen[-1][2] == 1 and not any(o[2] for o in seen[:-1])
        # A policy that remembers the cue always wins, with MiniGrid's reward for 5 steps.
        _, reward, terminated, _, info = env.step(TMazeEnv.UP if cue == 0 else TMazeEnv.DOWN)
        assert terminated and info["success"]
        assert reward == pytest.approx(1 - 0.9 * 5 / env.max_steps)


def test_tmaze_caps_a_memoryless_policy_at_chance():
    # Any feed-forward policy sees the same observation at the junction whatever the cue was, so
    # "always up" is as good as any: it wins about half the episodes. A wrong turn earns 0.
    env = TMazeEnv(corridor_length=3)
    wins = 0
    for seed in range(400):
        env.reset(seed=seed)
        for _ in range(3):
            env.step(TMazeEnv.EAST)
        _, reward, terminated, _, info = env.step(TMazeEnv.UP)
        assert terminated and (reward > 0) == info["success"] and reward >= 0
        wins += info["success"]
    assert 0.4 < wins / 400 < 0.6


def test_tmaze_truncates_and_validates():
    env = TMazeEnv(corridor_length=2, max_steps=5)
    env.reset(seed=0)
    for step in range(5):
        _, reward, terminated, truncated, info = env.step(TMazeEnv.WEST)  # bumps into the start wall
        assert not terminated and truncated == (step == 4) and reward == 0
    assert info["success"] is False  # waiting for the time-out earns 0, less than guessing
    with pytest.raises(ValueError):
        TMazeEnv(corridor_length=0)
    with pytest.raises(ValueError):
        env.step(7)
    assert envs.make("tmaze", corridor_length=11).unwrapped.corridor_length == 11


def test_tmaze_renders_a_picture():
    env = envs.make("tmaze", render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3


KEY, BALL = 5, 6  # MiniGrid object indices
FORWARD, LEFT = 2, 0  # MiniGrid actions


def _walk_to_the_split(env: gym.Env, seed: int) -> tuple[int, list[np.ndarray]]:
    """Resets, walks the hallway to the split, looks all round: (cue object index, observations)."""
    obs, _ = env.reset(seed=seed)
    cue = env.unwrapped.grid.get(1, env.unwrapped.height // 2 - 1).type
    seen = [obs]
    for action in [FORWARD] * 4 + [LEFT] * 4:
        obs, reward, terminated, truncated, _ = env.step(action)
        assert reward == 0 and not terminated and not truncated
        seen.append(obs)
    return {"key": KEY, "ball": BALL}[cue], seen


def test_minigrid_tmaze_shows_the_cue_on_the_first_step_only():
    env = envs.make("minigrid-tmaze", flatten=False)  # (20, 3, 3) one-hot cells
    assert env.observation_space.shape == (CELL_FEATURES, 3, 3)
    cues, later = {}, {}
    for seed in range(40):
        cue, seen = _walk_to_the_split(env, seed)
        # The agent starts at the west end facing east; the cue is the cell on its left.
        assert tuple(env.unwrapped.agent_pos) == (5, 3)
        # MiniGrid's view is indexed (x, y), the agent at (1, 2): the cue is at (0, 2), on its left.
        assert seen[0][:11, 0, 2].argmax() == cue
        cues[cue] = seen[0]
        later.setdefault(cue, []).append(np.stack(seen[1:]))
    assert set(cues) == {KEY, BALL}, "both cues must occur"
    # Every later observation, in the hallway and looking all round at the split, is the same
    # whatever the cue: a memoryless policy cannot tell the cue at the split (the ends are fixed).
    first_key, first_ball = later[KEY][0], later[BALL][0]
    assert all(np.array_equal(walk, first_key) for walk in later[KEY] + later[BALL])
    assert np.array_equal(first_key, first_ball)


@pytest.mark.parametrize("shuffle_ends", [False, True])
def test_minigrid_tmaze_rewards_the_object_that_matches_the_cue(shuffle_ends):
    env = envs.make("minigrid-tmaze", shuffle_ends=shuffle_ends)
    north_objects, wins, guesses = set(), 0, 0
    for seed in range(60):
        for remember in (True, False):
            obs, _ = env.reset(seed=seed)
            grid = env.unwrapped.grid
            cue, north = grid.get(1, 2).type, grid.get(5, 1).type
            north_objects.add(north)
            for action in [FORWARD] * 4 + [LEFT]:  # to the split, then face north
                obs, reward, terminated, truncated, info = env.step(action)
            if remember and north != cue:
                env.step(LEFT)
                env.step(LEFT)  # face south
            obs, reward, terminated, truncated, info = env.step(FORWARD)
            assert terminated and not truncated and info["success"] == (reward > 0)
            if remember:
                wins += info["success"]
                assert reward == pytest.approx(1 - 0.9 * (8 if north != cue else 6) / env.unwrapped.max_steps)
            else:  # "always north": a guess
                guesses += info["success"]
    assert north_objects == ({"key", "ball"} if shuffle_ends else {"key"})
    assert wins == 60 and 0.3 < guesses / 60 < 0.7


def test_minigrid_tmaze_validates_its_arguments():
    for kwargs in [{"size": 5}, {"size": 8}, {"agent_view_size": 4}, {"size": 9, "agent_view_size": 7}]:
        with pytest.raises(ValueError):
            MiniGridTMazeEnv(**kwargs)
    with pytest.raises(TypeError):
        MiniGridTMazeEnv(shuffle_ends=1)
    # Larger mazes and views work as long as the cue stays out of view from the split.
    env = envs.make("minigrid-tmaze", size=11, agent_view_size=7)
    assert env.reset(seed=0)[0].shape == (7 * 7 * CELL_FEATURES + 4,)


def test_minigrid_observation_is_a_flat_one_hot_vector():
    env = envs.make("minigrid-memory-s7")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (7 * 7 * CELL_FEATURES + 4,) and obs.dtype == np.float32
    cells = obs[:-4].reshape(7, 7, CELL_FEATURES)
    # Each cell has exactly one object type, one colour and one state.
    np.testing.assert_array_equal(cells.sum(axis=-1), 3.0)
    assert obs[-4:].sum() == 1.0
    # The encoding matches MiniGrid's raw indices.
    raw = env.unwrapped.gen_obs()["image"]
    np.testing.assert_array_equal(cells[..., :11].argmax(-1), raw[..., 0])
    np.testing.assert_array_equal(cells[..., 11:17].argmax(-1), raw[..., 1])
    grid = envs.make("minigrid-memory-s7", flatten=False)
    assert grid.observation_space.shape == (CELL_FEATURES, 7, 7)
    assert grid.reset(seed=0)[0] in grid.observation_space


def test_one_hot_grid_needs_a_minigrid_space():
    with pytest.raises(ValueError, match="MiniGrid"):
        OneHotGridObservation(gym.make("CartPole-v1"))


# -- generic wrappers ------------------------------------------------------------------------------


class _ImageEnv(gym.Env):
    """A tiny deterministic image env for the wrapper tests."""

    observation_space = gym.spaces.Box(0, 255, (10, 12), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.full((10, 12), 0, np.uint8), {"t": 0, "noise": "x"}

    def step(self, action):
        self.t += 1
        obs = np.arange(120, dtype=np.uint8).reshape(10, 12) + self.t
        return obs, 1.5, self.t >= 50, False, {"t": self.t, "noise": "x"}


def test_crop_observation():
    env = CropObservation(_ImageEnv(), top=2, bottom=1, left=3, right=0)
    assert env.observation_space.shape == (7, 9)
    env.reset(seed=0)
    obs, *_ = env.step(0)
    np.testing.assert_array_equal(obs, (np.arange(120, dtype=np.uint8).reshape(10, 12) + 1)[2:9, 3:])
    assert obs in env.observation_space
    with pytest.raises(ValueError, match="leaves nothing"):
        CropObservation(_ImageEnv(), top=5, bottom=5)
    with pytest.raises(ValueError):
        CropObservation(_ImageEnv(), top=-1)
    with pytest.raises(TypeError):
        CropObservation(_ImageEnv(), top=1.5)


def test_scale_reward_and_filter_info():
    env = FilterInfo(ScaleReward(_ImageEnv(), scale=0.5), keys=("t",))
    _, info = env.reset(seed=0)
    assert info == {"t": 0}
    _, reward, _, _, info = env.step(0)
    assert reward == 0.75 and info == {"t": 1}
    with pytest.raises(ValueError):
        ScaleReward(_ImageEnv(), scale=0)
    with pytest.raises(KeyError, match="available"):
        FilterInfo(_ImageEnv(), keys=("missing",)).reset()


def test_noop_reset_is_random_but_seeded():
    def start(seed: int) -> int:
        env = NoopResetEpisode(_ImageEnv(), noop_max=30)
        _, info = env.reset(seed=seed)
        return info["t"]

    starts = [start(seed) for seed in range(12)]
    assert len(set(starts)) > 3 and all(0 <= s <= 30 for s in starts)
    assert starts == [start(seed) for seed in range(12)]
    with pytest.raises(ValueError):
        NoopResetEpisode(_ImageEnv(), noop_max=3, noop_action=5)


def test_one_hot_observation():
    env = OneHotObservation(gym.make("FrozenLake-v1"))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (16,) and obs.sum() == 1 and obs[0] == 1
    with pytest.raises(ValueError):
        OneHotObservation(gym.make("CartPole-v1"))


# -- vector envs ----------------------------------------------------------------------------------


def test_merge_infos_matches_gymnasium():
    class Reference:
        num_envs = 4
        _add_info = gym.vector.VectorEnv._add_info

    infos = [
        {
            "a": 1,
            "b": 2.0,
            "c": np.int64(3),
            "final_obs": np.zeros(2),
            "final_info": {"episode": {"r": 1.0, "l": 3}},
        },
        {"a": 2, "b": 3.0, "c": np.int64(4), "s": "text"},
        {"a": 3, "b": np.float32(1), "c": np.int64(4), "v": np.ones(3)},
        {},
    ]
    expected: dict = {}
    for index, info in enumerate(infos):
        expected = Reference()._add_info(expected, info, index)
    got = merge_infos(infos, 4)

    def compare(a: dict, b: dict) -> None:
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], dict):
                compare(a[key], b[key])
            else:
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
                assert all(x is y or np.array_equal(x, y) for x, y in zip(a[key], b[key], strict=True)), key

    compare(expected, got)


@pytest.mark.parametrize("backend", ["sync", "async"])
def test_vector_env_autoresets_in_the_same_step(backend):
    vec = envs.make_vec("cartpole", 3, seed=0, backend=backend)
    assert vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (3, 4) and obs in vec.observation_space
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(300):
        obs, rewards, terminations, truncations, infos = vec.step(rng.integers(0, 2, 3))
        assert obs in vec.observation_space
        assert np.all(rewards == 1.0)  # CartPole pays 1 a step: never the 0 of a reset transition
        done = terminations | truncations
        if done.any():
            assert np.array_equal(infos["_final_obs"], done) and np.array_equal(infos["_final_info"], done)
            episode = infos["final_info"]["episode"]
            for index in np.flatnonzero(done):
                ended += 1
                final = infos["final_obs"][index]
                assert final.shape == (4,) and not np.array_equal(final, obs[index])
                assert np.all(np.abs(obs[index]) <= 0.05), "obs after the end must be a reset obs"
                assert (
                    episode["_r"][index]
                    and episode["l"][index] >= 1
                    and episode["r"][index] == episode["l"][index]
                )
    assert ended >= 5
    vec.close()


def _first_observations(
    name: str, backend: str, steps: int, seed: int = 7, num_envs: int = 2, **overrides
) -> np.ndarray:
    vec = envs.make_vec(name, num_envs, seed=seed, backend=backend, **overrides)
    rng = np.random.default_rng(7)
    observations = [vec.reset(seed=seed)[0]]
    for _ in range(steps - 1):
        observations.append(vec.step(rng.integers(0, vec.single_action_space.n, num_envs))[0])
    vec.close()
    return np.stack(observations)


@pytest.mark.parametrize("backend", ["sync", "async"])
@pytest.mark.parametrize("name", ["cartpole", "tmaze", "minigrid-memory-s7"])
def test_same_seed_replays_the_same_observations(name, backend):
    first = _first_observations(name, backend, 200)
    np.testing.assert_array_equal(first, _first_observations(name, backend, 200))
    assert not np.array_equal(first, _first_observations(name, backend, 200, seed=8))


def test_seeding_without_reset_seed_is_deterministic_too():
    def run() -> np.ndarray:
        vec = envs.make_vec("cartpole", 2, seed=11)
        observations = [vec.reset()[0]]  # no seed here: make_vec seeded the sub-envs
        for step in range(100):
            observations.append(vec.step(np.array([step % 2, 1 - step % 2]))[0])
        vec.close()
        return np.stack(observations)

    np.testing.assert_array_equal(run(), run())


def test_sync_and_async_agree():
    np.testing.assert_array_equal(
        _first_observations("cartpole", "sync", 150), _first_observations("cartpole", "async", 150)
    )


def test_async_several_envs_per_worker_and_call():
    vec = envs.make_vec("cartpole", 5, seed=0, backend="async", envs_per_worker=2)
    assert isinstance(vec, SubprocVectorEnv) and len(vec._processes) == 3
    vec.reset(seed=0)
    assert vec.get_attr("spec")[0].id == "CartPole-v1"
    assert len(vec.call("render")) == 5
    vec.set_attr("custom_flag", 3)
    assert vec.get_attr("custom_flag") == (3,) * 5
    vec.close()
    vec.close()  # idempotent


def _crashing_env() -> gym.Env:
    class Crash(gym.Wrapper):
        def step(self, action):
            raise RuntimeError("boom in step")

    env = envs.make("cartpole")
    return Crash(env)


def test_async_worker_errors_reach_the_caller():
    vec = SubprocVectorEnv([_crashing_env, _crashing_env], envs_per_worker=1, max_restarts=0)
    vec.reset(seed=0)
    with pytest.raises(RuntimeError, match="boom in step"):
        vec.step(np.array([0, 1]))
    assert all(not process.is_alive() for process in vec._processes)


def test_make_vec_validates_its_arguments():
    with pytest.raises(ValueError, match="backend"):
        envs.make_vec("cartpole", 2, backend="threads")
    with pytest.raises(ValueError, match="num_envs"):
        envs.make_vec("cartpole", 0)
    with pytest.raises(ValueError, match="unknown env"):
        envs.make_vec("cartpoel", 2)


class _RGBEnv(gym.Env):
    """A 48x64 RGB image env, standing in for any registered pixel env without a preset."""

    observation_space = gym.spaces.Box(0, 255, (48, 64, 3), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.integers(0, 256, (48, 64, 3), dtype=np.uint8), {}

    def step(self, action):
        return self.np_random.integers(0, 256, (48, 64, 3), dtype=np.uint8), 0.0, False, False, {}


def test_default_wrappers_by_observation_type():
    gray = envs.default_wrappers(_RGBEnv())
    assert gray.observation_space.shape == (4, 84, 84) and gray.observation_space.dtype == np.uint8
    obs, _ = gray.reset(seed=0)
    obs, *_ = gray.step(0)
    assert obs in gray.observation_space and not np.array_equal(obs[-1], obs[-2])
    color = envs.default_wrappers(_RGBEnv(), grayscale=False, frame_stack=2, resize=32)
    assert color.observation_space.shape == (6, 32, 32)
    assert color.reset(seed=0)[0] in color.observation_space
    assert envs.default_wrappers(gym.make("FrozenLake-v1")).observation_space.shape == (16,)
    assert envs.default_wrappers(gym.make("CartPole-v1")).observation_space.dtype == np.float32
