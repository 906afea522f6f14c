"""scratch.nn: modules and parameters, the hand-built XOR net, the CNN, and the bridges to nets.MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nets
from scratch import nn, ops, optim

torch.set_num_threads(1)


def torch_copy(model: nn.MLP) -> nets.MLP:
    """A float64 nets.MLP (its final Linear included) with the weights of a scratch MLP."""
    net = nets.MLP(model.in_dim, model.hidden, out_dim=model.out_dim, activation=model.activation).double()
    net.load_state_dict(nn.to_torch_state_dict(model), strict=True)
    return net


XOR_INPUTS = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_LABELS = np.array([0, 1, 1, 0])


def test_hand_built_xor_network_computes_xor_exactly() -> None:
    # The course slide: h = relu(x W + b) with W = [[1, 1], [1, 1]], b = [0, -1]; y = h W' with W' = [1, -2].
    model = nn.MLP(2, (2,), 1, activation="relu")
    hidden, output = model.layers
    hidden.W.data = np.array([[1.0, 1.0], [1.0, 1.0]])
    hidden.b.data = np.array([0.0, -1.0])
    output.W.data = np.array([[1.0], [-2.0]])
    output.b.data = np.array([0.0])
    y = model(XOR_INPUTS)
    assert y.shape == (4, 1)
    np.testing.assert_array_equal(y.data[:, 0], XOR_LABELS)
    # The same weights in the lab's torch MLP give the same table.
    torch_net = torch_copy(model)
    np.testing.assert_array_equal(torch_net(torch.tensor(XOR_INPUTS)).detach().numpy()[:, 0], XOR_LABELS)


def test_module_finds_parameters_by_attribute() -> None:
    model = nn.MLP(3, (4, 5), 2)
    names = [name for name, _ in model.named_parameters()]
    assert names == ["layers.0.W", "layers.0.b", "layers.1.W", "layers.1.b", "layers.2.W", "layers.2.b"]
    assert [p.shape for p in model.parameters()] == [(3, 4), (4,), (4, 5), (5,), (5, 2), (2,)]
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    cnn = nn.SmallCNN()
    assert [name for name, _ in cnn.named_parameters()] == ["conv.W", "conv.b", "fc.W", "fc.b"]


def test_zero_grad_clears_every_gradient() -> None:
    model = nn.MLP(3, (4,), 2)
    ops.cross_entropy(model(np.ones((5, 3))), np.zeros(5, dtype=int)).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_linear_init_is_torch_default_uniform() -> None:
    layer = nn.Linear(400, 300, rng=np.random.default_rng(0))
    bound = 1 / np.sqrt(400)
    assert np.abs(layer.W.data).max() <= bound and np.abs(layer.b.data).max() <= bound
    # Uniform on [-k, k] has standard deviation k / sqrt(3).
    assert layer.W.data.std() == pytest.approx(bound / np.sqrt(3), rel=0.02)
    conv = nn.Conv2d(3, 8, 5, rng=np.random.default_rng(0))
    assert conv.W.shape == (8, 3, 5, 5) and np.abs(conv.W.data).max() <= 1 / np.sqrt(75)


def test_mlp_seed_makes_weights_reproducible() -> None:
    a, b, c = nn.MLP(3, (4,), 2, seed=1), nn.MLP(3, (4,), 2, seed=1), nn.MLP(3, (4,), 2, seed=2)
    np.testing.assert_array_equal(a.layers[0].W.data, b.layers[0].W.data)
    assert not np.array_equal(a.layers[0].W.data, c.layers[0].W.data)


def test_unknown_activation_is_a_one_line_value_error() -> None:
    with pytest.raises(ValueError, match=r"^unknown activation 'gelu'; valid: tanh, relu$"):
        nn.MLP(2, (3,), 1, activation="gelu")


def test_mlp_flattens_images() -> None:
    model = nn.MLP(64, (16,), 10)
    images = np.random.default_rng(0).normal(size=(5, 1, 8, 8))
    np.testing.assert_array_equal(model(images).data, model(images.reshape(5, 64)).data)


@pytest.mark.parametrize(("hidden", "activation"), [((7, 6), "tanh"), ((5,), "relu"), ((8, 8, 4), "relu")])
def test_scratch_mlp_weights_give_the_same_outputs_in_nets_mlp(
    hidden: tuple[int, ...], activation: str
) -> None:
    model = nn.MLP(5, hidden, 3, activation=activation, seed=3)
    torch_net = nets.MLP(5, hidden, out_dim=3, activation=activation).double()
    torch_net.load_state_dict(nn.to_torch_state_dict(model), strict=True)
    x = np.random.default_rng(4).normal(size=(9, 5)) * 2
    np.testing.assert_allclose(
        torch_net(torch.tensor(x)).detach().numpy(), model(x).data, rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_nets_mlp_weights_load_into_a_scratch_mlp(activation: str) -> None:
    torch.manual_seed(0)
    torch_net = nets.MLP(4, (6, 5), out_dim=2, activation=activation).double()
    model = nn.from_torch_state_dict(nn.MLP(4, (6, 5), 2, activation=activation), torch_net.state_dict())
    x = np.random.default_rng(5).normal(size=(7, 4))
    np.testing.assert_allclose(
        model(x).data, torch_net(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-10
    )
    # A float32 module's weights load too (converted to float64).
    model32 = nn.from_torch_state_dict(
        nn.MLP(4, (6, 5), 2, activation=activation), torch_net.float().state_dict()
    )
    assert model32.layers[0].W.dtype == np.float64
    np.testing.assert_allclose(model32(x).data, model(x).data, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_scratch_mlp_round_trips_through_the_fit_tasks_classifier(activation: str) -> None:
    # `lab fit xor --net mlp` trains Classifier(nets.MLP(..., out_dim=None), classes): nets.MLP + a Linear head.
    from tasks.models import Classifier

    model = nn.MLP(2, (8, 4), 2, activation=activation, seed=6)
    torch_net = Classifier(nets.MLP(2, (8, 4), activation=activation), num_classes=2).double()
    torch_net.load_state_dict(nn.to_torch_state_dict(model, layout="classifier"), strict=True)
    x = np.random.default_rng(8).normal(size=(6, 2))
    np.testing.assert_allclose(
        torch_net(torch.tensor(x)).detach().numpy(), model(x).data, rtol=1e-10, atol=1e-10
    )
    torch.manual_seed(1)
    trained = Classifier(nets.MLP(2, (8, 4), activation=activation), num_classes=2).double()
    copy = nn.from_torch_state_dict(nn.MLP(2, (8, 4), 2, activation=activation), trained.state_dict())
    np.testing.assert_allclose(
        copy(x).data, trained(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-10
    )
    with pytest.raises(ValueError, match=r"^unknown layout 'keras'; valid: mlp, classifier$"):
        nn.to_torch_state_dict(model, layout="keras")


def test_from_torch_state_dict_rejects_another_architecture() -> None:
    other = nets.MLP(4, (6,), out_dim=2).double().state_dict()
    with pytest.raises(ValueError, match=r"do not match"):
        nn.from_torch_state_dict(nn.MLP(4, (6, 5), 2), other)
    wrong_width = nets.MLP(3, (6, 5), out_dim=2).double().state_dict()
    with pytest.raises(ValueError, match=r"^layers\.0\.weight: shape \(6, 3\) where the MLP needs \(6, 4\)$"):
        nn.from_torch_state_dict(nn.MLP(4, (6, 5), 2), wrong_width)


def test_small_cnn_matches_torch_functional() -> None:
    model = nn.SmallCNN(channels=4, seed=2)
    x = np.random.default_rng(6).uniform(size=(3, 1, 8, 8))
    labels = np.array([1, 7, 3])
    loss = ops.cross_entropy(model(x), labels)
    loss.backward()
    params = {name: torch.tensor(p.data, requires_grad=True) for name, p in model.named_parameters()}
    h = F.max_pool2d(F.relu(F.conv2d(torch.tensor(x), params["conv.W"], params["conv.b"], padding=1)), 2)
    logits = h.flatten(1) @ params["fc.W"] + params["fc.b"]
    torch_loss = F.cross_entropy(logits, torch.tensor(labels))
    torch_loss.backward()
    assert model(x).shape == (3, 10)
    assert loss.item() == pytest.approx(torch_loss.item(), rel=1e-12)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(
            p.grad.data, params[name].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name
        )


def test_small_cnn_learns_a_few_digits() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images[:120, None] / 16.0, digits.target[:120]  # (120, 1, 8, 8) in [0, 1]
    model = nn.SmallCNN(seed=0)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    first = nn.train_step(model, opt, x, y)
    for _ in range(25):
        last = nn.train_step(model, opt, x, y)
    assert last < 0.5 * first
    assert nn.accuracy(model, x, y) > 0.8


def test_predict_is_the_arg_max_of_the_logits() -> None:
    model = nn.MLP(2, (3,), 4, seed=5)
    x = np.random.default_rng(7).normal(size=(50, 2))
    labels = nn.predict(model, x)
    np.testing.assert_array_equal(labels, model(x).data.argmax(axis=1))
    assert len(set(labels.tolist())) > 1  # not a constant answer
    assert nn.accuracy(model, x, labels) == 1.0 and nn.accuracy(model, x, (labels + 1) % 4) == 0.0


def test_convnet_is_the_digits_nature_classifier_layer_for_layer() -> None:
    # `lab fit digits --net nature` trains Classifier(nets.NatureCNN((1, 8, 8), 256), 10): "small" geometry.
    from tasks.models import Classifier

    torch.manual_seed(0)
    torch_net = Classifier(nets.NatureCNN((1, 8, 8), out_dim=16, channels=(4, 6, 5)), num_classes=3).double()
    convs = tuple(zip((4, 6, 5), *nets.cnn.NATURE_GEOMETRIES["small"], strict=True))  # (channels, k, s, p)
    model = nn.from_torch_state_dict(nn.ConvNet((1, 8, 8), convs, 16, 3, seed=1), torch_net.state_dict())
    x = np.random.default_rng(9).uniform(size=(5, 1, 8, 8))
    np.testing.assert_allclose(
        model(x).data, torch_net(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-12
    )
    # And back: scratch weights in the torch net give the scratch outputs.
    other = nn.ConvNet((1, 8, 8), convs, 16, 3, seed=2)
    torch_net.load_state_dict(nn.to_torch_state_dict(other, layout="classifier"), strict=True)
    np.testing.assert_allclose(
        torch_net(torch.tensor(x)).detach().numpy(), other(x).data, rtol=1e-10, atol=1e-12
    )
    nature_defaults = tuple(zip((32, 64, 64), *nets.cnn.NATURE_GEOMETRIES["small"], strict=True))
    assert nature_defaults == nn.NATURE_SMALL
    with pytest.raises(ValueError, match=r"^a ConvNet has the classifier layout only, not 'mlp'$"):
        nn.to_torch_state_dict(other, layout="mlp")


def test_convnet_gradients_match_torch() -> None:
    model = nn.ConvNet((2, 6, 6), ((3, 3, 2, 1), (4, 3, 1, 1)), 5, 4, seed=3)
    x = np.random.default_rng(10).normal(size=(3, 2, 6, 6))
    labels = np.array([0, 3, 1])
    ops.cross_entropy(model(x), labels).backward()
    params = {name: torch.tensor(p.data, requires_grad=True) for name, p in model.named_parameters()}
    h = torch.tensor(x)
    for i, stride in enumerate((2, 1)):
        h = F.relu(F.conv2d(h, params[f"convs.{i}.W"], params[f"convs.{i}.b"], stride=stride, padding=1))
    h = F.relu(h.flatten(1) @ params["fc.W"] + params["fc.b"])
    F.cross_entropy(h @ params["head.W"] + params["head.b"], torch.tensor(labels)).backward()
    for name, p in model.named_parameters():
        np.testing.assert_allclose(
            p.grad.data, params[name].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name
        )


def test_xor_slide_network_is_the_slides() -> None:
    model = nn.xor_slide_network()
    np.testing.assert_array_equal(model(XOR_INPUTS).data[:, 0], XOR_LABELS)
    assert [p.name for p in model.parameters()] == ["W", "b", "W'", "b'"]
    assert model.activation == "relu" and model.hidden == (2,)
