"""PPO's behaviour cloning on found routes (``--set imitate=FILE``) before training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import envs
from agents import episodes, ppo
from tests.test_cli import assert_usage_error
from tests.test_world1 import ROOT, WALK, write_routes

ROUTES = ROOT / "envs" / "routes"


def test_the_demonstrations_are_the_route_replayed_from_the_stage_start():
    demos = episodes.route_demonstrations("mario-1-1", {"1-1": WALK}, {})
    assert demos.obs.shape == (len(WALK), 4, 84, 84) and demos.obs.dtype == np.uint8
    assert demos.actions.tolist() == WALK
    env = envs.make("mario-1-1")
    try:
        first, _ = env.reset(seed=0)
        second = env.step(WALK[0])[0]
    finally:
        env.close()
    assert np.array_equal(demos.obs[0], first) and np.array_equal(demos.obs[1], second)


def test_a_route_that_loses_its_episode_is_refused():
    # Walking right without a jump meets 1-1's first Goomba after 40 agent steps.
    with pytest.raises(ValueError, match="route of 1-1 loses its episode at action 40 of 60"):
        episodes.route_demonstrations("mario-1-1", {"1-1": [1] * 60}, {})


def test_imitation_fits_the_actor_to_the_route_and_leaves_a_frozen_encoder(tmp_path):
    route = [3] * 12 + [0] * 12  # right+B, then wait: the frames tell the two halves apart
    path = write_routes(tmp_path, {"actions": "simple", "routes": {"1-1": route}})
    config = ppo.PPOConfig(
        env="mario-1-1", net="nature", imitate=path, imitate_epochs=40, freeze_encoder=True
    )
    torch.manual_seed(0)
    agent = ppo.ActorCritic(config, (4, 84, 84), 7)
    agent.encoder.requires_grad_(False)
    encoder_before = {name: value.clone() for name, value in agent.encoder.state_dict().items()}
    critic_before = {name: value.clone() for name, value in agent.head.critic.state_dict().items()}
    demos = episodes.route_demonstrations("mario-1-1", {"1-1": route}, {})
    with torch.no_grad():
        logits = agent(
            torch.as_tensor(demos.obs).unsqueeze(0), None, torch.zeros(1, len(route), dtype=torch.bool)
        )[0]
        untrained = torch.nn.functional.cross_entropy(logits[0], torch.as_tensor(demos.actions)).item()
    loss, accuracy = ppo.imitate(agent, config, torch.device("cpu"))
    assert accuracy == 1.0 and loss < untrained / 2
    assert all(torch.equal(value, encoder_before[name]) for name, value in agent.encoder.state_dict().items())
    assert all(
        torch.equal(value, critic_before[name]) for name, value in agent.head.critic.state_dict().items()
    )


def test_a_run_imitates_once_and_a_resume_does_not_again(tmp_path, monkeypatch):
    path = write_routes(tmp_path, {"actions": "simple", "routes": {"1-1": WALK}})
    config = ppo.PPOConfig(
        env="mario-1-1", net="nature", imitate=path, imitate_epochs=1, num_envs=2, num_steps=32,
        total_steps=64, device="cpu", checkpoint_every=64, eval_episodes=1,
    )  # fmt: skip
    calls = []
    real = ppo.imitate
    monkeypatch.setattr(ppo, "imitate", lambda *args: calls.append(1) or real(*args))
    ppo.train(config, tmp_path / "run", progress=False)
    config.total_steps = 128
    summary = ppo.train(config, tmp_path / "run", resume=True, progress=False)
    assert calls == [1] and (summary["start_step"], summary["steps"]) == (64, 128)


@pytest.mark.parametrize(
    ("env", "settings", "needles"),
    [
        ("cartpole", [f"imitate={ROUTES / '1-1.json'}"], ["imitate=", "Mario presets only"]),
        ("mario-1-1", [f"imitate={ROUTES / '1-1.json'}", "memory=lstm"], ["imitate needs memory=none"]),
        ("mario-1-1", [f"imitate={ROUTES / '1-3.json'}"], ["imitate=", "1-3", "never plays"]),
        ("mario-1-1", ["imitate=no-such-route.json"], ["imitate='no-such-route.json'", "No such file"]),
    ],
)
def test_a_bad_imitate_setting_is_one_line_before_the_run_exists(env, settings, needles, tmp_path, capsys):
    argv = ["train", env, "--steps", "256", "--device", "cpu", "--no-progress", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    for setting in settings:
        argv += ["--set", setting]
    assert_usage_error(argv, capsys, *needles)
    assert not (tmp_path / "run").exists()
