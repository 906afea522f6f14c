"""The mario-world-1 preset: a stage per episode, named in ``info``; evaluation per stage."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import envs
from agents import engine, episodes, ppo
from core.runs import write_run_config
from envs.mario import ACTION_SETS, load_routes, parse_stages
from envs.registry import WORLD_1_STAGES
from tests.test_cli import assert_usage_error, run_main

ROOT = Path(__file__).resolve().parents[1]


def test_parse_stages_reads_labels_and_names_a_bad_one():
    assert parse_stages(["1-1", "8-4"]) == [(1, 1), (8, 4)]
    for bad, needle in [("1_2", "form W-S"), ("9-1", "does not exist"), ("1-5", "does not exist")]:
        with pytest.raises(ValueError, match=needle):
            parse_stages(["1-1", bad])
    with pytest.raises(ValueError, match="at least one"):
        parse_stages([])


def played_stages(seed: int, resets: int) -> list[str]:
    env = envs.make("mario-world-1")
    try:
        labels = []
        _, info = env.reset(seed=seed)
        labels.append(f"{info['world']}-{info['stage']}")
        for _ in range(resets - 1):
            _, info = env.reset()
            labels.append(f"{info['world']}-{info['stage']}")
        return labels
    finally:
        env.close()


def test_every_world_1_stage_is_drawn_and_a_seed_replays_the_draw():
    first = played_stages(seed=3, resets=16)
    assert set(first) == set(WORLD_1_STAGES)
    assert played_stages(seed=3, resets=16) == first
    assert played_stages(seed=4, resets=16) != first


class StandStill:
    """A policy that never moves (action 0 is NOOP), so every episode stalls."""

    def reset(self, num_envs: int) -> None:
        pass

    def act(self, obs: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return np.zeros(len(obs), dtype=np.int64), {}


def test_evaluation_plays_each_stage_equally_and_cuts_stalled_episodes():
    overrides = {**envs.eval_overrides("mario-world-1"), "stall_patience": 30}
    summary = episodes.evaluate_preset(StandStill(), "mario-world-1", episodes=2, seed=0, overrides=overrides)
    assert summary["episodes"] == 8
    assert list(summary["stages"]) == list(WORLD_1_STAGES)
    assert all(stage["episodes"] == 2 and stage["clear_rate"] == 0.0 for stage in summary["stages"].values())
    assert summary["stalled"] == 8
    # The training's periodic evaluation logs each stage's curve next to the overall one.
    scalars = episodes.eval_scalars(summary)
    assert {f"eval/stages/{label}/clear_rate" for label in WORLD_1_STAGES} <= scalars.keys()
    assert scalars["eval/stages/1-4/x_pos_mean"] == summary["stages"]["1-4"]["x_pos_mean"]


class ReadsTheScreen:
    """A deterministic policy whose actions follow the frames, so different no-op starts play different
    episodes."""

    def reset(self, num_envs: int) -> None:
        pass

    def act(self, obs: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return obs.reshape(len(obs), -1).sum(axis=1, dtype=np.int64) % 7, {}


def test_one_stage_alone_replays_its_rows_of_the_full_evaluation(tmp_path, capsys):
    overrides = {**envs.eval_overrides("mario-world-1"), "stall_patience": 30}
    full = episodes.evaluate_preset(ReadsTheScreen(), "mario-world-1", 3, 5, overrides)
    alone = episodes.evaluate_preset(ReadsTheScreen(), "mario-world-1", 3, 5, overrides, stage="1-2")
    assert alone["episodes"] == 3
    rows = [row for row in full["per_episode"] if (row["world"], row["stage"]) == (1, 2)]
    assert alone["per_episode"] == rows
    # Those are the seeds 1-2 gets as the second stage, not the first stage's.
    first_seeds = episodes.evaluate(
        ReadsTheScreen(),
        lambda n: envs.make_vec("mario-world-1", n, seed=5, stages=("1-2",), **overrides),
        3,
        5,
    )
    assert first_seeds["per_episode"] != rows
    run = str(ROOT / "runs" / "mario-world-1-distilled")
    assert_usage_error(["eval", run, "--stage", "2-1"], capsys, "lab eval: --stage 2-1", "choose from: 1-1")
    assert_usage_error(["eval", run, "--stage", "1-3", "--save"], capsys, "with --stage leave it out")
    assert_usage_error(["eval", run, run, "--stage", "1-3"], capsys, "--stage evaluates one run")


def test_only_multi_stage_presets_have_stages():
    assert episodes.preset_stages("mario-world-1") == WORLD_1_STAGES
    assert episodes.preset_stages("mario-1-1") == () and episodes.preset_stages("cartpole") == ()


def test_stage_weights_steer_the_draw_and_bad_weights_are_refused():
    env = envs.make("mario-world-1")
    try:
        stages = env.get_wrapper_attr("set_stage_weights")
        stages({"1-1": 0.01, "1-2": 0.01, "1-3": 10.0, "1-4": 0.01})
        _, info = env.reset(seed=0)
        labels = [f"{info['world']}-{info['stage']}"]
        for _ in range(29):
            _, info = env.reset()
            labels.append(f"{info['world']}-{info['stage']}")
        assert labels.count("1-3") >= 25  # p = 0.997 each
        for bad in ({"1-1": 1.0}, {"1-1": 1.0, "1-2": 1.0, "1-3": 0.0, "1-4": 1.0}):
            with pytest.raises(ValueError, match="weight > 0"):
                stages(bad)
    finally:
        env.close()


def test_adaptive_weights_favour_the_stages_not_cleared_yet():
    means = {
        "1-1": {"clear_rate": 0.9}, "1-2": {"clear_rate": 0.0}, "1-3": {"clear_rate": math.nan},
        "1-4": {"clear_rate": 0.5},
    }  # fmt: skip
    weights = episodes.adaptive_stage_weights(means)
    assert weights == pytest.approx({"1-1": 0.2, "1-2": 1.1, "1-3": 1.1, "1-4": 0.6})


class RecordingVecEnv:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, float]]] = []

    def call(self, name: str, weights: dict[str, float]) -> None:
        self.calls.append((name, weights))


@pytest.mark.parametrize("sampling", ["uniform", "adaptive"])
def test_the_run_sends_the_weights_to_its_envs_only_when_adaptive(sampling):
    config = ppo.PPOConfig(env="mario-world-1", stage_sampling=sampling)
    vec_env = RecordingVecEnv()
    run = SimpleNamespace(config=config, vec_envs=[vec_env])
    means = {label: {"clear_rate": 0.5} for label in WORLD_1_STAGES}
    shares = engine.TrainingRun.rebalance_stages(run, {"1-1": {"clear_rate": 0.5}})  # not all played yet
    assert shares == {} and vec_env.calls == []
    shares = engine.TrainingRun.rebalance_stages(run, means)
    if sampling == "uniform":
        assert shares == {} and vec_env.calls == []
    else:
        assert shares == pytest.approx(dict.fromkeys(WORLD_1_STAGES, 0.25))
        assert vec_env.calls == [("set_stage_weights", dict.fromkeys(WORLD_1_STAGES, pytest.approx(0.6)))]


def test_adaptive_sampling_needs_a_multi_stage_preset(tmp_path, capsys):
    assert_usage_error(
        ["train", "mario-1-1", "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run"), "--set", "stage_sampling=adaptive"],
        capsys, "stage_sampling=adaptive", "multi-stage", "uniform",
    )  # fmt: skip
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_sticky_and_noop_starts_reach_the_training_envs_and_the_eval_keeps_its_protocol():
    config = ppo.PPOConfig(env="mario-world-1", sticky=0.25, noop_max=12)
    assert engine.train_env_overrides(config) == {"sticky_prob": 0.25, "noop_max": 12}
    # The periodic eval plays with the training's sticky actions but the preset's 0-30 no-ops.
    assert engine.eval_env_overrides(config) == {"sticky_prob": 0.25, "noop_max": 30, "stall_patience": 200}
    assert engine.train_env_overrides(ppo.PPOConfig(env="mario-world-1")) == {}


def test_the_flag_bonus_pays_once_on_the_flag_and_stays_out_of_the_reported_return():
    route = load_routes(str(ROOT / "envs" / "routes" / "1-4.json"))["1-4"]
    results = {}
    for bonus in (0.0, 400.0):
        env = envs.make("mario-1-4", reward_scale=1.0, flag_bonus=bonus)
        env.reset(seed=0)
        rewards = []
        for action in route:
            _, reward, terminated, truncated, info = env.step(action)
            rewards.append(float(reward))
            if terminated or truncated:
                break
        env.close()
        assert info["flag_get"]
        results[bonus] = (rewards, info["episode"]["r"])
    plain, paid = results[0.0][0], results[400.0][0]
    assert len(plain) == len(paid) and paid[:-1] == plain[:-1] and paid[-1] == plain[-1] + 400.0
    assert float(results[400.0][1]) == float(results[0.0][1]) == pytest.approx(sum(plain))
    # Training envs only: the periodic evaluation keeps the game's reward.
    config = ppo.PPOConfig(env="mario-world-1", flag_bonus=400.0)
    assert engine.train_env_overrides(config) == {"flag_bonus": 400.0}
    assert "flag_bonus" not in engine.eval_env_overrides(config)


def test_the_training_stall_cut_off_truncates_a_standing_episode():
    config = ppo.PPOConfig(env="mario-1-1", stall_patience=7)
    overrides = engine.train_env_overrides(config)
    assert overrides == {"stall_patience": 7}
    env = envs.make("mario-1-1", **overrides)
    try:
        env.reset(seed=0)
        steps, terminated, truncated = 0, False, False
        while not (terminated or truncated) and steps < 100:  # no-ops: Mario stands, his furthest x stays
            _, _, terminated, truncated, info = env.step(0)
            steps += 1
        assert truncated and not terminated and info["stalled"] and steps <= 8
    finally:
        env.close()
    # The periodic evaluation keeps the preset's protocol (its own cut-off, 200).
    assert (
        envs.eval_overrides("mario-1-1")["stall_patience"]
        == engine.eval_env_overrides(config)["stall_patience"]
    )


@pytest.mark.parametrize(
    "setting", ["sticky=0.25", "noop_max=30", "flag_bonus=100", "stall_patience=100", "retry_prob=0.25"]
)
def test_sticky_and_noop_starts_are_refused_outside_mario(setting, tmp_path, capsys):
    assert_usage_error(
        ["train", "cartpole", "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run"), "--set", setting],
        capsys, setting, "Mario presets only", "cartpole",
    )  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_smaller_action_set_reaches_the_training_envs_only():
    config = ppo.PPOConfig(env="mario-1-1", actions="right_only", sticky=0.25)
    assert engine.train_env_overrides(config) == {"actions": "right_only", "sticky_prob": 0.25}
    # Its agent plays in the preset's own env, which the option's design rests on: each action set
    # starts with the smaller ones, the same buttons at the same indices.
    assert "actions" not in engine.eval_env_overrides(config)
    assert ACTION_SETS["right_only"] == ACTION_SETS["simple"][:5] == ACTION_SETS["complex"][:5]
    assert ACTION_SETS["simple"] == ACTION_SETS["complex"][:7]
    env = envs.make_vec("mario-1-1", 1, **engine.train_env_overrides(config))
    try:
        assert env.single_action_space.n == 5
    finally:
        env.close()


@pytest.mark.parametrize(
    ("env", "setting", "needles"),
    [
        ("cartpole", "actions=right_only", ["Mario presets only", "cartpole"]),
        ("mario-1-1", "actions=complex", ["more actions than", "simple", "choose from: right_only, simple"]),
        (
            "mario-1-1",
            "actions=left_only",
            ["actions='left_only' is not valid", "right_only, simple, complex"],
        ),
    ],
)
def test_a_bad_action_set_is_one_line_before_the_run_exists(env, setting, needles, tmp_path, capsys):
    assert_usage_error(
        ["train", env, "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run"), "--set", setting],
        capsys, *needles,
    )  # fmt: skip
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Route starts: a start-state curriculum along a known route
# ---------------------------------------------------------------------------------------------

WALK = [3, 3, 0] * 8 + [3]  # right+B and waits: safe for 1-1's first 25 steps; sticky actions change it


def walked_positions() -> list[int]:
    """x after each prefix of WALK (the start included), played without sticky actions."""
    env = envs.make("mario-1-1")
    try:
        _, info = env.reset(seed=0)
        positions = [info["x_pos"]]
        for action in WALK:
            _, _, _, _, info = env.step(action)
            positions.append(info["x_pos"])
        return positions
    finally:
        env.close()


def start_positions(resets: int, **overrides) -> list[int]:
    env = envs.make("mario-1-1", **overrides)
    try:
        return [env.reset(seed=seed)[1]["x_pos"] for seed in range(resets)]
    finally:
        env.close()


def test_route_starts_replay_a_prefix_of_the_route_with_sticky_actions_off():
    route = walked_positions()
    starts = start_positions(8, sticky_prob=0.9, route_starts={"1-1": WALK}, route_start_prob=1.0)
    assert set(starts) <= set(route)  # with sticky actions on, the walk would stray from the route
    assert len(set(starts)) >= 4  # prefixes of many lengths
    assert start_positions(4, route_starts={"1-1": WALK}, route_start_prob=0.0) == [route[0]] * 4
    assert (
        start_positions(4, route_starts={"1-2": WALK}, route_start_prob=1.0) == [route[0]] * 4
    )  # not this stage


def test_route_starts_reach_every_stage_stack_of_a_multi_stage_env():
    env = envs.make("mario-world-1", sticky_prob=0.5, route_starts={"1-4": WALK}, route_start_prob=1.0)
    try:
        wrapper = env
        while not isinstance(wrapper, envs.mario.RouteStarts):
            wrapper = wrapper.env
        assert len(wrapper.sticky) == len(WORLD_1_STAGES)  # one sticky wrapper per stage, all paused
    finally:
        env.close()


def walk_route_config(tmp_path, **fields: Any) -> ppo.PPOConfig:
    """A 1-1 config whose every training episode starts along WALK (its route file in ``tmp_path``)."""
    path = write_routes(tmp_path, {"actions": "simple", "routes": {"1-1": WALK}})
    return ppo.PPOConfig(env="mario-1-1", route_starts=path, route_start_prob=1.0, device="cpu", **fields)


def write_routes(tmp_path, content) -> str:
    path = tmp_path / "routes.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_route_starts_reach_the_training_envs_only(tmp_path):
    path = write_routes(tmp_path, {"actions": "simple", "routes": {"1-3": WALK}})
    config = ppo.PPOConfig(env="mario-world-1", route_starts=path, route_start_prob=0.25)
    config.check()
    assert engine.train_env_overrides(config) == {"route_starts": {"1-3": WALK}, "route_start_prob": 0.25}
    assert engine.eval_env_overrides(config) == {"noop_max": 30, "stall_patience": 200}


def test_route_starts_take_one_file_per_stage():
    both = ",".join(str(ROOT / "envs" / "routes" / f"{stage}.json") for stage in ("1-2", "1-3"))
    routes = load_routes(both)
    assert sorted(routes) == ["1-2", "1-3"]
    assert routes["1-3"] == load_routes(str(ROOT / "envs" / "routes" / "1-3.json"))["1-3"]
    with pytest.raises(ValueError, match="two routes of 1-3"):
        load_routes(f"{both},{ROOT / 'envs' / 'routes' / '1-3.json'}")


def test_a_route_of_another_action_set_loads_when_its_actions_mean_the_same(tmp_path):
    # WALK uses simple's 0 and 3, which right_only and complex have at the same indices.
    path = write_routes(tmp_path, {"actions": "simple", "routes": {"1-1": WALK}})
    assert load_routes(path, "right_only") == load_routes(path, "complex") == {"1-1": WALK}
    jumps = write_routes(tmp_path, {"actions": "simple", "routes": {"1-1": [3, 5]}})
    with pytest.raises(ValueError, match="uses action 5 of the 'simple' set, which the 'right_only' set"):
        load_routes(jumps, "right_only")


@pytest.mark.parametrize(
    ("env", "content", "needles"),
    [
        ("mario-1-1", None, ["No such file"]),
        ("mario-1-1", "{not json", ["is not JSON"]),
        ("mario-1-1", {"routes": []}, ['"routes"']),
        (
            "mario-1-1",
            {"actions": "lefty", "routes": {"1-1": [1]}},
            ["'lefty'", "right_only, simple, complex"],
        ),
        (
            "mario-1-1",
            {"actions": "complex", "routes": {"1-1": [1, 9]}},
            ["action 9 of the 'complex' set", "'simple'"],
        ),
        ("mario-1-1", {"routes": {"1-9": [1]}}, ["1-9", "does not exist"]),
        ("mario-1-1", {"routes": {"1-1": [1, 7]}}, ["route of 1-1", "actions 0..6"]),
        ("mario-1-1", {"routes": {"1-3": [1]}}, ["routes for 1-3", "never plays (1-1)"]),
        ("cartpole", {"routes": {"1-1": [1]}}, ["Mario presets only"]),
    ],
)
def test_a_bad_route_file_is_one_line_before_the_run_exists(env, content, needles, tmp_path, capsys):
    path = str(tmp_path / "missing.json") if content is None else write_routes(tmp_path, content)
    assert_usage_error(
        ["train", env, "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run"), "--set", f"route_starts={path}"],
        capsys, *needles,
    )  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_route_start_episodes_say_so_and_stay_out_of_the_clear_rates():
    env = envs.make("mario-1-1", route_starts={"1-1": WALK}, route_start_prob=1.0)
    try:
        _, info = env.reset(seed=3)
        replayed = info["route_start"]
        assert 0 < replayed <= len(WALK) and env.step(0)[4]["route_start"] == replayed
    finally:
        env.close()
    tracker = episodes.EpisodeTracker()
    tracker.add({"return": 10.0, "flag_get": 0.0, "route_start": 0.0})
    tracker.add({"return": 99.0, "flag_get": 1.0, "x_pos_max": 3000.0, "route_start": 12.0})  # near the flag
    assert tracker.mean("flag_get") == 0.0 and tracker.mean("return") == 10.0
    assert (tracker.count, tracker.route_start_count) == (2, 1)
    assert episodes.route_start_scalars(tracker) == {
        "route_starts/episodes": 1.0, "route_starts/clear_rate": 1.0, "route_starts/x_pos_max": 3000.0
    }  # fmt: skip
    restored = episodes.EpisodeTracker()
    restored.restore(tracker.state())
    assert (restored.count, restored.route_start_count) == (2, 1)
    assert episodes.route_start_scalars(restored) == episodes.route_start_scalars(tracker)


@pytest.mark.parametrize(("stage", "flag_x"), [("1-1", 3100), ("1-2", 3100), ("1-3", 2400), ("1-4", 2200)])
def test_the_shipped_routes_reach_the_flag(stage, flag_x):
    route = load_routes(str(ROOT / "envs" / "routes" / f"{stage}.json"))[stage]
    env = envs.make(f"mario-{stage}")
    try:
        env.reset(seed=0)
        for action in route:
            _, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        assert info["flag_get"] and info["x_pos"] > flag_x
    finally:
        env.close()


def test_route_start_windows_bound_the_replayed_prefix():
    route = walked_positions()
    starts = start_positions(
        6, route_starts={"1-1": WALK}, route_start_prob=1.0, route_start_windows={"1-1": (20, 22)}
    )
    assert set(starts) <= {route[20], route[21]} and len(starts) == 6
    env = envs.make("mario-1-1", route_starts={"1-1": WALK}, route_start_prob=1.0)
    try:
        env.reset(seed=0)
        env.get_wrapper_attr("set_route_windows")({"1-1": (5, 6)})
        assert env.reset(seed=1)[1]["route_start"] == 5
        for bad in ({"1-1": (6, 6)}, {"1-1": (0, len(WALK) + 2)}, {"1-2": (0, 1)}):
            with pytest.raises(ValueError, match="route window"):
                env.get_wrapper_attr("set_route_windows")(bad)
    finally:
        env.close()


def route_episode(start: int, cleared: bool, stage: int = 3) -> dict[str, float]:
    return {
        "return": 1.0,
        "flag_get": float(cleared),
        "world": 1.0,
        "stage": float(stage),
        "route_start": float(start),
    }


def walk_until_the_end(env) -> tuple[int, dict]:
    """Holds right (action 1) until the episode ends: on 1-1, into the first goomba."""
    for steps in range(1, 500):
        *_, terminated, truncated, info = env.step(1)
        if terminated or truncated:
            return steps, info
    raise AssertionError("walking right did not end the episode")


def test_a_retry_starts_shortly_before_the_last_death_and_does_not_retry_itself():
    config = ppo.PPOConfig(env="mario-1-1", retry_prob=1.0, retry_back=20, noop_max=30)
    overrides = engine.train_env_overrides(config)
    assert overrides == {"noop_max": 30, "retry_prob": 1.0, "retry_back": 20}
    assert "retry_prob" not in engine.eval_env_overrides(config)  # evals start at the stage's start
    env = envs.make("mario-1-1", **overrides)
    try:
        _, info = env.reset(seed=0)
        assert info["retry_start"] == 0  # nothing died yet: from the start
        first_steps, first_end = walk_until_the_end(env)
        assert first_end["flag_get"] is False and first_steps > 20
        _, info = env.reset()
        back = info["retry_start"]
        # Handed over 4-20 steps before the death, no no-ops: the same walk dies as many steps later.
        assert 4 <= back <= 20 and info["x_pos"] < first_end["x_pos"]
        steps, end = walk_until_the_end(env)
        assert (steps, end["x_pos"]) == (back, first_end["x_pos"]) and end["retry_start"] == back
        # The retry's own death is not kept: the next retry starts where the first did.
        _, again = env.reset()
        assert (again["retry_start"], again["x_pos"]) == (back, info["x_pos"])
    finally:
        env.close()


def test_a_run_with_retries_and_no_route_starts_logs_the_retries(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_main(
        ["train", "mario-1-1", "--steps", "128", "--envs", "2", "--device", "cpu", "--no-progress",
         "--run-dir", str(run_dir), "--set", "num_steps=64", "--set", "retry_prob=0.5",
         "--set", "eval_episodes=1"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    [record] = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert "route_start_clear_rate" not in record  # the route-start panel is for route starts only


def test_retries_have_their_own_window_and_leave_the_clear_rate_from_the_start():
    tracker = episodes.EpisodeTracker(window=10)
    tracker.add({"return": 1.0, "flag_get": 0.0, "x_pos_max": 300.0, "route_start": 0.0, "retry_start": 0.0})
    tracker.add(
        {"return": 1.0, "flag_get": 1.0, "x_pos_max": 3100.0, "route_start": 0.0, "retry_start": 12.0}
    )
    assert tracker.mean("flag_get") == 0.0 and tracker.count == 2
    scalars = episodes.retry_scalars(tracker)
    assert scalars == {"retries/episodes": 1.0, "retries/clear_rate": 1.0, "retries/x_pos_max": 3100.0,
                       "retries/steps_before_death": 12.0}  # fmt: skip
    restored = episodes.EpisodeTracker(window=10)
    restored.restore(tracker.state())
    assert episodes.retry_scalars(restored) == scalars


def test_the_backward_schedule_moves_back_after_a_fifth_of_its_window_clears():
    lengths = {"1-3": 300, "1-4": 10}
    frontiers = episodes.first_route_frontiers(lengths, step=20)
    assert frontiers == {"1-3": 280, "1-4": 0}
    assert episodes.route_windows(frontiers, lengths, 20) == {"1-3": (280, 300), "1-4": (0, 10)}
    tracker, fifth = (
        episodes.EpisodeTracker(),
        math.ceil(episodes.FRONTIER_EPISODES * episodes.FRONTIER_CLEAR_RATE),
    )
    for i in range(episodes.FRONTIER_EPISODES - 1):  # one episode short: the window stays
        tracker.add(route_episode(280 + i % 20, cleared=i < fifth))
    assert episodes.advance_route_frontiers(frontiers, tracker, 20) == frontiers
    tracker.add(route_episode(250, cleared=True))  # outside the window: does not count
    tracker.add(route_episode(281, cleared=True, stage=4))  # another stage: does not count
    assert episodes.advance_route_frontiers(frontiers, tracker, 20) == frontiers
    tracker.add(route_episode(299, cleared=False))  # enough in the window, a fifth of them cleared
    moved = episodes.advance_route_frontiers(frontiers, tracker, 20)
    assert moved == {"1-3": 260, "1-4": 0}
    # as many starts in the new window without a clear leave it where it is
    for _ in range(episodes.FRONTIER_EPISODES):
        tracker.add(route_episode(265, cleared=False))
    assert episodes.advance_route_frontiers(moved, tracker, 20) == moved
    assert episodes.advance_route_frontiers({"1-3": 10}, tracker, 20)["1-3"] == 10
    for _ in range(episodes.FRONTIER_EPISODES):
        tracker.add(route_episode(12, cleared=True))
    assert episodes.advance_route_frontiers({"1-3": 10}, tracker, 20)["1-3"] == 0  # not below the start


def test_the_backward_window_can_begin_part_way_along_the_route(tmp_path):
    lengths = {"1-3": 300, "1-4": 10}
    # Action 135 on 1-3; on 1-4 the window just before the flag (0) is already earlier.
    assert episodes.first_route_frontiers(lengths, step=10, start_from=135) == {"1-3": 135, "1-4": 0}
    assert episodes.first_route_frontiers(lengths, step=10, start_from=400) == {"1-3": 290, "1-4": 0}
    config = walk_route_config(
        tmp_path, route_start_schedule="backward", route_start_step=5, route_start_from=12
    )
    run = engine.TrainingRun("ppo", config, tmp_path / "run", resume=False, progress=False)
    try:
        assert run.route_windows() == {"1-1": (12, 17)}
        run.save(512, {"global_step": 512})
    finally:
        run.close()
    # A resume keeps the earlier of the saved window and route_start_from.
    later = dataclasses.replace(config, route_start_from=16)
    assert resumed_frontiers(later, tmp_path / "run") == {"1-1": 12}
    earlier = dataclasses.replace(config, route_start_from=4)
    assert resumed_frontiers(earlier, tmp_path / "run") == {"1-1": 4}


def resumed_frontiers(config: Any, run_dir: Path) -> dict[str, int]:
    """The route-start frontiers a resume of ``run_dir`` under ``config`` begins with (the run is closed)."""
    run = engine.TrainingRun("ppo", config, run_dir, resume=True, progress=False)
    try:
        return run.route_frontiers
    finally:
        run.close()


def test_a_fixed_window_stays_where_it_begins_however_many_of_its_starts_clear(tmp_path):
    config = walk_route_config(
        tmp_path, route_start_schedule="window", route_start_step=6, route_start_from=8
    )
    run = engine.TrainingRun("ppo", config, tmp_path / "run", resume=False, progress=False)
    try:
        assert run.route_windows() == {"1-1": (8, 14)}
        vec_env = run.make_vec_env(2, seed=0)
        assert all(8 <= start < 14 for start in vec_env.reset(seed=0)[1]["route_start"])
        for i in range(episodes.FRONTIER_EPISODES):  # every start clears: a backward window would move
            run.episodes.add(route_episode(8 + i % 6, cleared=True, stage=1))
        run.advance_route_starts()
        assert run.route_windows() == {"1-1": (8, 14)}
    finally:
        run.close()
    # A window past a short route's end begins one action before it.
    assert episodes.fixed_route_frontiers({"1-1": 25, "1-2": 0}, start_from=40) == {"1-1": 24}


def test_route_start_from_needs_the_backward_schedule(tmp_path, capsys):
    path = write_routes(tmp_path, {"actions": "simple", "routes": {"1-1": WALK}})
    assert_usage_error(
        ["train", "mario-1-1", "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run"), "--set", f"route_starts={path}", "--set", "route_start_from=12"],
        capsys, "route_start_from=12", "route_start_schedule=backward",
    )  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_backward_schedule_needs_routes(tmp_path, capsys):
    assert_usage_error(
        ["train", "mario-1-1", "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run"), "--set", "route_start_schedule=backward"],
        capsys, "route_start_schedule=backward needs route_starts",
    )  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_the_backward_schedule_hands_its_windows_to_the_envs_and_a_resumed_run_keeps_them(tmp_path):
    config = walk_route_config(tmp_path, route_start_schedule="backward", route_start_step=5)
    run = engine.TrainingRun("ppo", config, tmp_path / "run", resume=False, progress=False)
    try:
        assert run.route_frontiers == {"1-1": 20}
        vec_env = run.make_vec_env(2, seed=0)
        assert all(20 <= start < 25 for start in vec_env.reset(seed=0)[1]["route_start"])
        fifth = math.ceil(episodes.FRONTIER_EPISODES * episodes.FRONTIER_CLEAR_RATE)
        for i in range(episodes.FRONTIER_EPISODES):  # a fifth of the window's starts clear
            run.episodes.add(route_episode(20 + i % 5, cleared=i < fifth, stage=1))
        run.advance_route_starts()
        assert run.route_frontiers == {"1-1": 15}
        assert all(15 <= start < 20 for start in vec_env.reset(seed=1)[1]["route_start"])
        run.save(512, {"global_step": 512})
    finally:
        run.close()
    resumed = engine.TrainingRun("ppo", config, tmp_path / "run", resume=True, progress=False)
    try:
        assert resumed.route_frontiers == {"1-1": 15} and resumed.route_windows() == {"1-1": (15, 20)}
    finally:
        resumed.close()
    write_run_config(tmp_path / "run", "algo", "ppo", config)
    engine.export_slim_checkpoint(tmp_path / "run", tmp_path / "slim")  # what a session commits
    slim = engine.TrainingRun("ppo", config, tmp_path / "slim", resume=True, progress=False)
    try:
        assert (
            slim.route_frontiers == {"1-1": 15}
            and slim.episodes.route_start_count == episodes.FRONTIER_EPISODES
        )
    finally:
        slim.close()


@pytest.mark.parametrize("preset", ["mario-1-1", "mario-world-1"])
def test_a_route_start_from_a_snapshot_equals_a_replay_from_the_start(preset):
    stages = {"stages": ["1-1"]} if preset == "mario-world-1" else {}

    def start(windows: list[tuple[int, int]]) -> tuple[Any, dict, int]:
        env = envs.make(preset, route_starts={"1-1": WALK}, route_start_prob=1.0, **stages)
        try:
            set_windows = env.get_wrapper_attr("set_route_windows")
            for seed, window in enumerate(windows):
                set_windows({"1-1": window})
                obs, info = env.reset(seed=seed)
            obs, *_, info = env.step(3)  # and the step after it
            return obs, info, len(env.get_wrapper_attr("snapshots")["1-1"])
        finally:
            env.close()

    fresh_obs, fresh_info, cached = start([(13, 14)])
    assert cached == 3  # every 4th position the replay passed (a frame stack apart): 4, 8, 12
    obs, info, cached = start([(24, 25), (13, 14)])  # 13 from the snapshot at 8, 5 actions replayed
    assert cached == 6 and np.array_equal(obs, fresh_obs)
    assert (info["x_pos"], info["route_start"]) == (fresh_info["x_pos"], 13)


def test_no_op_starts_skip_the_episodes_that_start_along_a_route():
    route = walked_positions()
    along = {"route_starts": {"1-1": WALK}, "route_start_windows": {"1-1": (13, 14)}}
    assert start_positions(6, noop_max=30, route_start_prob=1.0, **along) == [route[13]] * 6


def test_the_learning_curve_shows_route_starts_and_the_backward_window(tmp_path, monkeypatch):
    history = [
        {"step": 4096 * i, "return_mean": 1.0, "x_pos_max_mean": 700.0, "clear_rate": 0.0,
         "route_start_clear_rate": 0.5, "route_frontiers": {"1-3": 280 - 20 * i}}
        for i in range(1, 6)
    ]  # fmt: skip
    drawn = {}
    monkeypatch.setattr(
        engine, "plot_history", lambda rows, x, panels, path, **kw: drawn.update(rows=rows, panels=panels)
    )
    engine.plot_learning_curve(history, tmp_path / "curve.png")
    clears, frontier = drawn["panels"][2], drawn["panels"][-1]
    assert clears.keys == ("clear_rate", "route_start_clear_rate") and len(clears.legend) == 2
    assert frontier.keys == ("frontier/1-3",) and [r["frontier/1-3"] for r in drawn["rows"]] == [
        260,
        240,
        220,
        200,
        180,
    ]
    engine.plot_learning_curve(
        [{k: v for k, v in r.items() if "route" not in k} for r in history], tmp_path / "c.png"
    )
    assert len(drawn["panels"]) == 3 and drawn["panels"][2].keys == ("clear_rate",)


def test_the_learning_curve_draws_the_greedy_evals_as_dots(tmp_path, monkeypatch):
    history = [
        {"step": 4096 * i, "return_mean": 1.0, "x_pos_max_mean": 700.0, "clear_rate": 0.0} for i in (1, 2)
    ]
    evals = [
        {"step": 4096, "seconds": 9.0, "final": False, "return_mean": 200.0, "clear_rate": 0.0},
        {"step": 8192, "seconds": 19.0, "final": True, "return_mean": 3000.0, "clear_rate": 1.0},
    ]
    drawn = {}
    monkeypatch.setattr(
        engine, "plot_history", lambda rows, x, panels, path, **kw: drawn.update(panels=panels)
    )
    engine.plot_learning_curve(history, tmp_path / "curve.png", evals=evals)
    returns, _, clears = drawn["panels"]
    assert returns.points == ((4096, 200.0), (8192, 3000.0))
    assert clears.points == ((4096, 0.0), (8192, 1.0))
    engine.plot_learning_curve(history, tmp_path / "curve.png")
    assert all(panel.points == () for panel in drawn["panels"])


@pytest.mark.parametrize(
    ("env", "setting", "problem"),
    [
        ("mario-world-1", "1-3:1.5", "'1-3:1.5' is not STAGE:GAMMA with GAMMA in (0, 1]"),
        ("mario-world-1", "1-3", "'1-3' is not STAGE:GAMMA"),
        ("mario-world-1", "1-3:x", "'1-3:x' is not STAGE:GAMMA"),
        ("mario-world-1", "1-3:0.99,2-1:0.95", "never plays '2-1'; its stages: 1-1, 1-2, 1-3, 1-4"),
        ("mario-1-1", "1-3:0.99", "never plays '1-3'; its stages: 1-1"),
        ("cartpole", "1-3:0.99", "Mario presets only"),
    ],
)
def test_stage_gamma_names_a_played_stage_and_a_discount(env, setting, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        ppo.PPOConfig(env=env, stage_gamma=setting).check()


def test_stage_gamma_parses_and_maps_each_envs_stage():
    config = ppo.PPOConfig(env="mario-world-1", stage_gamma="1-2:0.95, 1-3:0.99")
    config.check()
    gammas = ppo.stage_gammas(config)
    assert gammas == {"1-2": 0.95, "1-3": 0.99}
    assert ppo.stage_gammas(ppo.PPOConfig(env="mario-world-1")) == {}
    infos = {"world": np.array([1, 1, 1, 1]), "stage": np.array([1, 2, 3, 4])}
    np.testing.assert_allclose(ppo.episode_gammas(infos, 4, gammas, 0.9), [0.9, 0.95, 0.99, 0.9], rtol=1e-6)
    assert ppo.episode_gammas({}, 2, gammas, 0.9).tolist() == pytest.approx([0.9, 0.9])


def test_stage_gamma_discounts_the_named_stages_transitions(tmp_path):
    """A rollout on World 1 with 1-3's discount set apart: each env's transitions carry its stage's."""
    config = ppo.PPOConfig(
        env="mario-world-1", stage_gamma="1-3:0.5", num_envs=6, num_steps=8, total_steps=48,
        device="cpu", env_backend="sync", seed=3,
    )  # fmt: skip
    run = engine.TrainingRun("ppo", config, tmp_path / "run", resume=False, progress=False)
    trainer = ppo.PPOTrainer(config, run)
    seen: list[dict[str, Any]] = []
    booked = run.add_episodes
    run.add_episodes = lambda infos: seen.append(infos) or booked(infos)  # type: ignore[method-assign]
    try:
        rollout = trainer.rollouts[0]
        ppo.collect_rollout(trainer, rollout)
    finally:
        run.close(trainer)
    assert rollout.ends.sum() == 0  # every env stays in its first episode, on one stage
    stages = seen[0]["stage"]
    expected = np.where(stages == 3, 0.5, config.gamma).astype(np.float32)
    assert 3 in stages and set(stages.tolist()) != {3}  # this seed draws 1-3 and other stages
    np.testing.assert_array_equal(rollout.gammas.numpy(), np.broadcast_to(expected, (8, 6)))
