"""DQN: smoke run with checkpoint and policy, resume, determinism, no autoreset transition, learning."""

from __future__ import annotations

import dataclasses
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
import nets
from agents import dqn, engine, episodes
from agents.buffers import ReplayBuffer
from core import compute, runs
from core.checkpoint import load_checkpoint
from core.config import validate

TINY = dict(
    device="cpu", hidden=(32, 32), total_steps=600, num_envs=2, buffer_size=2_000, batch_size=32,
    learning_starts=200, train_frequency=4, gradient_steps=1, target_network_frequency=50,
    exploration_fraction=0.5, log_every=100, eval_episodes=2, checkpoint_every=10_000,
)  # fmt: skip


def tiny(**changes) -> dqn.DQNConfig:
    return dqn.DQNConfig(**{**TINY, **changes})


def test_defaults_validate_and_round_trip_through_a_dict():
    config = dqn.DQNConfig()
    validate(config)
    assert dqn.config_from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_smoke_run_writes_a_checkpoint_that_loads_as_a_greedy_policy(tmp_path):
    summary = dqn.train(tiny(n_step=3, prioritized=True), tmp_path, progress=False)
    assert summary["steps"] == 600 and summary["algo"] == "dqn" and summary["env"] == "cartpole"
    for key in (
        "run_dir",
        "sps",
        "episodes",
        "skipped_updates",
        "eval_episodes",
        "eval_return_mean",
        "eval_return_std",
    ):
        assert key in summary
    assert summary["eval_episodes"] == 2 and summary["skipped_updates"] == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == list(range(100, 601, 100))
    assert math.isfinite(metrics["history"][-1]["td_loss"])
    assert (tmp_path / "learning_curve.png").exists()

    sidecar, meta = runs.locate_checkpoint(tmp_path)
    assert meta["algo"] == "dqn" and meta["obs_shape"] == [4] and meta["num_actions"] == 2
    state, _ = load_checkpoint(sidecar)
    assert set(state) >= {"model", "target", "optimizer", "rng", "global_step"}
    policy = dqn.load_policy(sidecar, meta, compute.resolve_device("cpu"))
    policy.reset(3)
    obs = np.zeros((3, 4), dtype=np.float32)
    actions, extras = policy.act(obs, np.ones(3, dtype=bool))
    assert actions.shape == (3,) and set(actions.tolist()) <= {0, 1}
    assert extras["value"].shape == (3,) and np.all(np.isfinite(extras["value"]))


@pytest.mark.parametrize("overlap", [False, True])
def test_resume_continues_step_count_and_epsilon(tmp_path, monkeypatch, overlap):
    config = tiny(save_buffer=True, exploration_fraction=1.0, overlap=overlap)
    real_progress = engine.RunLogger.progress

    def interrupt_at_400(self, step, episodes, sps):
        real_progress(self, step, episodes, sps)
        if step >= 400:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine.RunLogger, "progress", interrupt_at_400)
    with pytest.raises(KeyboardInterrupt):
        dqn.train(config, tmp_path, progress=False)
    monkeypatch.setattr(engine.RunLogger, "progress", real_progress)
    state, _ = load_checkpoint(runs.locate_checkpoint(tmp_path)[0])
    assert state["global_step"] == 400
    assert (tmp_path / "checkpoints" / dqn.BUFFER_FILE).exists()

    loaded_steps = []
    real_load = ReplayBuffer.load
    monkeypatch.setattr(
        ReplayBuffer, "load", lambda self, path: loaded_steps.append(real_load(self, path)) or 400
    )
    summary = dqn.train(config, tmp_path, resume=True, progress=False)
    assert loaded_steps == [400]  # the replay memory came back with the checkpoint
    assert summary["steps"] == 600
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(100, 601, 100))  # continues, no restart, no repeat
    for record in history:  # epsilon is the same function of the step before and after the resume
        expected = dqn.linear_schedule(config.start_e, config.end_e, config.total_steps, record["step"] - 2)
        assert record["epsilon"] == pytest.approx(expected)

    # Raising the total on resume continues the schedule of the run's first start.
    longer = dataclasses.replace(config, total_steps=800)
    summary = dqn.train(longer, tmp_path, resume=True, progress=False)
    assert summary["steps"] == 800
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert history[-1]["step"] == 800 and history[-1]["epsilon"] == pytest.approx(config.end_e)


