"""PPO: GAE against a naive reference, smoke runs (feed-forward and memory), determinism, resume,
no autoreset transition, and a slow CartPole learning run."""

import copy
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from agents import engine, ppo
from core import compute, runs
from core.checkpoint import load_checkpoint


def naive_gae(rewards, values, ends, next_value, gamma, lam):
    """Sum over l of (gamma * lam)^l * delta_{t+l}, truncated at the episode end: the textbook form."""
    steps, num_envs = rewards.shape
    values_after = np.concatenate([values[1:], next_value[None]], axis=0)
    deltas = rewards + gamma * values_after * (1 - ends) - values
    advantages = np.zeros_like(rewards)
    for env in range(num_envs):
        for t in range(steps):
            total, discount = 0.0, 1.0
            for k in range(t, steps):
                total += discount * deltas[k, env]
                if ends[k, env]:
                    break
                discount *= gamma * lam
            advantages[t, env] = total
    return advantages


def test_gae_matches_the_naive_sum():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(9, 3)), rng.normal(size=(9, 3))
    ends = (rng.random((9, 3)) < 0.25).astype(np.float64)
    next_value = rng.normal(size=3)
    fast = ppo.compute_gae(*(torch.tensor(x) for x in (rewards, values, ends, next_value)), 0.97, 0.9)
    np.testing.assert_allclose(
        fast.numpy(), naive_gae(rewards, values, ends, next_value, 0.97, 0.9), atol=1e-10
    )


def small_config(**changes):
    base = dict(
        env="cartpole",
        total_steps=512,
        num_envs=2,
        num_steps=64,
        device="cpu",
        eval_episodes=2,
        checkpoint_every=256,
        update_epochs=2,
        num_minibatches=2,
    )
    return ppo.PPOConfig(**{**base, **changes})


def train(tmp_path, name="run", resume=False, **changes):
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    config = small_config(**changes)
    runs.write_run_config(run_dir, "algo", "ppo", config)
    return ppo.train(config, run_dir, resume=resume, progress=False), run_dir


@pytest.mark.parametrize("memory", ["none", "lstm", "gru", "transformer"])
def test_smoke_run_writes_a_loadable_run(tmp_path, memory):
    summary, run_dir = train(tmp_path, memory=memory, memory_size=16, memory_len=4)
    assert summary["steps"] == 512 and summary["eval_episodes"] == 2
    for key in ("run_dir", "steps", "sps", "episodes", "eval_return_mean"):
        assert key in summary
    assert (run_dir / "metrics.json").exists() and (run_dir / "learning_curve.png").exists()
    assert list(run_dir.glob("events.out.tfevents.*"))
    sidecar, meta = runs.locate_checkpoint(run_dir)
    policy = ppo.load_policy(sidecar, meta, torch.device("cpu"))
    policy.reset(3)
    actions, extras = policy.act(np.zeros((3, 4), dtype=np.float32), np.ones(3, dtype=bool))
    assert actions.shape == (3,) and extras["value"].shape == (3,)


def test_same_seed_gives_identical_first_losses(tmp_path):
    first, run_a = train(tmp_path, "a", seed=5)
    second, run_b = train(tmp_path, "b", seed=5)
    third, run_c = train(tmp_path, "c", seed=6)
    losses = [
        [h["loss"] for h in json.loads((d / "metrics.json").read_text())["history"][:3]]
        for d in (run_a, run_b, run_c)
    ]
    assert len(losses[0]) == 3
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_a_resumed_run_evaluates_at_the_steps_of_an_uninterrupted_one(tmp_path, monkeypatch):
    eval_steps = []
    real_evaluate = engine.TrainingRun.evaluate

    def recording_eval(self, policy, seed, step):
        if seed != self.config.seed + 10_000:  # not the final eval
            eval_steps.append(seed - self.config.seed - 10_000)
        return real_evaluate(self, policy, seed, step)

    monkeypatch.setattr(engine.TrainingRun, "evaluate", recording_eval)
    train(tmp_path, "whole", total_steps=1024, eval_every=192, eval_episodes=1)
    uninterrupted, eval_steps[:] = list(eval_steps), []
    assert uninterrupted == [256, 384, 640, 768, 1024]  # the first update past each multiple of 192
    # Stopped at 384, then resumed: evals at 640, 768 and 1024 (counted from 384: at 640 and 896).
    train(tmp_path, "split", total_steps=384, eval_every=192, eval_episodes=1)
    train(tmp_path, "split", resume=True, total_steps=1024, eval_every=192, eval_episodes=1)
    assert eval_steps == uninterrupted


