"""Unit tests of nets/: shapes, uint8 scaling, state passing, masks, heads, registry, gradients."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import nets

torch.set_num_threads(1)

IMAGE_NETS = ["nature", "impala", "vit"]
IMAGE_SHAPES = [(4, 84, 84), (1, 8, 8), (3, 7, 7)]


def assert_all_parameters_get_gradients(module: torch.nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    for name, param in module.named_parameters():
        assert param.grad is not None, f"no gradient reaches {name}"
        assert param.grad.abs().sum() > 0, f"zero gradient at {name}"


# ---------------------------------------------------------------------------------------------
# Image encoders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("name", IMAGE_NETS)
def test_image_encoder_shapes_and_uint8_scaling(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    net = nets.build(name, in_shape=shape)
    pixels = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    out_uint8 = net(pixels)
    out_float = net(pixels.float() / 255.0)
    assert out_uint8.shape == (3, net.out_dim)
    assert out_uint8.dtype == torch.float32
    torch.testing.assert_close(out_uint8, out_float, rtol=0, atol=0)
    # Float input passes through unscaled: 0..255 floats give a different output than 0..1 floats.
    assert not torch.allclose(net(pixels.float()), out_float)


def test_uint8_pixels_under_bf16_autocast_become_the_bf16_that_autocast_would_cast_to() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).reshape(4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scaled = nets.layers.image_to_float(pixels)
    assert scaled.dtype == torch.bfloat16
    expected = (pixels.float() / 255.0).to(torch.bfloat16)
    assert torch.equal(scaled.view(torch.int16), expected.view(torch.int16))  # bit for bit, all 256 values
    assert nets.layers.image_to_float(pixels).dtype == torch.float32  # without autocast: fp32 as before
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert nets.layers.image_to_float(pixels).dtype == torch.float32


@pytest.mark.parametrize("name", IMAGE_NETS)
def test_image_encoder_under_bf16_autocast_computes_the_same_from_uint8_as_from_scaled_floats(
    name: str,
) -> None:
    """The bf16 shortcut of image_to_float changes no number: outputs and gradients are identical."""
    torch.manual_seed(0)
    net = nets.build(name, in_shape=(4, 36, 36))
    pixels = torch.randint(0, 256, (3, 4, 36, 36), dtype=torch.uint8)
    results = []
    for images in (pixels, pixels.float() / 255.0):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(images)
        out.float().square().sum().backward()
        results.append((out, [p.grad.clone() for p in net.parameters()]))
    (out_uint8, grads_uint8), (out_float, grads_float) = results
    assert torch.equal(out_uint8, out_float)
    for grad_uint8, grad_float in zip(grads_uint8, grads_float, strict=True):
        assert torch.equal(grad_uint8, grad_float)


@pytest.mark.parametrize("name", IMAGE_NETS)
def test_image_encoder_keeps_leading_dims_and_rejects_wrong_shapes(name: str) -> None:
    net = nets.build(name, in_shape=(1, 8, 8))
    frames = torch.rand(5, 2, 1, 8, 8)  # (T, B, C, H, W)
    out = net(frames)
    assert out.shape == (5, 2, net.out_dim)
    torch.testing.assert_close(out[3], net(frames[3]))
    with pytest.raises(ValueError, match=r"expects input \(B, 1, 8, 8\)"):
        net(torch.rand(2, 8, 8, 1))


@pytest.mark.parametrize("name", IMAGE_NETS)
def test_image_encoder_gradients_flow(name: str) -> None:
    torch.manual_seed(0)
    net = nets.build(name, in_shape=(1, 8, 8))
    assert_all_parameters_get_gradients(net, net(torch.rand(4, 1, 8, 8)).square().sum())


def test_image_encoder_options() -> None:
    assert nets.NatureCNN((4, 84, 84)).geometry == "nature"
    assert nets.NatureCNN((1, 8, 8)).geometry == "small"
    with pytest.raises(ValueError, match="does not fit"):
        nets.NatureCNN((1, 8, 8), geometry="nature")
    assert nets.NatureCNN((1, 8, 8), out_dim=None).out_dim == 64 * 4 * 4
    assert nets.ImpalaCNN((4, 84, 84), out_dim=None).out_dim == 32 * 11 * 11
    assert nets.ViTEncoder((4, 84, 84), patch_size=12).patch_size == 12
    assert nets.ViTEncoder((1, 8, 8), patch_size=12).patch_size == 2
    vit = nets.ViTEncoder((1, 10, 10), patch_size=4, out_dim=32, pool="mean")  # 10 is padded to 12
    assert vit.grid == (3, 3) and vit(torch.rand(2, 1, 10, 10)).shape == (2, 32)


@pytest.mark.parametrize("cls", [nets.NatureCNN, nets.ImpalaCNN])
def test_channels_last_gives_the_same_output(cls: type[torch.nn.Module]) -> None:
    torch.manual_seed(0)
    plain = cls((4, 36, 36))
    fast = cls((4, 36, 36), channels_last=True)
    fast.load_state_dict(plain.state_dict())
    pixels = torch.randint(0, 256, (2, 4, 36, 36), dtype=torch.uint8)
    # Equal on CPU; on a GPU cuDNN may pick other (TF32) kernels for the other layout.
    torch.testing.assert_close(fast(pixels), plain(pixels), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------


def test_mlp_shapes_and_out_dim() -> None:
    assert nets.MLP(4).out_dim == 64
    assert nets.MLP((2, 3), hidden=(8,), out_dim=5)(torch.rand(7, 2, 3)).shape == (7, 5)
    assert nets.MLP(6, hidden=(), out_dim=None).out_dim == 6
    assert nets.MLP(6, hidden=(16, 8))(torch.rand(3, 6)).shape == (3, 8)
    assert nets.MLP(6)(torch.randint(0, 3, (2, 6))).dtype == torch.float32  # ints are cast
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        nets.MLP(6, activation="swishy")


def test_mlp_with_hand_made_weights_computes_xor() -> None:
    net = nets.MLP(2, hidden=(2,), out_dim=1, activation="relu")
    first, second = net.layers[0], net.layers[2]
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
        first.bias.copy_(torch.tensor([0.0, -1.0]))
        second.weight.copy_(torch.tensor([[1.0, -2.0]]))
        second.bias.zero_()
    inputs = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert net(inputs).squeeze(1).tolist() == [0.0, 1.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Recurrent encoders
# ---------------------------------------------------------------------------------------------

RNNS = [nets.LSTMEncoder, nets.GRUEncoder]


def step_by_step(net: torch.nn.Module, x: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: T calls with T=1, zeroing the state by hand where a new episode starts."""
    state = net.initial_state(x.shape[0])
    outputs = []
    for t in range(x.shape[1]):
        if reset is not None:
            keep = (~reset[:, t]).float().view(-1, 1, 1)  # states are (B, L, H)
            state = tuple(s * keep for s in state)
        y, state = net(x[:, t : t + 1], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("cls", RNNS)
def test_rnn_shapes_and_state_layout(cls: type[torch.nn.Module]) -> None:
    net = cls(in_dim=5, hidden_size=12, num_layers=2)
    state = net.initial_state(3)
    assert len(state) == (2 if cls is nets.LSTMEncoder else 1)
    assert all(s.shape == (3, 2, 12) for s in state)  # batch first, like every state in nets
    y, new_state = net(torch.rand(3, 7, 5), state)
    assert y.shape == (3, 7, net.out_dim) and net.out_dim == 12
    assert all(s.shape == (3, 2, 12) for s in new_state)
    tokens = cls(in_dim=8, hidden_size=12, vocab_size=20)
    assert tokens(torch.randint(0, 20, (3, 7)))[0].shape == (3, 7, 12)
    with pytest.raises(ValueError, match="expects"):
        tokens(torch.rand(3, 7, 8))


@pytest.mark.parametrize("cls", RNNS)
def test_rnn_state_passing_equals_one_call(cls: type[torch.nn.Module]) -> None:
    torch.manual_seed(0)
    net = cls(in_dim=4, hidden_size=8, num_layers=2)
    x = torch.randn(3, 9, 4)
    y_full, state_full = net(x)
    y_steps, state_steps = step_by_step(net, x)
    torch.testing.assert_close(y_full, y_steps)
    y_first, state = net(x[:, :4])
    y_second, state = net(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([y_first, y_second], 1), y_full)
    for a, b, c in zip(state, state_full, state_steps, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("cls", RNNS)
def test_rnn_reset_equals_zeroing_the_state_step_by_step(cls: type[torch.nn.Module]) -> None:
    torch.manual_seed(0)
    net = cls(in_dim=4, hidden_size=8)
    x = torch.randn(3, 10, 4)
    reset = torch.zeros(3, 10, dtype=torch.bool)
    reset[0, 3] = reset[1, 3] = reset[1, 7] = reset[2, 0] = True
    start = tuple(torch.randn_like(s) for s in net.initial_state(3))
    y, state = net(x, start, reset=reset)
    # Reference that starts from the same non-zero state.
    expected, ref_state = [], start
    for t in range(10):
        keep = (~reset[:, t]).float().view(-1, 1, 1)
        ref_state = tuple(s * keep for s in ref_state)
        y_t, ref_state = net(x[:, t : t + 1], ref_state)
        expected.append(y_t)
    torch.testing.assert_close(y, torch.cat(expected, 1))
    for a, b in zip(state, ref_state, strict=True):
        torch.testing.assert_close(a, b)
    # After its reset at t=3, row 0 is the same as a fresh run on x[0, 3:].
    fresh, _ = net(x[:1, 3:])
    torch.testing.assert_close(y[:1, 3:], fresh)


@pytest.mark.parametrize("cls", RNNS)
@pytest.mark.parametrize("left_padded", [False, True])
def test_rnn_padding_keeps_state_and_last_pooling_finds_last_token(
    cls: type[torch.nn.Module], left_padded: bool
) -> None:
    torch.manual_seed(0)
    net = cls(in_dim=4, hidden_size=8)
    lengths = [6, 2, 4]
    x = torch.randn(3, 6, 4)
    padding = torch.arange(6) >= torch.tensor(lengths).unsqueeze(1)  # right padding, (B, T)
    if left_padded:
        padding = padding.flip(1)
    x_padded = x.masked_fill(padding.unsqueeze(-1), 123.0)  # junk that must not leak in
    y, state = net(x_padded, padding_mask=padding)
    assert (y[padding] == 0).all()
    pooled = nets.pool_sequence(y, padding, how="last")
    for b, n in enumerate(lengths):
        real = x_padded[b : b + 1, ~padding[b]]  # (1, n, 4)
        y_alone, state_alone = net(real)
        torch.testing.assert_close(
            pooled[b], y_alone[0, n - 1], rtol=1e-4, atol=1e-4
        )  # cuDNN: packed != plain
        for s, s_alone in zip(state, state_alone, strict=True):
            torch.testing.assert_close(s[b], s_alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", RNNS)
def test_rnn_gradients_flow(cls: type[torch.nn.Module]) -> None:
    net = cls(in_dim=4, hidden_size=8, vocab_size=10)
    reset = torch.zeros(2, 5, dtype=torch.bool)
    reset[0, 2] = True
    y, _ = net(torch.randint(0, 10, (2, 5)), reset=reset)
    assert_all_parameters_get_gradients(net, y.square().sum())


# ---------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------


def test_transformer_shapes_and_validation() -> None:
    net = nets.TransformerEncoder(in_dim=5, d_model=16, heads=2)
    y, state = net(torch.rand(3, 7, 5))
    assert y.shape == (3, 7, 16) and net.out_dim == 16 and state == ()
    assert net.initial_state(3) == ()
    tokens = nets.TransformerEncoder(in_dim=8, d_model=16, heads=2, vocab_size=20, pos_encoding="learned")
    assert tokens(torch.randint(0, 20, (3, 7)))[0].shape == (3, 7, 16)
    with pytest.raises(ValueError, match="exceeds max_len=8"):
        nets.TransformerEncoder(in_dim=5, d_model=16, heads=2, max_len=8)(torch.rand(1, 9, 5))
    with pytest.raises(ValueError, match="divisible"):
        nets.TransformerEncoder(in_dim=5, d_model=10, heads=4)
    with pytest.raises(ValueError, match="memory_len"):
        nets.TransformerEncoder(in_dim=5, memory_len=8, max_len=8)
    memory, valid = nets.TransformerEncoder(in_dim=5, d_model=16, heads=2, memory_len=6).initial_state(3)
    assert memory.shape == (3, 6, 16) and valid.shape == (3, 6) and not valid.any()


def test_transformer_causal_and_padding_masks() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4)
    changed = x.clone()
    changed[:, 4:] += 1.0
    causal = nets.TransformerEncoder(in_dim=4, d_model=16, heads=2, causal=True)
    torch.testing.assert_close(causal(x)[0][:, :4], causal(changed)[0][:, :4])  # the future is not seen
    bidirectional = nets.TransformerEncoder(in_dim=4, d_model=16, heads=2)
    assert not torch.allclose(bidirectional(x)[0][:, :4], bidirectional(changed)[0][:, :4])
    # Padded positions are never attended to, so their content does not matter.
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[:, 4:] = True
    y, _ = bidirectional(x, padding_mask=padding)
    y_changed, _ = bidirectional(changed, padding_mask=padding)
    torch.testing.assert_close(y, y_changed)
    assert (y[:, 4:] == 0).all()
    torch.testing.assert_close(y[:, :4], bidirectional(x[:, :4])[0])
    pooled = nets.pool_sequence(y, padding, how="mean")
    torch.testing.assert_close(pooled, y[:, :4].mean(1))


@pytest.mark.parametrize("causal", [True, False])
def test_transformer_reset_makes_segments_independent(causal: bool) -> None:
    torch.manual_seed(0)
    net = nets.TransformerEncoder(in_dim=4, d_model=16, heads=2, causal=causal)
    x = torch.randn(2, 8, 4)
    reset = torch.zeros(2, 8, dtype=torch.bool)
    reset[:, 5] = True
    y, _ = net(x, reset=reset)
    # Each segment is encoded as if it were a sequence of its own (positions restart at the reset).
    torch.testing.assert_close(y[:, 5:], net(x[:, 5:])[0])
    torch.testing.assert_close(y[:, :5], net(x[:, :5])[0])


def transformer_step_by_step(net: torch.nn.Module, x: torch.Tensor, reset: torch.Tensor | None = None):
    state = net.initial_state(x.shape[0])
    outputs = []
    for t in range(x.shape[1]):
        y, state = net(x[:, t : t + 1], state, reset=None if reset is None else reset[:, t : t + 1])
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("steps", [4, 5, 11])  # memory_len + 1 == 5; beyond it too
def test_transformer_memory_step_by_step_equals_one_call(steps: int) -> None:
    torch.manual_seed(0)
    net = nets.TransformerEncoder(in_dim=3, d_model=16, depth=2, heads=2, causal=True, memory_len=4).eval()
    x = torch.randn(2, steps, 3)
    y_full, (memory_full, valid_full) = net(x)
    y_steps, (memory_steps, valid_steps) = transformer_step_by_step(net, x)
    assert y_full.shape == (2, steps, 16)
    torch.testing.assert_close(y_steps, y_full)
    torch.testing.assert_close(memory_steps, memory_full)
    assert torch.equal(valid_steps, valid_full)
    assert valid_full.sum(1).tolist() == [min(steps, 4)] * 2
    # Re-running a rollout from the state saved after its first chunk, as recurrent PPO does.
    y_head, state = net(x[:, :3])
    y_tail, _ = net(x[:, 3:], state)
    torch.testing.assert_close(torch.cat([y_head, y_tail], 1), y_full)


def test_transformer_memory_attends_to_past_steps() -> None:
    torch.manual_seed(0)
    net = nets.TransformerEncoder(in_dim=3, d_model=16, heads=2, causal=True, memory_len=3)
    x = torch.randn(1, 6, 3)
    changed = x.clone()
    changed[:, 2] += 1.0
    y, _ = net(x)
    y_changed, _ = net(changed)
    torch.testing.assert_close(y[:, :2], y_changed[:, :2])
    assert not torch.allclose(y[:, 3], y_changed[:, 3])  # step 2 is in the memory of steps 3..5
    # Step 2 falls out of the window of step 2 + memory_len + 1 = 6 (checked on a longer sequence).
    x_long, changed_long = torch.cat([x, x], 1), torch.cat([changed, x], 1)
    torch.testing.assert_close(net(x_long)[0][:, 6:], net(changed_long)[0][:, 6:])


@pytest.mark.parametrize("memory_len", [0, 4])
def test_transformer_outputs_after_reset_ignore_earlier_inputs(memory_len: int) -> None:
    torch.manual_seed(0)
    net = nets.TransformerEncoder(in_dim=3, d_model=16, heads=2, causal=True, memory_len=memory_len)
    x = torch.randn(2, 7, 3)
    reset = torch.zeros(2, 7, dtype=torch.bool)
    reset[0, 3] = reset[1, 5] = True
    changed = x.clone()
    changed[0, :3] = torch.randn(3, 3)
    changed[1, :5] = torch.randn(5, 3)
    y, state = net(x, reset=reset)
    y_changed, state_changed = net(changed, reset=reset)
    torch.testing.assert_close(y[0, 3:], y_changed[0, 3:])
    torch.testing.assert_close(y[1, 5:], y_changed[1, 5:])
    assert not torch.allclose(y[0, :3], y_changed[0, :3])
    torch.testing.assert_close(y[0:1, 3:], net(x[0:1, 3:])[0])  # same as a fresh episode
    if memory_len:
        assert state[1].sum(1).tolist() == [4, 2]  # only steps of the latest episode stay in memory
        y_next, _ = net(x[:, :1], state)
        torch.testing.assert_close(y_next, net(x[:, :1], state_changed)[0])
        # A reset in a step-by-step call also drops the memory.
        y_steps, _ = transformer_step_by_step(net, changed, reset)
        torch.testing.assert_close(y_steps, y_changed)


def test_transformer_gradients_flow() -> None:
    for memory_len in (0, 3):
        net = nets.TransformerEncoder(
            in_dim=4, d_model=16, heads=2, memory_len=memory_len, pos_encoding="learned"
        )
        y, _ = net(torch.randn(2, 5, 4))
        assert_all_parameters_get_gradients(net, y.square().sum())


# ---------------------------------------------------------------------------------------------
# Pooling and heads
# ---------------------------------------------------------------------------------------------


def test_pool_sequence() -> None:
    y = torch.arange(12.0).view(2, 3, 2)
    padding = torch.tensor([[False, False, True], [True, False, True]])
    torch.testing.assert_close(nets.pool_sequence(y, padding, "last"), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    torch.testing.assert_close(nets.pool_sequence(y, None, "last"), y[:, -1])
    torch.testing.assert_close(nets.pool_sequence(y, padding, "mean"), torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    with pytest.raises(ValueError, match="valid poolings: last, mean"):
        nets.pool_sequence(y, how="max")


def test_dueling_head_is_value_plus_centred_advantage() -> None:
    torch.manual_seed(0)
    head = nets.QHead(8, 4, hidden=16, dueling=True)
    features = torch.randn(5, 8)
    value = head.value(features)  # (5, 1)
    advantage = head.advantage(features)  # (5, 4)
    q = head(features)
    assert q.shape == (5, 4)
    torch.testing.assert_close(q, value + advantage - advantage.mean(1, keepdim=True))
    torch.testing.assert_close(q.mean(1, keepdim=True), value)  # mean advantage is zero
    plain = nets.QHead(8, 4, hidden=None)
    assert plain(features).shape == (5, 4) and len(plain.advantage) == 1 and plain.value is None
    assert_all_parameters_get_gradients(head, q.square().sum())


def test_actor_critic_and_classifier_heads() -> None:
    torch.manual_seed(0)
    head = nets.ActorCriticHead(8, 3)
    logits, value = head(torch.randn(5, 8))
    assert logits.shape == (5, 3) and value.shape == (5,)
    assert logits.abs().max() < 0.2  # policy gain 0.01: a near-uniform first policy
    logits, value = nets.ActorCriticHead(8, 3, hidden=16)(torch.randn(4, 5, 8))
    assert logits.shape == (4, 5, 3) and value.shape == (4, 5)
    assert nets.LinearClassifier(8, 10)(torch.randn(5, 8)).shape == (5, 10)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

BUILD_EXAMPLES = {
    "mlp": (dict(in_shape=(4,)), torch.rand(2, 4)),
    "nature": (dict(in_shape=(1, 8, 8)), torch.rand(2, 1, 8, 8)),
    "nature-tiny": (dict(in_shape=(4, 84, 84)), torch.rand(2, 4, 84, 84)),
    "nature-half": (dict(in_shape=(4, 84, 84)), torch.rand(2, 4, 84, 84)),
    "impala": (dict(in_shape=(1, 8, 8)), torch.rand(2, 1, 8, 8)),
    "vit": (dict(in_shape=(1, 8, 8)), torch.rand(2, 1, 8, 8)),
    "lstm": (dict(in_dim=4, hidden_size=8), torch.rand(2, 3, 4)),
    "gru": (dict(in_dim=4, hidden_size=8), torch.rand(2, 3, 4)),
    "transformer": (dict(in_dim=4, d_model=8, heads=2), torch.rand(2, 3, 4)),
    "gpt": (dict(vocab_size=16, d_model=8, depth=1, heads=2, context=8), torch.randint(0, 16, (2, 5))),
}


def test_registry_builds_every_net_with_matching_out_dim() -> None:
    assert nets.names() == [
        "mlp",
        "nature",
        "nature-tiny",
        "nature-half",
        "impala",
        "vit",
        "lstm",
        "gru",
        "transformer",
        "gpt",
    ]
    assert set(BUILD_EXAMPLES) == set(nets.names())
    for name, (kwargs, x) in BUILD_EXAMPLES.items():
        net = nets.build(name, **kwargs)
        out = net(x)
        if nets.kind(name) == "sequence":
            out, _ = out
        assert out.shape[-1] == net.out_dim, name
        assert nets.describe(name)


def test_registry_errors_name_the_valid_choices() -> None:
    valid = "valid nets: mlp, nature, nature-tiny, nature-half, impala, vit, lstm, gru, transformer, gpt"
    with pytest.raises(ValueError, match=re.escape(f"unknown net 'resnet'; {valid}")):
        nets.build("resnet")
    with pytest.raises(ValueError, match="unknown net 'resnet'"):
        nets.describe("resnet")
    with pytest.raises(ValueError, match="bad arguments for net 'nature'.*accepted: in_shape"):
        nets.build("nature", in_shape=(4, 84, 84), widht=3)
    with pytest.raises(ValueError, match="bad arguments for net 'lstm'.*in_dim"):
        nets.build("lstm")


def test_nets_does_not_import_gymnasium_or_sb3_outside_the_adapter() -> None:
    for path in Path(nets.__file__).parent.glob("*.py"):
        if path.name == "sb3_adapter.py":
            continue
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(gymnasium|gym|stable_baselines3)\b", text, re.M), path