def test_a_resumed_run_evaluates_at_the_steps_of_an_uninterrupted_one(tmp_path, monkeypatch):
    eval_steps = []
    real_evaluate = engine.TrainingRun.evaluate

    def recording_eval(self, policy, seed, step):
        if seed != self.config.seed + 10_000:  # periodic evals only, not the final one
            eval_steps.append(step)
        return real_evaluate(self, policy, seed, step)

    monkeypatch.setattr(engine.TrainingRun, "evaluate", recording_eval)
    config = tiny(eval_every=150, eval_episodes=1)
    dqn.train(config, tmp_path / "whole", progress=False)
    uninterrupted, eval_steps[:] = list(eval_steps), []
    assert uninterrupted == [150, 300, 450, 600]
    # Stopped at 400 (not an eval step), then resumed: evals at 450 and 600, not 550 (400 + 150).
    dqn.train(dataclasses.replace(config, total_steps=400), tmp_path / "split", progress=False)
    dqn.train(config, tmp_path / "split", resume=True, progress=False)
    assert eval_steps == [150, 300, 400, 450, 600]  # 400: keep_best's eval of the first part's end


def first_losses(tmp_path, seed: int, backend: str = "sync", overlap: bool = False) -> list[float]:
    config = tiny(
        seed=seed, total_steps=260, log_every=2, learning_starts=200, train_frequency=2, env_backend=backend,
        overlap=overlap,
    )  # fmt: skip
    dqn.train(config, tmp_path, progress=False)
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    losses = [h["td_loss"] for h in history if h["td_loss"] is not None]  # NaN (no phase yet) is null
    assert len(losses) >= 3
    return losses[:3]


def test_same_seed_gives_identical_first_losses_on_cpu(tmp_path):
    first = first_losses(tmp_path / "a", seed=3)
    assert first_losses(tmp_path / "b", seed=3) == first
    assert first_losses(tmp_path / "c", seed=4) != first
    # Stepping the envs in workers, overlapped with learning, changes nothing that is learnt.
    assert first_losses(tmp_path / "d", seed=3, backend="async") == first


def test_overlap_is_deterministic_and_starts_from_the_same_batch_and_weights(tmp_path):
    serial = first_losses(tmp_path / "a", seed=3)
    overlapped = first_losses(tmp_path / "b", seed=3, overlap=True)
    assert first_losses(tmp_path / "c", seed=3, overlap=True) == overlapped
    # The first phase trains on the same batch from the same weights (the learner thread draws nothing
    # itself: batches are drawn in the main thread, in the same order).
    assert overlapped[0] == serial[0]


def test_overlap_an_error_in_the_learner_thread_stops_training_with_a_checkpoint(tmp_path, monkeypatch):
    real_loss = dqn.F.smooth_l1_loss
    calls = []

    def failing_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 50:
            raise RuntimeError("learner exploded")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(dqn.F, "smooth_l1_loss", failing_loss)
    with pytest.raises(engine.TrainingStopped, match="learner exploded; a checkpoint was saved"):
        dqn.train(tiny(overlap=True), tmp_path, progress=False)
    state, _ = load_checkpoint(runs.locate_checkpoint(tmp_path)[0])
    assert all(bool(np.isfinite(w.numpy()).all()) for w in state["model"].values())


def test_overlap_does_not_combine_with_prioritized_replay(tmp_path):
    with pytest.raises(ValueError, match="overlap=true does not combine with prioritized=true"):
        dqn.train(tiny(overlap=True, prioritized=True), tmp_path, progress=False)