def test_resume_continues_steps_and_learning_rate_schedule(tmp_path):
    _, run_dir = train(tmp_path, total_steps=512)
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    summary, _ = train(tmp_path, resume=True, total_steps=1024)
    assert summary["steps"] == 1024
    resumed = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["step"] for h in resumed] == [128 * i for i in range(1, 9)]
    assert resumed[:4] == history
    # Checkpoints now sit at 1024, so the run's latest state is the resumed one.
    state, _ = engine.load_training_checkpoint(run_dir)
    assert state["global_step"] == 1024 and state["update"] == 8


class CountingEnv(gym.Env):
    """Reward 1 every step, episodes of 3 steps; counts the steps it really simulates."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    action_space = gym.spaces.Discrete(2)
    real_steps = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(4, np.float32), {}

    def step(self, action):
        CountingEnv.real_steps += 1
        self.t += 1
        return np.full(4, self.t / 3, np.float32), 1.0, self.t >= 3, False, {}


def test_no_autoreset_transition_is_collected(tmp_path, monkeypatch):
    """Every vector step is a real env step with reward 1: no reset transition with reward 0."""
    gym.register("LabTest/Counting-v0", entry_point=CountingEnv)
    CountingEnv.real_steps = 0
    collected_rewards = []
    real_make_vec = envs.make_vec

    def recording_make_vec(*args, **kwargs):
        vec = real_make_vec(*args, **kwargs)
        step = vec.step

        def recording_step(actions):
            result = step(actions)
            collected_rewards.append(np.asarray(result[1]).copy())
            return result

        vec.step = recording_step
        return vec

    monkeypatch.setattr(envs, "make_vec", recording_make_vec)
    no_eval = {"episodes": 0, "return_mean": 0.0, "return_std": 0.0, "length_mean": 0.0}
    monkeypatch.setattr(engine.TrainingRun, "evaluate", lambda *args, **kwargs: no_eval)
    summary, _ = train(tmp_path, env="LabTest/Counting-v0", total_steps=256)
    # Next-step autoreset would swallow one step per episode (reward 0, action ignored).
    assert CountingEnv.real_steps == 256
    assert (np.concatenate(collected_rewards) == 1.0).all()
    assert summary["episodes"] == 2 * (128 // 3)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_ppo_solves_cartpole(tmp_path, overlap):
    """The preset as shipped, and with the overlap lever (one update of policy lag)."""
    preset = envs.get_preset("cartpole")
    config = ppo.PPOConfig(
        **{
            **preset.ppo,
            "env": "cartpole",
            "seed": 1,
            "device": "cpu",
            "eval_episodes": 10,
            "overlap": overlap,
        }
    )
    run_dir = tmp_path / "cartpole"
    run_dir.mkdir()
    summary = ppo.train(config, run_dir, progress=False)
    assert summary["eval_return_mean"] >= 475, summary


# ---- overlap: the update on rollout k runs in a thread while rollout k+1 is collected ----------


@pytest.mark.parametrize("memory", ["none", "gru"])
def test_overlap_run_completes_every_update(tmp_path, memory):
    summary, run_dir = train(tmp_path, overlap=True, memory=memory, memory_size=16)
    assert summary["steps"] == 512
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [128, 256, 384, 512]
    state, _ = engine.load_training_checkpoint(run_dir)
    assert state["global_step"] == 512 and state["update"] == 4


def test_overlap_same_seed_gives_identical_losses(tmp_path):
    losses = []
    for name in ("a", "b"):
        _, run_dir = train(tmp_path, name, seed=3, overlap=True, total_steps=768)
        losses.append([h["loss"] for h in json.loads((run_dir / "metrics.json").read_text())["history"]])
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def _values_of(weights, rollout_obs):
    agent = ppo.ActorCritic(small_config(), (4,), 2)
    agent.load_state_dict(weights)
    with torch.no_grad():
        starts = torch.zeros(rollout_obs.shape[:2], dtype=torch.bool)
        return agent(rollout_obs, None, starts)[1]


@pytest.mark.parametrize("overlap", [False, True])
def test_rollouts_are_collected_with_the_expected_weights(tmp_path, monkeypatch, overlap):
    """Serial: rollout j is collected with the weights after j updates (W_j). Overlap: with W_(j-1),
    the policy lag of one update; the learner's ratio is taken against those same weights."""
    captured = []
    real_slice = ppo.slice_minibatch
    minibatches_per_update = 2 * 2  # update_epochs x num_minibatches of small_config

    def capturing_slice(index, config, rollout):
        if capturing_slice.calls % minibatches_per_update == 0:  # the first minibatch of an update
            captured.append((rollout.obs.clone(), rollout.values.clone()))
        capturing_slice.calls += 1
        return real_slice(index, config, rollout)

    capturing_slice.calls = 0
    monkeypatch.setattr(ppo, "slice_minibatch", capturing_slice)
    _, run_dir = train(tmp_path, overlap=overlap, checkpoint_every=1, keep_checkpoints=10)
    assert len(captured) == 4
    # The checkpoint written after update j holds W_(j+1).
    weights = {}
    for sidecar in sorted((run_dir / "checkpoints").glob("*.json")):
        state, _ = load_checkpoint(sidecar)
        weights[int(state["update"])] = state["model"]
    for j in (2, 3):
        obs, values = captured[j]
        collected_with = j - 1 if overlap else j
        np.testing.assert_allclose(_values_of(weights[collected_with], obs), values, atol=1e-5)
        other = j if overlap else j - 1
        assert not torch.allclose(_values_of(weights[other], obs), values, atol=1e-5)


