"""End to end on the CPU, small settings: Mario PPO and DQN train a few thousand steps, checkpoint,
resume, are evaluated and watched to an MP4, all through the `lab` command line."""

import json

import imageio.v2 as imageio
import pytest

from lab.cli import main

SMALL = {
    "ppo": ["--set", "num_steps=64", "--set", "num_minibatches=2", "--set", "update_epochs=1"],
    "dqn": ["--set", "buffer_size=4000", "--set", "learning_starts=500", "--set", "batch_size=16"],
}


def run_json(capsys, argv):
    status = main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 0, out
    return json.loads(out[-1])


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_mario_train_resume_eval_watch(tmp_path, capsys, algo):
    run_dir = tmp_path / f"mario-{algo}"
    common = ["--no-progress", "--json", "--set", "eval_episodes=1", "--set", "checkpoint_every=1000"]
    first = run_json(
        capsys,
        ["train", "mario-1-1", "--algo", algo, "--steps", "1024", "--envs", "2", "--device", "cpu",
         "--run-dir", str(run_dir), *common, *SMALL[algo]],
    )  # fmt: skip
    assert first["steps"] == 1024 and first["sps"] > 0
    assert "eval_clear_rate" in first and "eval_return_mean" in first
    resumed = run_json(
        capsys, ["train", "--resume", str(run_dir), "--steps", "2048", "--no-progress", "--json"]
    )
    assert resumed["steps"] == 2048

    evaluation = run_json(capsys, ["eval", str(run_dir), "--episodes", "2", "--json"])
    assert (
        evaluation["episodes"] == 2
        and 0.0 <= evaluation["clear_rate"] <= 1.0
        and evaluation["x_pos_mean"] > 0
    )

    video = tmp_path / f"{algo}.mp4"
    watched = run_json(capsys, ["watch", str(run_dir), "--out", str(video), "--max-steps", "60", "--json"])
    reader = imageio.get_reader(video, format="FFMPEG")
    frames = [frame for frame in reader]  # list() asks for len(): inf for MP4
    reader.close()
    assert len(frames) == watched["frames"] > 0
    assert frames[0].shape[1] >= 256  # full-resolution NES frames with the caption bar
    assert watched["fps"] == 15  # 60 NES frames/s with a frame skip of 4


@pytest.mark.slow
def test_an_agent_trained_on_right_only_plays_in_the_presets_env(tmp_path, capsys):
    from agents import load_agent

    run_dir = tmp_path / "right-only"
    run_json(
        capsys,
        ["train", "mario-1-1", "--steps", "256", "--envs", "2", "--device", "cpu", "--run-dir", str(run_dir),
         "--no-progress", "--json", "--set", "actions=right_only", "--set", "eval_episodes=1", *SMALL["ppo"]],
    )  # fmt: skip
    agent = load_agent(str(run_dir), "cpu", False, 0)
    assert agent.config.actions == "right_only" and agent.meta["num_actions"] == 5
    evaluation = run_json(capsys, ["eval", str(run_dir), "--episodes", "1", "--sticky", "0.25", "--json"])
    assert evaluation["episodes"] == 1 and evaluation["x_pos_mean"] > 0