@pytest.mark.parametrize("backend", ["sync", "async"])
def test_no_autoreset_transition_is_stored_or_trained_on(backend, tmp_path, monkeypatch):
    # Short episodes (truncated at 15 steps, and CartPole's own terminations) in 4 envs; async
    # steps the envs while the gradient steps run (step_async / step_wait).
    real_make_vec = envs.make_vec
    monkeypatch.setattr(envs, "make_vec", lambda *a, **k: real_make_vec(*a, **{**k, "max_episode_steps": 15}))
    sampled, buffers = [], []
    real_sample, real_add = ReplayBuffer.sample, ReplayBuffer.add

    def spy_sample(self, *args, **kwargs):
        batch = real_sample(self, *args, **kwargs)
        sampled.append(batch)
        return batch

    def spy_add(self, obs, next_obs, actions, rewards, terminations, truncations):
        buffers.append(self)
        return real_add(self, obs, next_obs, actions, rewards, terminations, truncations)

    monkeypatch.setattr(ReplayBuffer, "sample", spy_sample)
    monkeypatch.setattr(ReplayBuffer, "add", spy_add)
    config = tiny(num_envs=4, total_steps=1_000, n_step=1, env_backend=backend)
    summary = dqn.train(config, tmp_path, progress=False)
    assert summary["episodes"] > 60 and sampled

    stored = buffers[-1].transitions(np.flatnonzero(buffers[-1].ready))
    for batch in [*sampled, stored]:
        # CartPole's Euler step: x' = x + 0.02 x_dot, theta' = theta + 0.02 theta_dot. A reset
        # observation as next_obs would break it (it is drawn afresh near 0).
        np.testing.assert_allclose(batch.next_obs[:, 0], batch.obs[:, 0] + 0.02 * batch.obs[:, 1], atol=1e-5)
        np.testing.assert_allclose(batch.next_obs[:, 2], batch.obs[:, 2] + 0.02 * batch.obs[:, 3], atol=1e-5)
        ended = batch.discounts == 0  # terminated: the next obs is the failing state itself
        assert np.all((np.abs(batch.next_obs[ended, 0]) > 2.4) | (np.abs(batch.next_obs[ended, 2]) > 0.2095))
    assert any(np.any(b.discounts == 0) for b in sampled)


class BlinkingSquare(gym.Env):
    """32x32 RGB frames with a square that is lit or not; action 1 is rewarded when it is lit."""

    observation_space = gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def _frame(self) -> np.ndarray:
        frame = self.np_random.integers(0, 40, (32, 32, 3), dtype=np.uint8)
        frame[8:24, 8:24] = 255 if self.lit else 0
        return frame

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.lit = 0, bool(self.np_random.random() < 0.5)
        return self._frame(), {}

    def step(self, action):
        reward = float(action == 1 and self.lit)
        self.t, self.lit = self.t + 1, bool(self.np_random.random() < 0.5)
        return self._frame(), reward, self.t >= 12, False, {}


def test_pixel_observations_train_with_each_frame_stored_once(tmp_path):
    if "LabTestBlinkingSquare-v0" not in gym.registry:
        gym.register("LabTestBlinkingSquare-v0", entry_point=BlinkingSquare)
    config = tiny(env="LabTestBlinkingSquare-v0", total_steps=120, learning_starts=40, batch_size=8,
                  buffer_size=400, n_step=2, log_every=40)  # fmt: skip
    buffers = []
    real_add = ReplayBuffer.add
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ReplayBuffer, "add", lambda self, *a: buffers.append(self) or real_add(self, *a))
        summary = dqn.train(config, tmp_path, progress=False)
    assert summary["steps"] == 120
    buffer = buffers[-1]
    assert buffer.obs_shape == (4, 84, 84) and buffer.frames.shape[2:] == (1, 84, 84)  # one frame per slot
    _, meta = runs.locate_checkpoint(tmp_path)
    assert meta["obs_shape"] == [4, 84, 84]


def test_keep_best_ends_with_the_weights_of_the_best_greedy_eval(tmp_path, monkeypatch):
    scripted = iter([10.0, 50.0, 20.0, 30.0, 40.0, 45.0, 1.0])  # evals at steps 100..600, then the final one
    snapshots = []

    def fake_eval(self, policy, seed, step):
        snapshots.append({k: v.detach().clone() for k, v in policy.q_network.state_dict().items()})
        return episodes.summarize_episodes([{"return": next(scripted), "length": 10.0}])

    monkeypatch.setattr(engine.TrainingRun, "evaluate", fake_eval)
    summary = dqn.train(tiny(eval_every=100, keep_best=True), tmp_path, progress=False)
    assert len(snapshots) == 7
    assert summary["best_eval_step"] == 200 and summary["best_eval_return"] == 50.0
    assert summary["eval_return_mean"] == 1.0  # the final eval is a fresh one, of the kept weights
    state, _ = load_checkpoint(runs.locate_checkpoint(tmp_path)[0])
    for key, value in snapshots[1].items():
        assert np.array_equal(state["model"][key].numpy(), value.numpy())
        assert np.array_equal(snapshots[6][key].numpy(), value.numpy())
        assert np.array_equal(state["target"][key].numpy(), value.numpy())
    assert not all(np.array_equal(snapshots[5][k].numpy(), v.numpy()) for k, v in snapshots[1].items())