def _interrupting_make_vec(monkeypatch, error, after_steps):
    real_make_vec = envs.make_vec

    def make_vec(*args, **kwargs):
        vec = real_make_vec(*args, **kwargs)
        step, calls = vec.step, [0]

        def step_then_fail(actions):
            calls[0] += 1
            if calls[0] == after_steps:
                raise error
            return step(actions)

        vec.step = step_then_fail
        return vec

    monkeypatch.setattr(envs, "make_vec", make_vec)


def test_overlap_ctrl_c_waits_for_the_update_in_flight_then_resumes(tmp_path, monkeypatch):
    # Ctrl-C in the middle of rollout 3 (64 steps per rollout): update 2 runs in the thread meanwhile.
    _interrupting_make_vec(monkeypatch, KeyboardInterrupt(), after_steps=2 * 64 + 10)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, overlap=True, total_steps=1024)
    state, _ = engine.load_training_checkpoint(tmp_path / "run")
    assert state["update"] == 2 and state["global_step"] == 256
    monkeypatch.undo()
    summary, run_dir = train(tmp_path, resume=True, overlap=True, total_steps=1024)
    assert summary["steps"] == 1024
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [128 * i for i in range(1, 9)]


def test_overlap_an_error_in_the_learner_thread_stops_training_with_a_checkpoint(tmp_path, monkeypatch):
    real_slice = ppo.slice_minibatch
    calls = []

    def failing_slice(*args):
        calls.append(1)
        if len(calls) == 2 * 4 + 1:  # the first minibatch of the third update
            raise RuntimeError("learner exploded")
        return real_slice(*args)

    monkeypatch.setattr(ppo, "slice_minibatch", failing_slice)
    with pytest.raises(engine.TrainingStopped, match="learner exploded"):
        train(tmp_path, overlap=True, total_steps=1024)
    state, _ = engine.load_training_checkpoint(tmp_path / "run")
    assert state["update"] == 2 and state["global_step"] == 256
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_overlap_persistent_nans_stop_training(tmp_path, monkeypatch):
    _, run_dir = train(tmp_path, total_steps=256, overlap=True)
    monkeypatch.setattr(ppo, "compute_gae", lambda *args: torch.full_like(args[0], float("nan")))
    with pytest.raises(engine.TrainingStopped, match="not finite for 3 updates in a row"):
        train(tmp_path, resume=True, total_steps=2048, overlap=True)
    kept, _ = engine.load_training_checkpoint(run_dir)
    assert kept["global_step"] == 256


