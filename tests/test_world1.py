"""The mario-world-1 preset: a stage per episode, named in ``info``; evaluation per stage."""

from __future__ import annotations

import numpy as np
import pytest

import envs
from agents import episodes
from envs.mario import parse_stages
from envs.registry import WORLD_1_STAGES


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


def test_only_multi_stage_presets_have_stages():
    assert episodes.preset_stages("mario-world-1") == WORLD_1_STAGES
    assert episodes.preset_stages("mario-1-1") == () and episodes.preset_stages("cartpole") == ()
