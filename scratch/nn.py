"""Layers and models: ``Parameter``, ``Module``, ``Linear``, ``Conv2d``, ``MLP``, ``SmallCNN``, ``ConvNet``.

A ``Module`` finds its parameters by looking through its attributes: a ``Parameter``, another
``Module``, or a list/tuple of them. No registration calls are needed, and the names follow the
attribute path (``layers.0.W``), which is how the torch bridges below map weights.

Initialisation is torch's default for ``nn.Linear`` and ``nn.Conv2d``: weights and biases uniform in
[-1/sqrt(fan_in), 1/sqrt(fan_in)], where fan_in is the number of inputs of one output unit (in_features,
or C*KH*KW for a kernel). The weight variance is then 1 / (3 fan_in), so the variance of a
pre-activation (a sum of fan_in terms) does not depend on the width of the layer. (The lab's torch
``nets.MLP`` uses orthogonal weights instead; the bridges copy weights, so the initialisation does not
matter for them.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from scratch import ops
from scratch.core import Variable, as_variable, no_grad

if TYPE_CHECKING:
    import torch

    from scratch.optim import Optimizer

ACTIVATIONS: dict[str, Callable[[Any], Variable]] = {"tanh": ops.tanh, "relu": ops.relu}


class Parameter(Variable):
    """A Variable that a Module trains: ``Module.parameters()`` collects these and nothing else."""


class Module:
    """Base class of layers and models: ``model(x)`` calls ``forward(x)``."""

    def forward(self, *inputs: Any) -> Variable:
        raise NotImplementedError

    def __call__(self, *inputs: Any) -> Variable:
        return self.forward(*inputs)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """``(dotted name, parameter)`` for every parameter, in attribute order, sub-modules included."""
        for name, value in vars(self).items():
            yield from _named_parameters_in(value, prefix + name)

    def parameters(self) -> list[Parameter]:
        """Every parameter of this module and its sub-modules."""
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        """Clears the gradient of every parameter (gradients accumulate across backward calls)."""
        for p in self.parameters():
            p.cleargrad()


def _named_parameters_in(value: Any, name: str) -> Iterator[tuple[str, Parameter]]:
    if isinstance(value, Parameter):
        yield name, value
    elif isinstance(value, Module):
        yield from value.named_parameters(name + ".")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _named_parameters_in(item, f"{name}.{i}")


def uniform(rng: np.random.Generator, bound: float, shape: tuple[int, ...]) -> Parameter:
    """A float64 parameter drawn uniformly from [-bound, bound]."""
    return Parameter(rng.uniform(-bound, bound, size=shape))


class Linear(Module):
    """``x @ W + b``: (N, in_features) -> (N, out_features).

    W is stored as (in_features, out_features), so the forward pass needs no transpose; torch's
    ``nn.Linear.weight`` is the transpose, (out_features, in_features).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, rng: np.random.Generator | None = None
    ) -> None:
        rng = np.random.default_rng() if rng is None else rng
        bound = 1.0 / math.sqrt(in_features)
        self.W = uniform(rng, bound, (in_features, out_features))
        self.b = uniform(rng, bound, (out_features,)) if bias else None

    def forward(self, x: Any) -> Variable:
        y = ops.matmul(x, self.W)
        return y if self.b is None else y + self.b