# ---- env groups: groups of envs, each with its own workers, stepped in turn ---------------------


class ArgmaxCategorical(torch.distributions.Categorical):
    """Greedy "sampling": the same actions whatever order the envs are served in."""

    def sample(self, sample_shape=()):
        return self.logits.argmax(-1)


@pytest.mark.parametrize(("memory", "overlap"), [("none", False), ("gru", True)])
def test_env_groups_collect_the_same_rollouts_as_one_vector_env(tmp_path, monkeypatch, memory, overlap):
    """Two groups stepped in turn are a different schedule, not different data: with the sampling
    made order-free, every rollout (observations, actions, rewards, episode ends, values) and so
    every update equals the one of a single vector env."""
    monkeypatch.setattr(ppo, "Categorical", ArgmaxCategorical)
    real_slice = ppo.slice_minibatch
    rollouts = {1: [], 2: []}

    def capturing_slice(index, config, rollout):
        if capturing_slice.calls % (2 * 2) == 0:  # the first minibatch of each update
            fields = ("obs", "starts", "actions", "rewards", "ends", "values", "logprobs")
            rollouts[config.env_groups].append({key: getattr(rollout, key).clone() for key in fields})
        capturing_slice.calls += 1
        return real_slice(index, config, rollout)

    monkeypatch.setattr(ppo, "slice_minibatch", capturing_slice)
    for env_groups in (1, 2):
        capturing_slice.calls = 0
        train(
            tmp_path, f"groups{env_groups}", env_groups=env_groups, env_backend="async", num_envs=4,
            num_steps=32, total_steps=512, memory=memory, memory_size=16, overlap=overlap,
        )  # fmt: skip
    assert len(rollouts[1]) == len(rollouts[2]) == 4
    for one, two in zip(rollouts[1], rollouts[2], strict=True):
        for key in ("obs", "starts", "actions", "rewards", "ends"):
            assert torch.equal(one[key], two[key]), key
        for key in ("values", "logprobs"):  # forward passes over 2 envs instead of 4 may round apart
            torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=1e-5)
    assert any(rollout["ends"].any() for rollout in rollouts[1])  # episodes ended in the rollouts compared


def test_env_groups_must_split_the_envs_and_need_worker_processes(tmp_path):
    with pytest.raises(ValueError, match="must split into env_groups=3"):
        train(tmp_path, env_groups=3, env_backend="async", num_envs=4)
    with pytest.raises(ValueError, match="env_groups > 1 needs env_backend=async"):
        train(tmp_path, env_groups=2, num_envs=4)


def test_learning_curve_marks_the_first_clear_and_90_percent(tmp_path):
    history = [
        {"step": 1000 * i, "return_mean": float(i), "x_pos_max_mean": 100.0 * i, "clear_rate": rate}
        for i, rate in enumerate([0.0, 0.0, 0.01, 0.0, 0.5, 0.89, 0.9, 0.95], start=1)
    ]
    assert engine.first_step_reaching(history, "clear_rate", 1e-9) == 3000
    assert engine.first_step_reaching(history, "clear_rate", 0.9) == 7000
    assert engine.first_step_reaching(history, "clear_rate", 0.99) is None
    path = tmp_path / "curve.png"
    engine.plot_learning_curve(history, path, "PPO on mario-1-1")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class TwentyStepEnv(CountingEnv):
    """Episodes of 20 steps with reward 1 per step (return 20)."""

    def step(self, action):
        obs, reward, _, truncated, info = super().step(action)
        return obs, reward, self.t >= 20, truncated, info


