"""PPO's behaviour cloning on found routes (``--set imitate=FILE``): the fit before training and
the demonstration term of every update while ``imitate_coef``'s weight lasts."""

from __future__ import annotations

import copy
import json

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
        ("mario-1-1", ["imitate_coef=0.5"], ["imitate_coef=0.5 needs routes to imitate", "imitate=ROUTES"]),
        ("cartpole", ["imitate_coef=0.5"], ["imitate_coef=0.5", "Mario presets only"]),
    ],
)
def test_a_bad_imitate_setting_is_one_line_before_the_run_exists(env, settings, needles, tmp_path, capsys):
    argv = ["train", env, "--steps", "256", "--device", "cpu", "--no-progress", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    for setting in settings:
        argv += ["--set", setting]
    assert_usage_error(argv, capsys, *needles)
    assert not (tmp_path / "run").exists()


def silent_config() -> ppo.PPOConfig:
    """Zero value and entropy weights (and, with :func:`random_rollout`, zero advantages): PPO's own
    loss has no gradient, so the actor moves only through a term added to it."""
    return ppo.PPOConfig(
        net="nature", num_envs=4, num_steps=8, num_minibatches=2, update_epochs=10, ent_coef=0.0, vf_coef=0.0
    )


def random_rollout(config: ppo.PPOConfig) -> ppo.Rollout:
    """Random (4, 36, 36) frames, zero advantages, the old policy uniform over 5 actions."""
    rollout = ppo.Rollout.empty(
        config.num_steps, config.num_envs, (4, 36, 36), torch.uint8, torch.device("cpu")
    )
    rollout.obs.random_(0, 256)
    rollout.logprobs.fill_(-np.log(5))
    return rollout


def update_a_copy(
    agent: ppo.ActorCritic,
    rollout: ppo.Rollout,
    config: ppo.PPOConfig,
    imitation: ppo.Imitation | None = None,
    kickstart: ppo.Kickstart | None = None,
) -> tuple[ppo.UpdateStats, ppo.ActorCritic]:
    """One ``ppo_update`` of a copy of ``agent`` (Adam at 1e-3, no autocast): its stats and the copy."""
    model = copy.deepcopy(agent)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    no_autocast = torch.autocast("cpu", enabled=False)
    stats = ppo.ppo_update(
        model,
        model,
        optimizer,
        rollout,
        config,
        1e-3,
        np.random.default_rng(0),
        no_autocast,
        imitation,
        kickstart,
    )
    return stats, model


def test_the_imitation_term_alone_moves_the_actor_to_the_route_actions():
    config = silent_config()
    torch.manual_seed(0)
    agent = ppo.ActorCritic(config, (4, 36, 36), num_actions=5)
    rollout = random_rollout(config)
    demos = ppo.DemoTensors(torch.randint(0, 256, (16, 4, 36, 36), dtype=torch.uint8), torch.full((16,), 2))

    def route_probability(model):
        with torch.no_grad():
            logits = model(demos.obs.unsqueeze(0), None, torch.zeros((1, 16), dtype=torch.bool))[0]
        return logits.softmax(-1)[0, :, 2].mean().item()

    before = route_probability(agent)
    results = {}
    for weight in (None, 1.0):
        imitation = None if weight is None else ppo.Imitation(demos, weight)
        stats, model = update_a_copy(agent, rollout, config, imitation=imitation)
        results[weight] = (stats, route_probability(model))
    assert results[None][0].imitation is None and results[None][1] == pytest.approx(before, abs=1e-6)
    assert results[1.0][0].imitation is not None and results[1.0][1] > before + 0.2


def test_the_imitation_term_decays_to_nothing_and_a_resume_within_it_replays_the_routes(
    tmp_path, monkeypatch
):
    path = write_routes(tmp_path, {"actions": "simple", "routes": {"1-1": WALK}})
    config = ppo.PPOConfig(
        env="mario-1-1", net="nature", imitate=path, imitate_epochs=1, imitate_coef=0.5, imitate_steps=64,
        num_envs=2, num_steps=32, num_minibatches=2, update_epochs=1, total_steps=128, device="cpu",
        env_backend="sync", checkpoint_every=64, eval_episodes=1,
    )  # fmt: skip
    replays, fits = [], []
    real_demo_tensors, real_imitate = ppo.demo_tensors, ppo.imitate
    monkeypatch.setattr(ppo, "demo_tensors", lambda *args: replays.append(1) or real_demo_tensors(*args))
    monkeypatch.setattr(ppo, "imitate", lambda *args: fits.append(1) or real_imitate(*args))
    ppo.train(config, tmp_path / "run", progress=False)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    # The update at step 0 has weight 0.5; the one at 64 has reached imitate_steps, weight 0.
    assert ["imitation" in record for record in history] == [True, False]
    assert (replays, fits) == ([1], [1])
    config.total_steps, config.imitate_steps = 192, 1_000
    ppo.train(config, tmp_path / "run", resume=True, progress=False)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert "imitation" in history[-1] and (replays, fits) == ([1, 1], [1])