def test_non_finite_losses_skip_the_update_and_are_counted(tmp_path, monkeypatch):
    real_sample = ReplayBuffer.sample
    calls = []

    def poisoned(self, *args, **kwargs):
        batch = real_sample(self, *args, **kwargs)
        calls.append(1)
        return batch._replace(returns=np.full_like(batch.returns, np.nan)) if len(calls) % 2 else batch

    monkeypatch.setattr(ReplayBuffer, "sample", poisoned)
    summary = dqn.train(tiny(total_steps=400), tmp_path, progress=False)
    assert summary["skipped_updates"] == (len(calls) + 1) // 2 > 0
    state, _ = load_checkpoint(runs.locate_checkpoint(tmp_path)[0])
    assert all(bool(np.isfinite(w.numpy()).all()) for w in state["model"].values())


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_cartpole_reaches_475_greedy(tmp_path, overlap):
    """The preset as shipped, and with the learner thread (acting one training phase behind)."""
    summary = dqn.train(dqn.DQNConfig(seed=1, device="cpu", overlap=overlap), tmp_path, progress=False)
    assert summary["eval_return_mean"] >= 475, summary


NATIVE_BF16 = compute.native_bf16(torch.device("cpu"))


@pytest.mark.parametrize("net", ["mlp", "nature", "impala"])
def test_forward_copy_computes_exactly_what_autocast_computes_and_refreshes(net):
    shape = (8,) if net == "mlp" else (4, 84, 84)
    if net == "mlp":
        module = nets.build("mlp", in_shape=shape, hidden=(64, 64))
    else:  # an encoder and a head, as in a QNetwork
        module = torch.nn.Sequential(nets.build(net, in_shape=shape, out_dim=64), torch.nn.Linear(64, 5))
    cpu = torch.device("cpu")
    copy_ = compute.forward_copy(module, cpu, bf16=True)
    dtypes = {p.dtype for p in copy_.parameters()}
    assert dtypes == ({torch.bfloat16} if NATIVE_BF16 else {torch.float32})
    assert all(p.dtype == torch.float32 for p in module.parameters())  # the original is untouched
    x = torch.randint(0, 256, (3, *shape), dtype=torch.uint8) if net != "mlp" else torch.randn(3, *shape)
    with torch.no_grad():
        for _ in range(2):
            with compute.bf16_autocast(cpu, True):
                assert torch.equal(copy_(x), module(x))
            for parameter in module.parameters():  # the learner moves on; a refresh follows it
                parameter.add_(0.01 * torch.randn_like(parameter))
            copy_.load_state_dict(module.state_dict())
    assert not any(p.requires_grad for p in copy_.parameters())
    assert {p.dtype for p in compute.forward_copy(module, cpu, bf16=False).parameters()} == {torch.float32}


@pytest.mark.skipif(not NATIVE_BF16, reason="needs a CPU with native bf16 (else the copies are fp32 anyway)")
@pytest.mark.parametrize("overlap", [False, True])
def test_bf16_forward_copies_change_nothing_that_is_learnt(tmp_path, monkeypatch, overlap):
    # Against the computation before the copies existed, under the same bf16 autocast: serial, the fp32
    # target network itself computes the targets (so a copy that missed a target update would differ:
    # they come every 50 steps); with overlap, the actor is an fp32 copy. The same actions and targets
    # give the same final weights.
    # Squared TD errors: the Huber gradient of errors beyond 1 is their sign, blind to small target changes.
    config = tiny(
        seed=5, bf16=True, overlap=overlap, total_steps=400, eval_episodes=1, keep_best=False, loss="mse"
    )
    dqn.train(config, tmp_path / "bf16", progress=False)
    bf16_copy = compute.forward_copy
    before = (
        (lambda module, device, bf16: bf16_copy(module, device, False))
        if overlap
        else (lambda module, *_: module)
    )
    monkeypatch.setattr(dqn, "forward_copy", before)
    dqn.train(config, tmp_path / "fp32", progress=False)
    weights = [engine.load_training_checkpoint(tmp_path / run)[0]["model"] for run in ("bf16", "fp32")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