def test_resume_keeps_the_recent_episode_window(tmp_path, monkeypatch):
    """A resumed run's first update finishes no episode (they last 20 steps, a rollout 8): its
    recent return must still be the one from before the interruption, not NaN."""
    gym.register("LabTest/Twenty-v0", entry_point=TwentyStepEnv)
    no_eval = {"episodes": 0, "return_mean": 0.0, "return_std": 0.0, "length_mean": 0.0}
    monkeypatch.setattr(engine.TrainingRun, "evaluate", lambda *args, **kwargs: no_eval)
    changes = dict(env="LabTest/Twenty-v0", num_steps=8, checkpoint_every=16, num_minibatches=1)
    _, run_dir = train(tmp_path, total_steps=64, **changes)
    state, _ = engine.load_training_checkpoint(run_dir)
    assert state["episodes"] == 2 and [e["return"] for e in state["recent_episodes"]] == [20.0, 20.0]
    train(tmp_path, resume=True, total_steps=80, **changes)
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert history[-1]["step"] == 80 and history[-1]["return_mean"] == 20.0


@pytest.mark.skipif(
    not compute.native_bf16(torch.device("cpu")),
    reason="needs a CPU with native bf16 (else the copy is fp32)",
)
@pytest.mark.parametrize("memory", ["none", "transformer"])
def test_overlap_bf16_actor_copy_collects_what_autocast_computes(tmp_path, monkeypatch, memory):
    # The collector's bf16 forward copy against an fp32 copy under the same autocast (before the copy
    # existed): the same actions, values and log-probs, so the same losses and final weights. Not with
    # an LSTM or GRU: with overlap and bf16 on the CPU, the first and the second of two identical runs
    # in one process already differ slightly (~1e-5 in the first loss; serial runs do not).
    changes = dict(seed=3, overlap=True, bf16=True, memory=memory, memory_size=16, memory_len=4)
    _, bf16_dir = train(tmp_path, "bf16", **changes)
    bf16_copy = compute.forward_copy
    monkeypatch.setattr(ppo, "forward_copy", lambda module, device, bf16: bf16_copy(module, device, False))
    _, fp32_dir = train(tmp_path, "fp32", **changes)
    runs = (bf16_dir, fp32_dir)
    losses = [[h["loss"] for h in json.loads((run / "metrics.json").read_text())["history"]] for run in runs]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    weights = [engine.load_training_checkpoint(run)[0]["model"] for run in runs]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(sorted((run_dir / "checkpoints").glob("*.safetensors"))[-1])


def test_max_grad_norm_0_means_no_clipping_not_zero_gradients(tmp_path):
    # Before the field was shared with DQN, PPO clipped to a norm of 0: every update was a no-op.
    runs_by_norm = {
        norm: train(tmp_path, f"norm-{norm}", seed=5, max_grad_norm=norm)[1] for norm in (1e-12, 0.0)
    }
    start = final_weights(train(tmp_path, "lr-0", seed=5, learning_rate=0.0)[1])

    def moved(run_dir: Path) -> float:
        weights = final_weights(run_dir)
        return max(
            float((weights[k].float() - start[k].float()).abs().max())
            for k in start
            if k.startswith("model/")
        )

    tiny, unclipped = moved(runs_by_norm[1e-12]), moved(runs_by_norm[0.0])
    assert tiny < unclipped / 100 and unclipped > 1e-3, (tiny, unclipped)


