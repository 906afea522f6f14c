"""Multi-layer perceptron: the encoder for vector observations and the XOR / playground tasks."""

from __future__ import annotations

import math

import torch
from torch import nn

from nets.layers import layer_init, make_activation


class MLP(nn.Module):
    """Fully connected net on flattened input: Linear -> act -> ... [-> Linear to out_dim].

    The Linear layers and activations live in ``self.layers`` (an ``nn.Sequential``: Linear, act,
    Linear, act, ..., [Linear]) so that tests and demos can load hand-made weights, e.g. the 2-2-1
    ReLU network that computes XOR.

    Args:
        in_shape: Shape of one input sample, an int or a tuple; it is flattened. Any leading batch
            dims are kept: (*, *in_shape) -> (*, out_dim). Integer input is cast to float, not scaled.
        hidden: Sizes of the hidden layers, each followed by the activation.
        out_dim: If None the output is the last activated hidden layer (``out_dim == hidden[-1]``, or
            the flattened input size when ``hidden`` is empty); else a final Linear (no activation).
        activation: Name of the activation, see ``nets.layers.ACTIVATIONS``.
    """

    def __init__(
        self,
        in_shape: int | tuple[int, ...],
        hidden: tuple[int, ...] = (64, 64),
        out_dim: int | None = None,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        in_features = math.prod(self.in_shape)
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [layer_init(nn.Linear(in_features, size)), make_activation(activation)]
            in_features = size
        if out_dim is not None:
            layers.append(layer_init(nn.Linear(in_features, out_dim), gain=1.0))
            in_features = out_dim
        self.layers = nn.Sequential(*layers)
        self.out_dim = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(*, *in_shape) -> (*, out_dim)."""
        n = len(self.in_shape)
        if tuple(x.shape[x.dim() - n :]) != self.in_shape:
            raise ValueError(
                f"MLP expects input (B, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            x = x.float()
        return self.layers(x.reshape(*x.shape[: x.dim() - n], -1))
