"""Small pieces shared by every encoder: initialisation, activations, image scaling, shape checks."""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """Returns a fresh activation module by name.

    Args:
        name: One of ``ACTIVATIONS`` ("relu", "tanh", "gelu", ...).

    Raises:
        ValueError: If the name is unknown; the message lists the valid names.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; valid activations: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def layer_init[M: nn.Module](layer: M, gain: float = math.sqrt(2), bias: float = 0.0) -> M:
    """Orthogonal weights and constant bias, as in CleanRL (gain sqrt(2) hidden, 0.01 policy, 1 value).

    Args:
        layer: A module with ``weight`` and ``bias`` (Linear, Conv2d).
        gain: Scale of the orthogonal matrix.
        bias: Value of every bias entry.

    Returns:
        The same layer, initialised in place.
    """
    nn.init.orthogonal_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.constant_(layer.bias, bias)
    return layer


def image_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; float input passes through unchanged; other ints are cast."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        return x.float()
    return x


def check_image_shape(x: torch.Tensor, in_shape: tuple[int, int, int], name: str) -> None:
    """Raises a ValueError naming both shapes unless ``x`` is ``(*, C, H, W)`` with (C, H, W) == in_shape."""
    if x.dim() < 4 or tuple(x.shape[-3:]) != in_shape:
        raise ValueError(f"{name} expects input (B, {', '.join(map(str, in_shape))}), got {tuple(x.shape)}")