class Conv2d(Module):
    """2-D convolution, (N, C, H, W) -> (N, OC, OH, OW); W is (OC, C, KH, KW) as in torch."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        rng: np.random.Generator | None = None,
    ) -> None:
        rng = np.random.default_rng() if rng is None else rng
        self.stride, self.padding = stride, padding
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.W = uniform(rng, bound, (out_channels, in_channels, kernel_size, kernel_size))
        self.b = uniform(rng, bound, (out_channels,)) if bias else None

    def forward(self, x: Any) -> Variable:
        return ops.conv2d(x, self.W, self.b, self.stride, self.padding)


def get_activation(name: str) -> Callable[[Any], Variable]:
    """The activation function called ``name``; ValueError naming the valid ones otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(Module):
    """Linear -> activation -> ... -> Linear: (N, in_dim) -> (N, out_dim) logits or values.

    Input with more than two axes, such as images (N, 1, 8, 8), is flattened to (N, in_dim) first.

    Args:
        in_dim: Input features.
        hidden: Widths of the hidden layers, each followed by the activation.
        out_dim: Outputs of the final Linear layer (no activation after it).
        activation: "tanh" or "relu".
        seed: Seed of the weight initialisation.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: tuple[int, ...],
        out_dim: int,
        activation: str = "tanh",
        seed: int | None = 0,
    ) -> None:
        self.in_dim, self.hidden, self.out_dim = in_dim, tuple(hidden), out_dim
        self.activation = activation
        self.act = get_activation(activation)
        rng = np.random.default_rng(seed)
        sizes = [in_dim, *self.hidden, out_dim]
        self.layers = [Linear(a, b, rng=rng) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]

    def forward(self, x: Any) -> Variable:
        x = as_variable(x)
        if x.ndim > 2:
            x = x.reshape(len(x), -1)
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


class SmallCNN(Module):
    """A CNN for small images such as the 1x8x8 digits: conv 3x3 -> ReLU -> max-pool 2x2 -> Linear.

    (N, C, S, S) -> conv, padding 1 -> (N, channels, S, S) -> pool -> (N, channels, S/2, S/2) -> flatten
    -> Linear -> (N, num_classes) logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        channels: int = 8,
        num_classes: int = 10,
        seed: int | None = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.conv = Conv2d(in_channels, channels, 3, padding=1, rng=rng)
        self.fc = Linear(channels * (image_size // 2) ** 2, num_classes, rng=rng)

    def forward(self, x: Any) -> Variable:
        h = ops.max_pool2d(ops.relu(self.conv(x)), 2)  # (N, channels, S/2, S/2)
        return self.fc(h.reshape(len(h), -1))


class ConvNet(Module):
    """Convolutions with ReLU, a ReLU Linear layer, a Linear output: nets.NatureCNN with a classifier head.

    (N, C, H, W) floats -> [conv -> ReLU] per entry of ``convs`` -> flatten (N, D) -> Linear -> ReLU
    -> (N, features) -> Linear -> (N, out_dim) logits. With ``NATURE_SMALL`` as ``convs`` this is the
    network ``lab fit digits --net nature`` trains on the 8x8 digits, layer for layer, so its weights
    move between the engines with the bridges below.

    Args:
        in_shape: (C, H, W) of one image.
        convs: (out_channels, kernel, stride, padding) of each convolution, first to last.
        features: Width of the ReLU Linear layer after the convolutions.
        out_dim: Outputs of the final Linear layer (no activation after it).
        seed: Seed of the weight initialisation.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        convs: tuple[tuple[int, int, int, int], ...],
        features: int,
        out_dim: int,
        seed: int | None = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        channels, height, width = in_shape
        self.in_shape, self.features, self.out_dim = tuple(in_shape), features, out_dim
        self.convs = []
        for out_channels, kernel, stride, padding in convs:
            self.convs.append(Conv2d(channels, out_channels, kernel, stride, padding, rng=rng))
            channels = out_channels
            height = ops.conv_output_size(height, kernel, stride, padding)
            width = ops.conv_output_size(width, kernel, stride, padding)
        self.fc = Linear(channels * height * width, features, rng=rng)
        self.head = Linear(features, out_dim, rng=rng)

    def forward(self, x: Any) -> Variable:
        x = as_variable(x)
        for conv in self.convs:
            x = ops.relu(conv(x))  # (N, OC, OH, OW)
        x = ops.relu(self.fc(x.reshape(len(x), -1)))  # (N, features)
        return self.head(x)


# nets.NatureCNN's "small" geometry (3x3 kernels, strides 1, 2, 1, padding 1) at its default widths.
NATURE_SMALL: tuple[tuple[int, int, int, int], ...] = ((32, 3, 1, 1), (64, 3, 2, 1), (64, 3, 1, 1))


def xor_slide_network() -> MLP:
    """The hand-built XOR network of the course slide, 2 -> 2 (ReLU) -> 1.

    h = relu(x W + b) with W = [[1, 1], [1, 1]] and b = [0, -1], so h = (x1 + x2, x1 + x2 - 1)+;
    y = h W' with W' = [1, -2] (a column) and no bias. On the truth table's inputs (0, 0), (0, 1),
    (1, 0), (1, 1) the output is 0, 1, 1, 0: the second unit fires only for (1, 1) and cancels the
    first twice over.
    """
    model = MLP(2, (2,), 1, activation="relu")
    hidden, output = model.layers
    hidden.W.data = np.array([[1.0, 1.0], [1.0, 1.0]])  # (in, out): column j feeds hidden unit j
    hidden.b.data = np.array([0.0, -1.0])
    output.W.data = np.array([[1.0], [-2.0]])
    output.b.data = np.array([0.0])
    for param, name in ((hidden.W, "W"), (hidden.b, "b"), (output.W, "W'"), (output.b, "b'")):
        param.name = name  # the slide's names, for graph pictures
    return model


# ==================================================================================================
# Training helpers
# ==================================================================================================


def train_step(model: Module, optimizer: Optimizer, x: Any, labels: Any) -> float:
    """One gradient step on the cross-entropy of ``model(x)``; returns the loss before the step."""
    model.zero_grad()
    loss = ops.cross_entropy(model(x), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def predict(model: Module, x: Any) -> np.ndarray:
    """The arg-max class of each row of ``model(x)``, computed without recording a graph: (N,) ints."""
    with no_grad():
        return model(x).data.argmax(axis=1)


def accuracy(model: Module, x: Any, labels: Any) -> float:
    """Share of the rows of ``x`` whose predicted class equals the label."""
    return float(np.mean(predict(model, x) == np.asarray(labels)))


# ==================================================================================================
# Bridges to the lab's torch nets
# ==================================================================================================
# nets.MLP(in_shape, hidden, out_dim, activation) keeps Linear, activation, Linear, ... in ``layers``
# (an nn.Sequential), so scratch layer i is the torch module ``layers.{2 i}``. Two layouts hold an MLP:
#   "mlp":        nets.MLP(in_dim, hidden, out_dim=out_dim, activation), the last Linear inside it;
#   "classifier": tasks.models.Classifier(nets.MLP(in_dim, hidden, out_dim=None, activation), out_dim),
#                 what `lab fit xor/playground/digits --net mlp` trains: the hidden layers are
#                 ``encoder.layers.{2 i}`` and the last Linear is the head, ``head.linear``.
# A ConvNet has the classifier layout only: Classifier(nets.NatureCNN(in_shape, features), out_dim)
# keeps conv, ReLU, conv, ... in ``encoder.conv`` (convolution i is ``encoder.conv.{2 i}``), the ReLU
# Linear layer as ``encoder.fc.0`` and the head as ``head.linear``.
# Linear weights are stored transposed in torch, (out, in); kernels have the same layout in both.
# scratch imports no other lab package (ARCHITECTURE.md), so the bridges work on plain state dicts;
# torch itself is imported on use.

LAYOUTS = ("mlp", "classifier")
Bridged = MLP | ConvNet


def weight_layers(model: Bridged) -> list[Linear | Conv2d]:
    """The layers holding ``model``'s weights, first to last."""
    return model.layers if isinstance(model, MLP) else [*model.convs, model.fc, model.head]


def torch_layer_names(model: Bridged, layout: str = "mlp") -> list[str]:
    """The torch module name of each of ``weight_layers(model)`` in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; valid: {', '.join(LAYOUTS)}")
    if isinstance(model, ConvNet):
        if layout != "classifier":
            raise ValueError(f"a ConvNet has the classifier layout only, not '{layout}'")
        return [f"encoder.conv.{2 * i}" for i in range(len(model.convs))] + ["encoder.fc.0", "head.linear"]
    if layout == "mlp":
        return [f"layers.{2 * i}" for i in range(len(model.layers))]
    return [f"encoder.layers.{2 * i}" for i in range(len(model.layers) - 1)] + ["head.linear"]


def torch_weight(layer: Linear | Conv2d) -> np.ndarray:
    """The layer's weight in torch's layout: Linear (out, in), Conv2d (OC, C, KH, KW) as it is."""
    return layer.W.data.T if isinstance(layer, Linear) else layer.W.data


def to_torch_state_dict(model: Bridged, layout: str = "mlp") -> dict[str, torch.Tensor]:
    """The torch state dict holding ``model``'s weights in ``layout`` ("mlp" or "classifier").

    Tensors are float64; load them into a ``.double()`` module for bit-level agreement.
    """
    import torch

    state = {}
    for name, layer in zip(torch_layer_names(model, layout), weight_layers(model), strict=True):
        state[f"{name}.weight"] = torch.tensor(torch_weight(layer).copy())
        state[f"{name}.bias"] = torch.tensor(layer.b.data.copy())
    return state


def from_torch_state_dict(model: Bridged, state: dict[str, Any], layout: str | None = None) -> Bridged:
    """Copies the weights of a torch state dict into ``model`` (in place) and returns it.

    Args:
        model: A scratch MLP or ConvNet of the same architecture.
        state: ``module.state_dict()`` of a nets.MLP or a tasks Classifier around one (or around a
            nets.NatureCNN, for a ConvNet); any dtype/device.
        layout: "mlp" or "classifier"; None picks "classifier" when the keys start with "encoder.".

    Raises:
        ValueError: A key is missing or extra, or a shape differs; the message names it.
    """
    if layout is None:
        layout = "classifier" if any(key.startswith("encoder.") for key in state) else "mlp"
    expected = to_torch_state_dict(model, layout)
    if set(state) != set(expected):
        raise ValueError(
            f"state dict keys {sorted(state)} do not match the {layout} layout of this "
            f"{type(model).__name__}, {sorted(expected)}"
        )
    arrays = {key: _float64_array(value) for key, value in state.items()}
    for key, array in arrays.items():
        if array.shape != tuple(expected[key].shape):
            needs = tuple(expected[key].shape)
            raise ValueError(f"{key}: shape {array.shape} where the {type(model).__name__} needs {needs}")
    for name, layer in zip(torch_layer_names(model, layout), weight_layers(model), strict=True):
        weight = arrays[f"{name}.weight"]
        layer.W.data = (weight.T if isinstance(layer, Linear) else weight).copy()  # back to scratch's layout
        layer.b.data = arrays[f"{name}.bias"].copy()
    return model


def _float64_array(value: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a float64 ndarray."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)
