"""The Mario stack: env checker, observation format, frame copies, skip/max, options, vector envs."""

from __future__ import annotations

import warnings

import gym_super_mario_bros  # noqa: F401
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.mario import ACTION_SETS, MapJoypadAction, MaxAndSkipNESObservation, jump_held, make_mario

RIGHT = 1  # "right" in every action set
RIGHT_JUMP = 4  # "right A B": run and jump
ALL_MARIO = [name for name in envs.names() if envs.get_preset(name).kind == "mario"]
FAST_MARIO = ["mario-1-1", "mario-1-1-hud", "mario-4-2", "mario-8-4", "mario", "lost-levels-1-1"]


def checked(env: gym.Env) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    problems = [str(w.message) for w in caught if "different from the unwrapped" not in str(w.message)]
    assert not problems, problems


@pytest.fixture(scope="module")
def mario() -> gym.Env:
    env = envs.make("mario-1-1")
    yield env
    env.close()


@pytest.mark.parametrize("name", FAST_MARIO)
def test_env_checker_passes(name):
    env = envs.make(name)
    checked(env)  # also rebuilds the stack from env.spec: every wrapper records its arguments
    env.close()


# Every Super Mario Bros. stage, and the first stage of each Lost Levels world but A (gym-super-mario-bros
# takes ~15 s to boot A-1; A-2 stands in for it): ~2 s each.
SLOW_MARIO = [n for n in ALL_MARIO if n.startswith("mario-") or n.endswith("-1") or n == "lost-levels-A-2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SLOW_MARIO if n not in FAST_MARIO and n != "lost-levels-A-1"])
def test_env_checker_passes_on_every_stage(name):
    env = envs.make(name)
    checked(env)
    obs, _ = env.reset(seed=0)
    assert obs in env.observation_space
    env.close()


def test_observation_format_and_info(mario):
    assert mario.observation_space == gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    assert mario.action_space == gym.spaces.Discrete(7)
    assert mario.get_wrapper_attr("action_names") == [" ".join(c) for c in ACTION_SETS["simple"]]
    obs, info = mario.reset(seed=0)
    assert obs.flags.c_contiguous
    assert {"x_pos", "flag_get", "x_pos_max", "life", "world", "stage", "time"} <= set(info)
    assert info["world"] == 1 and info["stage"] == 1
    # The reset stack repeats the first frame.
    assert all(np.array_equal(obs[0], frame) for frame in obs[1:])


def test_observations_stay_in_the_space_and_episodes_report_statistics():
    env = envs.make("mario-1-1", max_episode_steps=50)
    env.reset(seed=1)
    env.action_space.seed(1)
    episodes = 0
    for _ in range(120):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert obs in env.observation_space
        assert -4.1 <= reward <= 4.1  # 4 frames of [-15, 15] / 15
        if terminated or truncated:
            episodes += 1
            assert {"r", "l"} <= set(info["episode"]) and 1 <= info["episode"]["l"] <= 50
            assert info["x_pos_max"] >= info["x_pos"] and isinstance(info["flag_get"], bool)
            env.reset()
    assert episodes >= 2
    env.close()


def test_stacked_frames_differ_while_mario_moves_and_are_separate_copies(mario):
    obs, _ = mario.reset(seed=0)
    history = [obs]
    for _ in range(12):
        obs, *_ = mario.step(RIGHT)
        history.append(obs)
    last = history[-1]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(last[i], last[j]), f"frames {i} and {j} of a moving Mario are equal"
    # Each returned stack is its own array, and a later step does not change an earlier one.
    snapshot = [h.copy() for h in history]
    for a, b in zip(history, history[1:], strict=False):
        assert not np.shares_memory(a, b)
    for h, s in zip(history, snapshot, strict=True):
        np.testing.assert_array_equal(h, s)
    # Rolling: frame k of step t is frame k+1 of step t-1.
    np.testing.assert_array_equal(history[-1][:3], history[-2][1:])


def test_skip_takes_the_max_of_the_last_two_native_grayscale_frames():
    # Oracle: a bare env stepped by hand, converted with the luma formula of nes-py's native path.
    wrapped = MaxAndSkipNESObservation(MapJoypadAction(gym.make("SuperMarioBros-1-1-v0")), skip=4)
    bare = gym.make("SuperMarioBros-1-1-v0").unwrapped
    wrapped.reset(seed=0)
    bare.reset(seed=0)

    def luma(rgb: np.ndarray) -> np.ndarray:
        rgb = rgb.astype(np.uint32)
        return ((77 * rgb[..., 0] + 150 * rgb[..., 1] + 29 * rgb[..., 2]) >> 8).astype(np.uint8)

    code = 0b10000000  # right
    for _ in range(25):
        obs, reward, *_ = wrapped.step(RIGHT)
        frames, total = [], 0.0
        for _ in range(4):
            screen, r, *_ = bare.step(code)
            frames.append(luma(screen))
            total += r
        np.testing.assert_array_equal(obs, np.maximum(frames[-2], frames[-1]))
        assert reward == pytest.approx(total)
    assert obs.shape == (240, 256) and wrapped.metadata["render_fps"] == 15
    rgb = MaxAndSkipNESObservation(gym.make("SuperMarioBros-1-1-v0"), skip=3, grayscale=False)
    assert rgb.reset(seed=0)[0].shape == (240, 256, 3) and rgb.metadata["render_fps"] == 20


def test_map_joypad_action_validates():
    base = gym.make("SuperMarioBros-1-1-v0")
    with pytest.raises(ValueError, match="unknown action set"):
        MapJoypadAction(base, "fast")
    with pytest.raises(ValueError, match="unknown button"):
        MapJoypadAction(base, [["right", "turbo"]])
    env = MapJoypadAction(base, [["NOOP"], ["right", "B"]])
    assert env.action(1) == 0b10000010 and env.get_action_meanings() == ["NOOP", "right B"]
    with pytest.raises(ValueError, match="outside"):
        env.action(-1)
    with pytest.raises(TypeError):
        MapJoypadAction(gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="unknown Mario option"):
        envs.make("mario-1-1", frameskip=4)


def test_options_change_the_stack():
    env = envs.make(
        "mario-1-1", actions="right_only", frame_stack=2, crop_top=32, reward_scale=1.0, resize=(64, 72)
    )
    assert env.action_space.n == 5 and env.observation_space.shape == (2, 64, 72)
    obs, _ = env.reset(seed=0)
    assert obs in env.observation_space
    rgb = envs.make("mario-1-1", grayscale=False)
    assert rgb.observation_space.shape == (12, 84, 84)
    assert rgb.reset(seed=0)[0] in rgb.observation_space
    single = envs.make("mario-1-1", frame_stack=1, resize=None)
    assert single.observation_space.shape == (240, 256)


def test_time_limit_truncates_and_noop_starts_are_seeded():
    env = envs.make("mario-1-1", max_episode_steps=5)
    env.reset(seed=0)
    for _ in range(5):
        _, _, terminated, truncated, info = env.step(RIGHT)
    assert truncated and not terminated and info["episode"]["l"] == 5
    env.close()

    noop = envs.make("mario-1-1", noop_max=30)
    starts = {seed: noop.reset(seed=seed)[1]["time"] for seed in range(4)}
    assert noop.reset(seed=2)[1]["time"] == starts[2]
    # The clock ticks during the no-ops, so different seeds start at different clock values.
    assert len(set(starts.values())) > 1
    noop.close()


def test_sticky_actions_are_seeded():
    env = envs.make("mario-1-1", sticky_prob=0.5)

    def run(seed: int) -> list[int]:
        env.reset(seed=seed)
        xs = []
        for step in range(30):
            _, _, terminated, truncated, info = env.step([RIGHT_JUMP, 6][step % 2])  # right-jump / left
            xs.append(info["x_pos"])
            if terminated or truncated:
                break
        return xs

    assert run(1) == run(1)
    assert run(1) != run(2)
    env.close()


def test_episodic_life_continues_the_game_after_a_life_loss():
    env = envs.make("mario", episodic_life=True, reward_scale=1.0)
    _, info = env.reset(seed=0)
    lives = info["life"]
    for _ in range(200):  # walking right, Mario runs into the first Goomba
        _, _, terminated, truncated, info = env.step(RIGHT)
        if terminated or truncated:
            break
    assert terminated and info["life"] == lives - 1 and "episode" not in info
    _, after = env.reset()
    assert after["life"] == lives - 1, "a life loss must not restart the game"
    env.close()


def test_render_returns_full_frames_that_are_copies():
    env = envs.make("mario-1-1", render_mode="rgb_array")
    env.reset(seed=0)
    first = env.render()
    for _ in range(5):
        env.step(RIGHT)
    second = env.render()
    assert first.shape == (240, 256, 3) and first.dtype == np.uint8
    assert not np.shares_memory(first, second) and not np.array_equal(first, second)
    assert env.metadata["render_fps"] == 15
    env.close()
    env.close()  # idempotent, unlike nes-py's own close


@pytest.mark.parametrize("backend", ["sync", "async"])
def test_vector_mario_autoresets_in_the_same_step(backend):
    vec = envs.make_vec("mario-1-1", 2, seed=0, backend=backend, max_episode_steps=6)
    reset_obs, _ = vec.reset(seed=0)
    for _step in range(6):
        obs, rewards, terminations, truncations, infos = vec.step(np.array([RIGHT, RIGHT_JUMP]))
    assert truncations.all() and not terminations.any()
    final = infos["final_info"]
    np.testing.assert_array_equal(final["episode"]["l"], [6, 6])
    assert final["_x_pos_max"].all() and final["_flag_get"].all() and (final["x_pos_max"] > 40).all()
    for index in range(2):
        assert infos["final_obs"][index].shape == (4, 84, 84)
        assert not np.array_equal(infos["final_obs"][index], obs[index])
    # Mario's every episode starts from the same saved state, so the new obs equals the first one.
    np.testing.assert_array_equal(obs, reset_obs)
    assert rewards.shape == (2,) and infos["x_pos"].shape == (2,)
    vec.close()


def _first_observations(backend: str, steps: int) -> np.ndarray:
    # Sticky actions and no-op starts draw from the env's seeded generator: a real test of seeding.
    vec = envs.make_vec(
        "mario-1-1", 2, seed=5, backend=backend, sticky_prob=0.25, noop_max=10, max_episode_steps=60
    )
    rng = np.random.default_rng(5)
    observations = [vec.reset(seed=5)[0]]
    for _ in range(steps - 1):
        observations.append(vec.step(rng.integers(0, 7, 2))[0])
    vec.close()
    return np.stack(observations)


@pytest.mark.parametrize("backend", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_same_seed_replays_the_same_200_observations(backend):
    np.testing.assert_array_equal(_first_observations(backend, 200), _first_observations(backend, 200))


def test_make_mario_validates():
    with pytest.raises(ValueError, match="gym-super-mario-bros id"):
        make_mario("CartPole-v1")
    with pytest.raises(ValueError, match="sticky_prob"):
        make_mario(sticky_prob=1.0)
    with pytest.raises(ValueError, match="frame_stack"):
        make_mario(frame_stack=0)
    with pytest.raises(TypeError, match="show_held_jump must be a bool"):
        make_mario(show_held_jump=1)


RIGHT_A = 2  # "right A" in the simple set


@pytest.mark.parametrize("sticky_prob", [0.0, 0.25])
def test_show_held_jump_marks_the_corner_only_while_a_is_held(sticky_prob):
    """The corner block is 255 after a step that held A, 0 after one that did not (sticky actions
    included: the game's own record of the controller decides), and nothing else of the frame changes."""
    shown = make_mario(show_held_jump=True, sticky_prob=sticky_prob, frame_stack=1)
    plain = make_mario(sticky_prob=sticky_prob, frame_stack=1)
    first, _ = shown.reset(seed=3)
    reference, _ = plain.reset(seed=3)
    assert (first[:3, :3] == 0).all() and not (reference[:3, :3] == 0).all()
    for action in [RIGHT_A, RIGHT_A, RIGHT, RIGHT, RIGHT_A, 0, RIGHT]:
        obs, *_ = shown.step(action)
        expected, *_ = plain.step(action)
        held = jump_held(shown.unwrapped)
        assert (obs[:3, :3] == (255 if held else 0)).all()
        outside = np.ones(obs.shape, dtype=bool)
        outside[:5, :5] = False  # 12 screen pixels are 4.2 rows and 3.9 columns of 84x84
        np.testing.assert_array_equal(obs[outside], expected[outside])
    shown.close()
    plain.close()


def test_show_held_jump_follows_the_action_without_sticky_actions():
    env = make_mario(show_held_jump=True, frame_stack=1)
    env.reset(seed=0)
    corners = [int(env.step(action)[0][1, 1]) for action in [RIGHT_A, RIGHT, RIGHT_A, 0]]
    assert corners == [255, 0, 255, 0]
    env.close()
