"""Tests of compress/: distillation, pruning, int8 quantisation and measurement, on small nets."""

from __future__ import annotations

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import compress
import nets
from compress import distill, prune, quantize


class ActorCritic(nn.Module):
    """NatureCNN + ActorCriticHead, as the PPO agent builds them: obs (B, C, H, W) -> (logits (B, A), value (B,))."""

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (4, 36, 36),
        channels: tuple[int, int, int] = (8, 16, 16),
        out_dim: int = 32,
    ) -> None:
        super().__init__()
        self.encoder = nets.NatureCNN(in_shape, out_dim=out_dim, channels=channels)
        self.head = nets.ActorCriticHead(out_dim, 5)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.encoder(obs))


class QNet(nn.Module):
    """NatureCNN + QHead (a DQN's Q-network): obs (B, C, H, W) -> Q-values (B, A)."""

    def __init__(self, in_shape: tuple[int, int, int] = (4, 36, 36)) -> None:
        super().__init__()
        self.encoder = nets.NatureCNN(in_shape, out_dim=64, channels=(8, 16, 16))
        self.head = nets.QHead(64, 5, hidden=32)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(obs))


def frames(n: int, shape: tuple[int, ...] = (4, 36, 36), seed: int = 0) -> torch.Tensor:
    """(n, *shape) uint8 frames with some structure: smooth blobs plus noise, like a game screen."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (n, shape[0], 6, 6), generator=g).float()
    smooth = nn.functional.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    noise = torch.randint(-20, 21, (n, *shape), generator=g).float()
    return (smooth + noise).clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------


def test_distillation_loss_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(16, 7)
    for temperature in (0.5, 1.0, 4.0):
        assert distill.distillation_loss(logits, logits.clone(), temperature).item() == pytest.approx(
            0.0, abs=1e-6
        )
        # Softmax ignores a constant shift per row, so shifted logits are the same policy.
        shifted = logits + torch.randn(16, 1)
        assert distill.distillation_loss(shifted, logits, temperature).item() == pytest.approx(0.0, abs=1e-6)
        assert distill.distillation_loss(torch.randn(16, 7), logits, temperature).item() > 1e-3
    plain = distill.distillation_loss(torch.randn(4, 3), logits[:4, :3], 2.0)
    assert plain.item() > 0


def test_distillation_loss_t2_scaling_and_direction():
    student, teacher = torch.randn(8, 4), torch.randn(8, 4)
    loss = distill.distillation_loss(student, teacher, 3.0)
    scaled = distill.distillation_loss(student, teacher, 3.0, scale_t2=True)
    assert scaled.item() == pytest.approx(9.0 * loss.item(), rel=1e-5)
    # KL(teacher || student) with the teacher's distribution first, computed by hand.
    p, log_q = torch.softmax(teacher / 3.0, -1), torch.log_softmax(student / 3.0, -1)
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dqn_teacher_targets():
    q = torch.tensor([[1.0, 1.02, 0.5], [3.0, -1.0, 2.9]])
    targets = distill.teacher_targets_from_q(q, temperature=0.01)
    assert torch.allclose(targets.sum(-1), torch.ones(2))
    assert targets.argmax(-1).tolist() == [1, 0]
    assert targets[1, 0] > 0.99  # a margin of 0.1 at tau = 0.01 is a near-certain choice
    logits = distill.teacher_logits_from_q(q, temperature=0.01)
    assert torch.allclose(torch.softmax(logits, -1), targets, atol=1e-6)
    assert distill.distillation_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)


def test_beta_decays_to_zero():
    values = [distill.beta(i, decay=0.5, zero_after=6) for i in range(10)]
    assert values[0] == 1.0
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[6:] == [0.0] * 4
    with pytest.raises(ValueError, match="decay"):
        distill.beta(0, decay=1.0)


def test_distill_step_student_matches_teacher_greedy_action():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    student = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    states = torch.randn(4096, 4)  # CartPole-size observations
    with torch.no_grad():
        teacher_logits = 10.0 * teacher(states)  # a trained policy is sharper than a fresh network
    train, held_out = slice(0, 3072), slice(3072, None)

    def agreement() -> float:
        with torch.no_grad():
            return (
                (student(states[held_out]).argmax(-1) == teacher_logits[held_out].argmax(-1))
                .float()
                .mean()
                .item()
            )

    before = agreement()
    buffer = distill.DistillBuffer(4096, (4,), 2, obs_dtype=torch.float32, seed=0)
    buffer.add(states[train], teacher_logits[train])
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(400):
        batch = buffer.sample(128)
        stats = distill.distill_step(student, batch.teacher_logits, batch.obs, optimizer, max_grad_norm=10.0)
    assert isinstance(stats, distill.DistillStats)
    assert stats.loss < 0.01 and 0.0 <= stats.agreement <= 1.0 and stats.grad_norm >= 0.0
    assert before < 0.95  # the check below means something
    assert agreement() >= 0.95


def test_distill_step_takes_actor_critic_students():
    student = ActorCritic()
    obs = frames(8)
    teacher_logits = torch.randn(8, 5)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    first = distill.distill_step(student, teacher_logits, obs, optimizer, temperature=2.0)
    for _ in range(5):
        last = distill.distill_step(student, teacher_logits, obs, optimizer, temperature=2.0)
    assert last.loss < first.loss


def test_distill_buffer_ring():
    buffer = distill.DistillBuffer(5, (2, 3), 4, seed=1)
    obs = torch.arange(7).view(7, 1, 1).expand(7, 2, 3).to(torch.uint8)
    logits = torch.arange(7).float()[:, None].expand(7, 4)
    buffer.add(obs[:3], logits[:3])
    assert len(buffer) == 3 and buffer.position == 3
    buffer.add(obs[3:].numpy(), logits[3:].numpy())
    assert len(buffer) == 5 and buffer.position == 2
    assert sorted(buffer.obs[:, 0, 0].tolist()) == [2, 3, 4, 5, 6]  # 0 and 1 were overwritten
    batch = buffer.sample(32)
    assert batch.obs.shape == (32, 2, 3) and batch.obs.dtype == torch.uint8
    assert torch.equal(batch.teacher_logits[:, 0], batch.obs[:, 0, 0].float())  # pairs stay together
    with pytest.raises(ValueError, match="expected obs"):
        buffer.add(torch.zeros(2, 3, 3, dtype=torch.uint8), torch.zeros(2, 4))
    # A batch larger than the ring keeps its newest items.
    buffer.add(obs, logits)
    assert sorted(buffer.obs[:, 0, 0].tolist()) == [2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.5, 0.9, 0.333])
def test_global_pruning_hits_the_target_exactly_and_folds(target: float):
    torch.manual_seed(0)
    model = ActorCritic()
    keys = list(model.state_dict())
    obs = frames(4)
    count = prune.prune_global(model, target)
    assert abs(count.zeros - target * count.total) <= 1
    assert prune.sparsity(model) == pytest.approx(target, abs=1.0 / count.total)
    with torch.no_grad():
        masked_out = model(obs)[0]
    prune.fold_masks(model)
    state = model.state_dict()
    assert sorted(state) == sorted(keys)  # no weight_orig / weight_mask left (the order may change)
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    assert prune.sparsity_count(model) == count
    assert (state["encoder.fc.0.weight"] == 0).any()
    with torch.no_grad():
        assert torch.equal(model(obs)[0], masked_out)
    # Global, not per layer: layers with smaller weights lose a larger share.
    shares = [
        (state[f"{name}.weight"] == 0).float().mean().item() for name in ("encoder.conv.0", "encoder.fc.0")
    ]
    assert abs(shares[0] - shares[1]) > 0.05


def test_dense_ends_keep_the_first_layer_and_the_heads_whole_at_the_same_overall_sparsity():
    torch.manual_seed(0)
    model = ActorCritic()
    ends = prune.end_layers(model)
    assert ends == [model.encoder.conv[0], *(m for m in model.head.modules() if isinstance(m, nn.Linear))]
    dense = {id(layer) for layer in ends}
    for target in (0.4, 0.6):  # a rising schedule extends the masks, the ends stay whole
        count = prune.prune_global(model, target, keep_dense=ends)
        assert abs(count.zeros - target * count.total) <= 1
        for layer, name in prune.prunable_weights(model):
            zeros = int((getattr(layer, name) == 0).sum())
            assert (zeros == 0) == (id(layer) in dense), layer
    # The other layers cannot hold every zero of a target above their share of the weights.
    others_share = 1 - sum(layer.weight.numel() for layer in ends) / count.total
    with pytest.raises(ValueError, match="dense layers whole"):
        prune.prune_global(model, others_share + 0.01, keep_dense=ends)


def test_folded_state_equals_fold_masks_without_touching_the_model():
    torch.manual_seed(0)
    model = ActorCritic()
    prune.prune_global(model, 0.7)
    model(frames(2))[0].sum().backward()  # weight is now a non-leaf tensor: deepcopy would fail
    state = prune.folded_state(model)
    assert any(name.endswith("_orig") for name, _ in model.named_parameters())  # still masked
    prune.fold_masks(model)
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_channel_pruning_cuts_units_and_the_next_layer_reads_the_kept_ones():
    torch.manual_seed(0)
    net = nets.NatureCNN((4, 36, 36), out_dim=16, channels=(8, 8, 8))
    head = nn.Linear(16, 3)
    dead = torch.tensor([1, 4, 5, 9, 10, 15])
    with torch.no_grad():
        net.fc[0].weight[dead] = 0.0
        net.fc[0].bias[dead] = 0.0
    result = prune.prune_channels(net, keep=1.0, out_dim=10)
    assert result.module.out_dim == 10 and set(result.kept_units.tolist()).isdisjoint(dead.tolist())
    small_head = prune.slice_inputs(head, result.kept_units)
    obs = frames(3)
    with torch.no_grad():
        torch.testing.assert_close(small_head(result.module(obs)), head(net(obs)), rtol=1e-5, atol=1e-6)
    assert prune.prune_channels(net, keep=0.5, units=0.25).module.out_dim == 4
    with pytest.raises(ValueError, match="out_dim"):
        prune.prune_channels(net, channels=(8, 8, 8), out_dim=17)
    with pytest.raises(ValueError, match="either keep"):
        prune.prune_channels(net)


def test_gradual_pruning_schedule():
    schedule = prune.cubic_schedule(0.9, rounds=6)
    assert len(schedule) == 6
    assert all(a < b for a, b in zip(schedule, schedule[1:], strict=False))
    assert schedule[-1] == pytest.approx(0.9)
    # Fast first, slow at the end.
    assert schedule[1] - schedule[0] > schedule[-1] - schedule[-2]
    assert prune.cubic_schedule(0.5, rounds=1) == [0.5]
    torch.manual_seed(1)
    model = ActorCritic()
    for target in schedule:
        count = prune.prune_global(model, target)
        assert abs(count.zeros - target * count.total) <= 1
    prune.fold_masks(model)
    assert prune.sparsity(model) == pytest.approx(0.9, abs=1.0 / count.total)
    with pytest.raises(ValueError, match="below"):
        prune.prune_global(model, 0.5)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_bad_sparsity_raises(bad: float):
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)") as info:
        prune.prune_global(ActorCritic(), bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        prune.cubic_schedule(bad, rounds=3)


def test_channel_pruning_is_exact_when_pruned_channels_are_zero():
    torch.manual_seed(0)
    net = nets.NatureCNN(
        (4, 52, 52), out_dim=32, channels=(8, 16, 12)
    )  # last maps 3x3: flatten order matters
    convs = [m for m in net.conv if isinstance(m, nn.Conv2d)]
    dead = [torch.tensor([0, 3, 5, 6]), torch.arange(1, 16, 2), torch.tensor([2, 4, 7, 8, 9, 11])]
    with torch.no_grad():
        for conv, idx in zip(convs, dead, strict=True):
            conv.weight[idx] = 0.0
            conv.bias[idx] = 0.0
        for conv in convs:  # live channels: positive biases so that nothing else is exactly zero
            conv.bias.add_(0.01 * (conv.bias != 0) + 0.01 * (conv.weight.abs().sum((1, 2, 3)) > 0))
    result = prune.prune_channels(net, keep=(0.5, 0.5, 0.5))
    assert result.channels == (4, 8, 6)
    assert isinstance(result.module, nets.NatureCNN)
    for kept, idx, conv in zip(result.kept, dead, convs, strict=True):
        assert set(kept.tolist()).isdisjoint(idx.tolist())
        assert len(kept) + len(idx) == conv.out_channels
    small_params = sum(p.numel() for p in result.module.parameters())
    assert small_params < 0.6 * sum(p.numel() for p in net.parameters())
    obs = frames(6, shape=(4, 52, 52))
    with torch.no_grad():
        torch.testing.assert_close(result.module(obs), net(obs), rtol=1e-5, atol=1e-6)


def test_channel_pruning_keeps_the_largest_channels_and_checks_inputs():
    torch.manual_seed(0)
    net = nets.NatureCNN((4, 36, 36), out_dim=16, channels=(8, 8, 8))
    result = prune.prune_channels(net, keep=0.3)
    assert result.channels == (3, 3, 3)
    first = [m for m in net.conv if isinstance(m, nn.Conv2d)][0]
    norms = prune.channel_l1(first)
    assert set(result.kept[0].tolist()) == set(norms.topk(3).indices.tolist())
    with pytest.raises(ValueError, match="keep"):
        prune.prune_channels(net, keep=0.0)
    with pytest.raises(ValueError, match="NatureCNN"):
        prune.prune_channels(nets.NatureCNN((4, 36, 36), out_dim=None), keep=0.5)
    with pytest.raises(ValueError, match="NatureCNN"):
        prune.prune_channels(nn.Linear(3, 3), keep=0.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------


def test_quantize_weight_per_channel():
    weight = torch.randn(6, 3, 2, 2) * torch.logspace(-3, 1, 6)[:, None, None, None]
    weight[2] = 0.0
    q, scale = quantize.quantize_weight(weight)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert q.abs().amax(dim=(1, 2, 3)).tolist() == [127, 127, 0, 127, 127, 127]
    error = (q.float() * scale[:, None, None, None] - weight).abs()
    assert (error <= scale[:, None, None, None] / 2 + 1e-12).all()


@pytest.mark.parametrize("model_class", [ActorCritic, QNet])
def test_int8_outputs_are_close_to_fp32(model_class: type[nn.Module]):
    torch.manual_seed(0)
    model = model_class().eval()
    calibration = quantize.calibrate(model, frames(64, seed=1))
    assert calibration.frames == 64
    assert calibration.input_amax["encoder.conv.0"] == pytest.approx(1.0, abs=1e-6)  # pixels in [0, 1]
    q = quantize.quantize_int8(model, calibration)
    layers = dict(q.named_modules())
    assert isinstance(layers["encoder.conv.0"], quantize.Int8Conv2d)
    assert isinstance(layers["encoder.fc.0"], quantize.Int8Linear)
    assert isinstance(dict(model.named_modules())["encoder.conv.0"], nn.Conv2d)  # the original is unchanged
    obs = frames(32, seed=2)
    with torch.no_grad():
        ref = model(obs)
        out = q(obs)
    ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
    relative = (out - ref).norm() / ref.norm()
    assert relative < 0.05
    with torch.no_grad():
        empty = q(obs[:0])
    assert (empty[0] if isinstance(empty, tuple) else empty).shape == (0, 5)  # as the fp32 model
    comparison = compress.compare_outputs(model, q, obs)
    assert comparison.max_abs_diff == pytest.approx((out - ref).abs().max().item(), rel=1e-5)


def test_int8_state_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = ActorCritic().eval()
    q = quantize.quantize_int8(model, quantize.calibrate(model, frames(32)), skip=("head.critic.0",))
    path = tmp_path / "int8.safetensors"
    quantize.save_quantized(q, path)
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"format": quantize.FORMAT}
        dtypes = {key: f.get_tensor(key).dtype for key in f.keys()}  # noqa: SIM118
    assert dtypes["encoder.conv.0.weight"] == torch.int8
    assert dtypes["encoder.fc.0.weight"] == torch.int8
    assert dtypes["encoder.fc.0.weight_scale"] == torch.float32
    assert dtypes["head.critic.0.weight"] == torch.float32  # skipped: stays fp32
    torch.manual_seed(123)  # a skeleton with other random weights
    loaded = quantize.load_quantized(ActorCritic(), path)
    obs = frames(8, seed=3)
    with torch.no_grad():
        expected, got = q(obs), loaded(obs)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    state = quantize.quantized_state(q)
    assert set(state) == set(safetensors.torch.load_file(path))
    with pytest.raises(ValueError, match="does not fit"):
        quantize.load_quantized(ActorCritic(channels=(8, 16, 8)), state)


def test_int8_file_is_at_least_3_5x_smaller_for_the_mario_net(tmp_path):
    torch.manual_seed(0)
    model = ActorCritic(in_shape=(4, 84, 84), channels=(32, 64, 64), out_dim=512).eval()
    q = quantize.quantize_int8(model, quantize.calibrate(model, frames(4, shape=(4, 84, 84))))
    fp32_path, int8_path = tmp_path / "fp32.safetensors", tmp_path / "int8.safetensors"
    safetensors.torch.save_file(model.state_dict(), fp32_path)
    quantize.save_quantized(q, int8_path)
    assert compress.file_bytes(fp32_path) >= 3.5 * compress.file_bytes(int8_path)
    assert compress.file_bytes([fp32_path, int8_path]) == fp32_path.stat().st_size + int8_path.stat().st_size


# ---------------------------------------------------------------------------------------------
# Measurement and the method registry
# ---------------------------------------------------------------------------------------------


def test_count_parameters_for_dense_pruned_and_int8_models():
    torch.manual_seed(0)
    model = ActorCritic()
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())  # biases start at zero
    assert compress.count_parameters(model) == (total, nonzero)
    q = quantize.quantize_int8(model, quantize.calibrate(model, frames(8)))
    assert compress.count_parameters(q).total == total
    prune.prune_global(model, 0.6)
    masked = compress.count_parameters(model)
    zeros = prune.sparsity_count(model).zeros
    zero_biases = sum(int((m.bias == 0).sum()) for m, _ in prune.prunable_weights(model))
    assert masked.total == total and masked.nonzero == total - zeros - zero_biases
    assert compress.count_parameters(prune.fold_masks(model)) == masked


def test_latency_restores_threads_and_mode():
    model = ActorCritic().train()
    threads = torch.get_num_threads()
    ms = compress.latency_ms(model, frames(1), calls=5, warmup=1)
    assert ms > 0
    assert torch.get_num_threads() == threads and model.training


def test_unknown_method_raises_one_line_value_error():
    assert compress.get_method("quantize").name == "quantize"
    with pytest.raises(ValueError) as info:
        compress.get_method("quantise")
    message = str(info.value)
    assert "\n" not in message and "quantise" in message
    assert all(name in message for name in compress.METHODS)
