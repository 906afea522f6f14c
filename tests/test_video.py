"""envs/video.py: a Mario rollout to MP4 and GIF, read back with imageio."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

import envs
from envs.video import write_video

STEPS = 24


@pytest.fixture(scope="module")
def rollout() -> tuple[list[np.ndarray], float]:
    """One frame per agent step of Mario walking right, and the frame rate the env declares."""
    env = envs.make("mario-1-1", render_mode="rgb_array")
    env.reset(seed=0)
    frames = [env.render()]
    for _ in range(STEPS - 1):
        env.step(1)
        frames.append(env.render())
    fps = env.metadata["render_fps"]
    env.close()
    return frames, fps


def test_mario_fps_is_nes_rate_over_frame_skip(rollout):
    _, fps = rollout
    assert fps == 60 / 4


def test_mp4_opens_with_every_frame(rollout, tmp_path):
    frames, fps = rollout
    path = write_video(frames, tmp_path / "videos" / "mario.mp4", fps=fps)
    assert path.exists() and path.stat().st_size > 0
    reader = imageio.get_reader(path, format="FFMPEG")
    decoded = [frame for frame in reader]
    assert reader.get_meta_data()["fps"] == pytest.approx(fps)
    reader.close()
    assert len(decoded) == STEPS
    assert decoded[0].shape == (240, 256, 3)
    # Lossy, but the picture is the one recorded: the mean error is small, and the first frame
    # is closer to its own recording than to the last one.
    assert np.abs(decoded[0].astype(int) - frames[0]).mean() < 8
    assert (
        np.abs(decoded[0].astype(int) - frames[0]).mean() < np.abs(decoded[0].astype(int) - frames[-1]).mean()
    )


def test_gif_opens_with_every_frame(rollout, tmp_path):
    frames, fps = rollout
    path = write_video(frames, tmp_path / "mario.gif", fps=fps)
    decoded = imageio.mimread(path)
    assert len(decoded) == STEPS
    assert decoded[0].shape[:2] == (240, 256)


def test_odd_sizes_and_grayscale_frames_are_accepted(tmp_path):
    frames = [np.full((33, 47), value, np.uint8) for value in (0, 128, 255)]
    path = write_video(frames, tmp_path / "odd.mp4", fps=10)
    reader = imageio.get_reader(path, format="FFMPEG")
    decoded = [frame for frame in reader]  # list(reader) asks len(), which is inf for ffmpeg
    reader.close()
    assert len(decoded) == 3 and decoded[0].shape == (34, 48, 3)  # padded to even sizes, not rescaled


@pytest.mark.parametrize(
    ("frames", "path", "fps", "message"),
    [
        ([], "a.mp4", 15, "no frames"),
        ([np.zeros((4, 4, 3), np.uint8)], "a.avi", 15, "unsupported"),
        ([np.zeros((4, 4, 3), np.uint8)], "a.mp4", 0, "fps"),
        ([np.zeros((4, 4, 3), np.float32)], "a.gif", 15, "uint8"),
        ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)], "a.gif", 15, "shape"),
    ],
)
def test_bad_input_is_refused(frames, path, fps, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        write_video(frames, tmp_path / path, fps=fps)


class WalkRight:
    """A stand-in policy for lab.watch: always action 1 (right)."""

    def reset(self, num_envs: int) -> None:
        pass

    def act(self, obs, starts):
        return np.ones(len(obs), dtype=np.int64), {"value": np.zeros(len(obs), dtype=np.float32)}


@pytest.mark.parametrize("small", [False, True])
def test_watch_small_halves_size_frames_and_rate(tmp_path, small):
    from lab.watch import CAPTION_HEIGHT, watch

    summary = watch(WalkRight(), "mario-1-1", tmp_path / "clip.gif", 1, 0, False, max_steps=10, small=small)
    decoded = imageio.mimread(summary["video"])
    height = 240 + CAPTION_HEIGHT
    if small:
        assert len(decoded) == 5 and decoded[0].shape[:2] == (height // 2, 128)
        assert summary["fps"] == pytest.approx(7.5)
    else:
        assert len(decoded) == 10 and decoded[0].shape[:2] == (height, 256)
        assert summary["fps"] == pytest.approx(15.0)


def test_watch_reports_the_same_return_as_eval(tmp_path):
    """Walking right dies at the first Goomba: the episode ends, and watch's return is eval's (the
    game's reward units, not the scaled training reward)."""
    from agents import episodes
    from lab.watch import watch

    summary = watch(WalkRight(), "mario-1-1", None, 1, 0, False, max_steps=400)
    overrides = envs.eval_overrides("mario-1-1")  # watch starts as eval does
    evaluated = episodes.evaluate(
        WalkRight(), lambda n: envs.make_vec("mario-1-1", n, seed=0, **overrides), 1, 0
    )
    assert summary["per_episode"][0]["length"] < 400  # the episode really ended
    assert summary["per_episode"][0]["return"] == pytest.approx(evaluated["per_episode"][0]["return"])


def test_watch_plays_the_stage_asked_for_and_refuses_others(tmp_path, capsys):
    from lab.watch import watch
    from tests.test_cli import assert_usage_error

    for stage in ("1-2", "1-4"):
        summary = watch(WalkRight(), "mario-world-1", None, 2, 0, False, max_steps=5, stage=stage)
        assert [episode["stage"] for episode in summary["per_episode"]] == [stage, stage]
    runs = Path(__file__).parents[1] / "runs"
    run = str(runs / "mario-world-1-distilled")
    assert_usage_error(
        ["watch", run, "--stage", "2-1"], capsys, "--stage 2-1", "choose from: 1-1, 1-2, 1-3, 1-4"
    )
    assert_usage_error(
        ["watch", str(runs / "mario-1-1"), "--stage", "1-1"], capsys, "mario-1-1 has one stage"
    )
    assert_usage_error(
        ["watch", run, "--stage", "1-3", "--explain", "saliency"], capsys, "leave out --explain"
    )


class FirstFrames(WalkRight):
    """Walks right and keeps the first observation of every episode."""

    def __init__(self):
        self.first = []

    def reset(self, num_envs):
        self.fresh = True

    def act(self, obs, starts):
        if self.fresh:
            self.first.append(obs[0].copy())
            self.fresh = False
        return super().act(obs, starts)


def test_watch_starts_as_eval_does_unless_asked_for_the_saved_start():
    from lab.watch import watch

    for deterministic_start in (False, True):
        policy = FirstFrames()
        summary = watch(
            policy, "mario-1-1", None, 4, 0, False, max_steps=3, deterministic_start=deterministic_start
        )
        assert summary["episodes"] == 4
        same = [np.array_equal(policy.first[0], frame) for frame in policy.first[1:]]
        # Random no-ops (0-30, from each episode's seed) move the clouds and the timer between starts.
        assert all(same) == deterministic_start, same