def critic_only_update(
    critic_only: bool, encoder_grads: list[int] | None = None
) -> tuple[ppo.ActorCritic, ppo.ActorCritic, list[float]]:
    """The agent before and after 3 updates on a rollout whose returns are 10 (values start near 0);
    ``encoder_grads`` counts the gradients computed for the encoder's parameters."""
    config = ppo.PPOConfig(
        net="nature", num_envs=4, num_steps=8, num_minibatches=2, update_epochs=4, clip_vloss=False
    )
    torch.manual_seed(0)
    before = ppo.ActorCritic(config, (4, 36, 36), num_actions=5)
    agent = copy.deepcopy(before)
    for parameter in agent.encoder.parameters() if encoder_grads is not None else []:
        parameter.register_hook(lambda grad: encoder_grads.append(1))
    rollout = ppo.Rollout.empty(
        config.num_steps, config.num_envs, (4, 36, 36), torch.uint8, torch.device("cpu")
    )
    rollout.obs.random_(0, 256)
    rollout.logprobs.fill_(-np.log(5))
    rollout.advantages.normal_()
    rollout.returns.fill_(10.0)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    no_autocast = torch.autocast("cpu", enabled=False)
    losses = []
    for update in range(3):
        stats = ppo.ppo_update(
            agent, agent, optimizer, rollout, config, 1e-3, np.random.default_rng(update), no_autocast,
            critic_only=critic_only,
        )  # fmt: skip
        losses.append(float(stats.value_loss.detach()))
    return before, agent, losses


def test_critic_only_updates_move_the_critics_head_alone():
    encoder_grads: list[int] = []
    before, after, losses = critic_only_update(critic_only=True, encoder_grads=encoder_grads)
    critic = {name for name, _ in after.named_parameters() if name.startswith("head.critic.")}
    assert critic
    for (name, old), new in zip(before.named_parameters(), after.parameters(), strict=True):
        assert torch.equal(old, new) == (name not in critic), name
        assert new.requires_grad, name  # what did not step is trainable again afterwards
    assert losses[-1] < losses[0]
    assert encoder_grads == []  # the backward pass stopped at the shared encoder's output
    # Without it the same updates move the encoder and the actor too.
    before, after, _ = critic_only_update(critic_only=False, encoder_grads=encoder_grads)
    assert encoder_grads
    for part in ("encoder", "head.actor"):
        old, new = before.get_submodule(part), after.get_submodule(part)
        assert not all(torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters(), strict=True)), (
            part
        )


def test_critic_only_until_holds_for_the_updates_before_that_agent_step(monkeypatch, tmp_path):
    config = ppo.PPOConfig(
        env="cartpole", num_envs=2, num_steps=32, total_steps=256, critic_only_until=128, device="cpu",
        env_backend="sync", eval_episodes=1,
    )  # fmt: skip
    flags = []
    real = ppo.ppo_update
    monkeypatch.setattr(ppo, "ppo_update", lambda *args: flags.append(args[-1]) or real(*args))
    ppo.train(config, tmp_path / "run", progress=False)
    assert flags == [True, True, False, False]  # updates at agent steps 0, 64, 128, 192


def test_gae_takes_a_discount_per_transition():
    """A (T, N) gamma: each column as if computed alone with its own discount."""
    rng = np.random.default_rng(1)
    rewards, values = rng.normal(size=(9, 3)), rng.normal(size=(9, 3))
    ends = (rng.random((9, 3)) < 0.25).astype(np.float64)
    next_value = rng.normal(size=3)
    column_gammas = np.array([0.9, 0.99, 0.5])
    gammas = torch.tensor(np.broadcast_to(column_gammas, (9, 3)).copy())
    fast = ppo.compute_gae(*(torch.tensor(x) for x in (rewards, values, ends, next_value)), gammas, 0.9)
    for env, gamma in enumerate(column_gammas):
        alone = naive_gae(rewards[:, env : env + 1], values[:, env : env + 1], ends[:, env : env + 1],
                          next_value[env : env + 1], gamma, 0.9)  # fmt: skip
        np.testing.assert_allclose(fast.numpy()[:, env], alone[:, 0], atol=1e-10)
