"""Augmentation for pixel agents and pre-trained encoders: the batch shift of nets/augment.py, DrAC
in PPO, DrQ in DQN, and ``init_encoder`` / ``freeze_encoder``."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents import dqn, ppo
from core import runs
from core.checkpoint import load_checkpoint, save_checkpoint
from nets import augment
from tests.test_cli import assert_usage_error

NO_AUTOCAST = torch.autocast("cpu", enabled=False)

# ---------------------------------------------------------------------------------------------
# The shift
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_shift_moves_each_image_by_at_most_the_pad_and_keeps_dtype_and_shape(dtype):
    images = torch.zeros((200, 4, 20, 24), dtype=dtype)
    images[:, :, 10, 12] = 200  # one bright pixel, far enough from the border to move freely
    shifted = augment.random_shift(images, pad=4, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == dtype
    flat = shifted[:, 0].flatten(1).argmax(dim=1)
    rows, cols = flat // 24 - 10, flat % 24 - 12
    assert rows.abs().max() <= 4 and cols.abs().max() <= 4
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 40  # it does move, in many ways
    assert (shifted == shifted[:, :1]).all()  # the 4 frames of a stack move together
    assert (shifted.flatten(1).max(dim=1).values == 200).all()  # the pixel is moved, not blurred


def test_every_offset_occurs_and_the_centre_offset_is_the_identity():
    offsets = augment.shift_offsets(5000, 4, torch.Generator().manual_seed(1))
    assert offsets.min() == 0 and offsets.max() == 8 and len(set(map(tuple, offsets.T.tolist()))) == 81
    images = torch.randint(0, 256, (3, 4, 11, 13), dtype=torch.uint8)
    assert torch.equal(augment.shift_images(images, torch.full((2, 3), 4), 4), images)


def test_the_cpu_slices_and_the_cuda_gather_crop_alike():
    padded = torch.randint(0, 256, (16, 4, 29, 27), dtype=torch.uint8)
    offsets = augment.shift_offsets(16, 4, torch.Generator().manual_seed(2))
    size = torch.Size((21, 19))
    assert torch.equal(
        augment._crop_by_slices(padded, offsets, size), augment._crop_by_gather(padded, offsets, size)
    )


def test_replicate_pad_repeats_the_border_pixels_in_any_dtype():
    images = torch.randint(0, 256, (2, 3, 6, 5), dtype=torch.uint8)
    expected = F.pad(images.float(), (2, 2, 2, 2), mode="replicate")
    assert torch.equal(augment.replicate_pad(images, 2).float(), expected)


def test_affine_jitter_without_jitter_is_the_identity_and_refuses_uint8():
    images = torch.rand((5, 1, 8, 8))
    same = augment.random_affine(
        images, torch.Generator().manual_seed(0), max_degrees=0.0, scale=(1.0, 1.0), max_translate=0.0
    )
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="float"):
        augment.random_affine(images.mul(255).byte(), torch.Generator())


# ---------------------------------------------------------------------------------------------
# DrAC (PPO)
# ---------------------------------------------------------------------------------------------


def image_agent(**changes):
    config = ppo.PPOConfig(
        net="nature", num_envs=4, num_steps=3, num_minibatches=1, update_epochs=1, **changes
    )
    torch.manual_seed(0)
    return config, ppo.ActorCritic(config, (4, 36, 36), num_actions=5)


def test_drac_loss_is_zero_when_the_augmentation_is_the_identity():
    _, agent = image_agent()
    obs = torch.randint(0, 256, (1, 6, 4, 36, 36), dtype=torch.uint8)
    starts = torch.zeros((1, 6), dtype=torch.bool)
    logits, values, _ = agent(obs, None, starts)
    identity = ppo.drac_loss(agent, obs.clone(), None, starts, logits, values, NO_AUTOCAST)
    assert identity.item() == 0.0
    identity.backward()
    # The KL's gradient is softmax(q) * sum(p) - p: zero up to the rounding of sum(p) = 1.
    assert max(p.grad.abs().max().item() for p in agent.parameters() if p.grad is not None) < 1e-6
    offsets = augment.shift_offsets(6, 4, torch.Generator().manual_seed(0))
    shifted = augment.shift_images(obs[0], offsets, 4)[None]
    assert ppo.drac_loss(agent, shifted, None, starts, logits, values, NO_AUTOCAST).item() > 0


def random_rollout(config, obs_shape):
    generator = torch.Generator().manual_seed(3)
    rollout = ppo.Rollout.empty(
        config.num_steps, config.num_envs, obs_shape, torch.uint8, torch.device("cpu")
    )
    rollout.obs.copy_(torch.randint(0, 256, rollout.obs.shape, dtype=torch.uint8, generator=generator))
    rollout.actions.copy_(torch.randint(0, 5, rollout.actions.shape, generator=generator))
    rollout.logprobs.fill_(-np.log(5))
    rollout.advantages.copy_(torch.randn(rollout.advantages.shape, generator=generator))
    rollout.returns.copy_(torch.randn(rollout.returns.shape, generator=generator))
    return rollout


def update_once(config, agent):
    agent = copy.deepcopy(agent)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    rollout = random_rollout(config, (4, 36, 36))
    stats = ppo.ppo_update(
        agent, agent, optimizer, rollout, config, 1e-3, np.random.default_rng(0), NO_AUTOCAST
    )
    return stats, agent.state_dict()


def test_the_ppo_ratio_is_computed_on_the_original_frames():
    # With the regulariser weighted 0, the update with augmentation is the update without it:
    # nothing of the shifted frames reaches the clipped objective.
    config, agent = image_agent()
    plain, plain_weights = update_once(config, agent)
    silent, silent_weights = update_once(
        ppo.PPOConfig(**{**vars(config), "augment": "shift", "drac_coef": 0.0}), agent
    )
    assert plain.drac is None and silent.drac.item() > 0
    assert silent.policy_loss.item() == plain.policy_loss.item()
    assert all(torch.equal(plain_weights[key], silent_weights[key]) for key in plain_weights)
    _, regularised = update_once(ppo.PPOConfig(**{**vars(config), "augment": "shift"}), agent)
    assert any(not torch.equal(plain_weights[key], regularised[key]) for key in plain_weights)


@pytest.mark.parametrize(("memory", "shape"), [("none", (1, 6)), ("lstm", (3, 2))])
def test_drac_sees_its_share_of_the_minibatch_whole_sequences_with_memory(monkeypatch, memory, shape):
    seen = []
    real_drac_loss = ppo.drac_loss

    def recording(forward, shifted, state, starts, logits, values, autocast):
        seen.append((tuple(shifted.shape), tuple(starts.shape), tuple(logits.shape[:2])))
        return real_drac_loss(forward, shifted, state, starts, logits, values, autocast)

    monkeypatch.setattr(ppo, "drac_loss", recording)
    config, agent = image_agent(augment="shift", drac_share=0.5, memory=memory)
    stats, _ = update_once(config, agent)  # one minibatch: 12 single steps, or 4 sequences of 3
    assert seen == [((*shape, 4, 36, 36), shape, shape)] and stats.drac.item() > 0


def mario_ppo_config(**changes):
    values = dict(
        env="mario-1-1", net="nature", total_steps=128, num_envs=2, num_steps=32, num_minibatches=2,
        update_epochs=1, env_backend="sync", device="cpu", eval_episodes=1, checkpoint_every=10**6,
    )  # fmt: skip
    return ppo.PPOConfig(**{**values, **changes})


def test_smoke_ppo_with_shift_augmentation_logs_drac(tmp_path):
    config = mario_ppo_config(augment="shift")
    summary = ppo.train(config, tmp_path, progress=False)
    assert summary["steps"] == 128
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert len(history) == 2 and all(record["drac"] >= 0 for record in history)


# ---------------------------------------------------------------------------------------------
# DrQ (DQN)
# ---------------------------------------------------------------------------------------------


def test_smoke_dqn_shifts_each_sampled_observation_and_next_observation(tmp_path, monkeypatch):
    calls = []
    real_shift = dqn.random_shift

    def recording_shift(images, pad, generator):
        shifted = real_shift(images, pad, generator)
        calls.append((images.shape, images.dtype, bool(torch.equal(shifted, images))))
        return shifted

    monkeypatch.setattr(dqn, "random_shift", recording_shift)
    config = dqn.DQNConfig(
        env="mario-1-1", net="nature", total_steps=72, learning_starts=64, buffer_size=200, batch_size=8,
        train_frequency=4, env_backend="sync", device="cpu", eval_every=0, eval_episodes=1,
        keep_best=False, log_every=32, checkpoint_every=10**6, augment="shift",
    )  # fmt: skip
    dqn.train(config, tmp_path, progress=False)
    assert len(calls) == 2 * 2  # two gradient steps (at 68 and 72), each s and s'
    assert all(shape == (8, 4, 84, 84) and dtype == torch.uint8 for shape, dtype, _ in calls)
    assert not all(same for _, _, same in calls)


# ---------------------------------------------------------------------------------------------
# A pre-trained encoder
# ---------------------------------------------------------------------------------------------


def pretrained_run(tmp_path, encoder, extra=None):
    """A `lab fit`-like run whose model holds ``encoder`` under ``encoder.`` plus other tensors."""
    run_dir = tmp_path / "pretrained"
    model = {f"encoder.{key}": value.clone().normal_() for key, value in encoder.state_dict().items()}
    model.update(extra or {})
    save_checkpoint(run_dir / "checkpoints" / "final", {"model": model, "epoch": 1}, {"kind": "task"})
    return run_dir, model


def test_init_encoder_loads_exactly_the_encoders_tensors(tmp_path):
    config = ppo.PPOConfig()
    agent = ppo.ActorCritic(config, (4,), 2)
    before = copy.deepcopy(agent.state_dict())
    # The source also holds a head and a projector of fitting shapes: they must not be read.
    head = {f"head.{key}": value + 1.0 for key, value in agent.head.state_dict().items()}
    run_dir, source = pretrained_run(tmp_path, agent.encoder, {**head, "projector.weight": torch.ones(3, 3)})
    ppo.setup_network(ppo.PPOConfig(init_encoder=str(run_dir)), agent, [agent.encoder], (4,), resumed=False)
    after = agent.state_dict()
    for key, value in after.items():
        expected = source[key] if key.startswith("encoder.") else before[key]
        assert torch.equal(value, expected), key
    assert any(key.startswith("encoder.") for key in after)


def test_a_resumed_run_keeps_its_own_encoder(tmp_path):
    agent = ppo.ActorCritic(ppo.PPOConfig(), (4,), 2)
    before = copy.deepcopy(agent.state_dict())
    run_dir, _ = pretrained_run(tmp_path, agent.encoder)
    ppo.setup_network(ppo.PPOConfig(init_encoder=str(run_dir)), agent, [agent.encoder], (4,), resumed=True)
    assert all(torch.equal(before[key], value) for key, value in agent.state_dict().items())


def test_init_encoder_refuses_another_shape_in_one_line(tmp_path, capsys):
    wider = ppo.ActorCritic(ppo.PPOConfig(hidden=(32, 32)), (4,), 2)
    run_dir, _ = pretrained_run(tmp_path, wider.encoder)
    line = assert_usage_error(
        ["train", "cartpole", "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run"), "--set", f"init_encoder={run_dir}"],
        capsys, "init_encoder", "(32, 4)", "(64, 4)",
    )  # fmt: skip
    assert "shape" in line


def test_init_encoder_refuses_a_path_without_a_checkpoint(tmp_path, capsys):
    assert_usage_error(
        ["train", "cartpole", "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run"), "--set", f"init_encoder={tmp_path / 'nothing'}"],
        capsys, "nothing",
    )  # fmt: skip


def test_augment_needs_image_observations(tmp_path, capsys):
    assert_usage_error(
        ["train", "cartpole", "--steps", "256", "--device", "cpu", "--no-progress",
         "--run-dir", str(tmp_path / "run"), "--set", "augment=shift"],
        capsys, "augment=shift", "image",
    )  # fmt: skip


def short_cartpole_config(algo: str, **fields):
    """A 512-step CartPole config of ``algo`` that learns a little: PPO two updates, DQN from step 128."""
    module = ppo if algo == "ppo" else dqn
    if algo == "ppo":
        steps = {"num_envs": 4, "num_steps": 64}
    else:
        steps = {"learning_starts": 128, "eval_every": 0, "keep_best": False, "log_every": 128}
    return module.CONFIG(
        env="cartpole",
        device="cpu",
        total_steps=512,
        eval_episodes=1,
        checkpoint_every=10**6,
        **steps,
        **fields,
    )


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_a_frozen_pretrained_encoder_stays_as_loaded_while_the_head_learns(tmp_path, algo):
    module = ppo if algo == "ppo" else dqn
    base = short_cartpole_config(algo)
    network = ppo.ActorCritic(base, (4,), 2) if algo == "ppo" else dqn.QNetwork(base, (4,), 2)
    run_dir, source = pretrained_run(tmp_path, network.encoder)
    config = short_cartpole_config(algo, init_encoder=str(run_dir), freeze_encoder=True)
    (tmp_path / "agent").mkdir()
    summary = module.train(config, tmp_path / "agent", progress=False)
    assert summary["steps"] == 512
    state, _ = load_checkpoint(runs.locate_checkpoint(tmp_path / "agent")[0])
    model = state["model"]
    assert all(torch.equal(model[key], value) for key, value in source.items())
    losses = [record.get("loss", record.get("td_loss")) for record in summary_history(tmp_path / "agent")]
    assert len(set(losses)) > 1  # the rest of the network did learn


def summary_history(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["history"]
