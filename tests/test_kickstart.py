"""Kickstarting (``--set kickstart=RUN``): PPO's loss gains a KL to a teacher's policy on the
rollout's states, weighted by ``kickstart_coef`` and decaying to 0 over ``kickstart_steps``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agents import ppo
from tests.test_cli import assert_usage_error
from tests.test_imitate import random_rollout, silent_config, update_a_copy

DATA = Path(__file__).parent / "data" / "runs-99e85bd"
CARTPOLE_TEACHER = DATA / "ppo"  # a PPO CartPole run (hidden 16x16), loadable by today's code


def kl_to_teacher(teacher: ppo.ActorCritic, student: ppo.ActorCritic, obs: torch.Tensor) -> float:
    """Mean KL(teacher || student) over obs (T, N, *obs_shape)."""
    no_autocast = torch.autocast("cpu", enabled=False)
    targets = ppo.teacher_log_probs(teacher, obs, no_autocast)
    own = ppo.teacher_log_probs(student, obs, no_autocast)
    return float((targets.exp() * (targets - own)).sum(-1).mean())


def test_the_kickstart_term_alone_moves_the_actor_to_the_teacher():
    config = silent_config()  # PPO's own loss has no gradient: only the kickstart term moves the actor
    torch.manual_seed(0)
    student = ppo.ActorCritic(config, (4, 36, 36), num_actions=5)
    teacher = ppo.ActorCritic(config, (4, 36, 36), num_actions=5)
    with torch.no_grad():  # a teacher that is sure of its actions, as a trained one is
        teacher.head.actor[0].weight.mul_(20.0)
    rollout = random_rollout(config)
    targets = ppo.teacher_log_probs(teacher, rollout.obs, torch.autocast("cpu", enabled=False))
    assert targets.shape == (8, 4, 5) and torch.allclose(targets.exp().sum(-1), torch.ones(8, 4))
    before = kl_to_teacher(teacher, student, rollout.obs)
    results = {}
    for weight in (None, 1.0):
        kickstart = None if weight is None else ppo.Kickstart(targets, weight)
        stats, model = update_a_copy(student, rollout, config, kickstart=kickstart)
        results[weight] = (stats, kl_to_teacher(teacher, model, rollout.obs))
    assert results[None][0].kickstart is None and results[None][1] == pytest.approx(before, rel=1e-5)
    assert results[1.0][0].kickstart is not None and results[1.0][1] < before / 2


def test_a_run_kickstarts_until_kickstart_steps_and_a_resume_past_them_loads_no_teacher(
    tmp_path, monkeypatch
):
    config = ppo.PPOConfig(
        env="cartpole", num_envs=2, num_steps=32, num_minibatches=2, update_epochs=1, total_steps=256,
        device="cpu", env_backend="sync", checkpoint_every=128, eval_episodes=1,
        kickstart=str(CARTPOLE_TEACHER), kickstart_steps=128,
    )  # fmt: skip
    loads = []
    real = ppo.load_kickstart_teacher
    monkeypatch.setattr(ppo, "load_kickstart_teacher", lambda *args: loads.append(1) or real(*args))
    ppo.train(config, tmp_path / "run", progress=False)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    # Updates at agent steps 0 and 64 have weights 1 and 0.5; at 128 the weight has reached 0.
    assert ["kickstart" in record for record in history] == [True, True, False, False]
    assert all(record["kickstart"] >= 0 for record in history[:2]) and loads == [1]
    config.total_steps = 320
    ppo.train(config, tmp_path / "run", resume=True, progress=False)
    assert loads == [1]


@pytest.mark.parametrize(
    ("env", "settings", "needles"),
    [
        ("cartpole", ["kickstart=no-such-run"], ["kickstart: no-such-run"]),
        ("cartpole", [f"kickstart={DATA / 'dqn'}"], ["kickstart:", "a dqn agent", "must be a PPO agent"]),
        (
            "acrobot",
            [f"kickstart={CARTPOLE_TEACHER}"],
            ["kickstart:", "sees (4,)", "this run sees (6,)", "same env"],
        ),
        ("cartpole", [f"kickstart={CARTPOLE_TEACHER}", "memory=lstm"], ["kickstart needs memory=none"]),
    ],
)
def test_a_bad_kickstart_setting_is_one_line_and_leaves_no_run(env, settings, needles, tmp_path, capsys):
    argv = ["train", env, "--steps", "256", "--device", "cpu", "--no-progress", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    for setting in settings:
        argv += ["--set", setting]
    assert_usage_error(argv, capsys, *needles)
    assert not (tmp_path / "run").exists()
