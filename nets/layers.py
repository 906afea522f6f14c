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
    """uint8 pixels -> float in [0, 1]; float input passes through unchanged; other ints are cast.

    Under bf16 autocast on ``x``'s device the pixels become bf16 directly, not fp32: the next layer of
    every encoder here is a convolution (after a zero pad in the ViT), which autocast would feed
    ``bf16(x.float() / 255)`` anyway. The numbers are the same bit for bit: 0..255 are exact in bf16,
    and torch divides bf16 tensors with fp32 arithmetic, the same as for fp32 ones, rounding once at
    the end (tests/test_nets.py checks all 256 values on the CPU; not yet checked on CUDA). But the
    pass writes 2 bytes per pixel instead of 4, reads and writes them once instead of three times,
    and the convolution's own cast disappears (``python -m benchmarks.learner_parts`` measures a
    Mario PPO minibatch step both ways).

    Args:
        x: Images of any shape; uint8 pixels are scaled by 1/255.

    Returns:
        A floating-point tensor of ``x``'s shape and memory format: fp32, or bf16 for uint8 input
        under bf16 autocast.
    """
    if x.dtype == torch.uint8:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16:
            return x.to(torch.bfloat16) / 255.0
        return x.float() / 255.0
    if not x.is_floating_point():
        return x.float()
    return x


def check_image_shape(x: torch.Tensor, in_shape: tuple[int, int, int], name: str) -> None:
    """Raises a ValueError naming both shapes unless ``x`` is ``(*, C, H, W)`` with (C, H, W) == in_shape."""
    if x.dim() < 4 or tuple(x.shape[-3:]) != in_shape:
        raise ValueError(f"{name} expects input (B, {', '.join(map(str, in_shape))}), got {tuple(x.shape)}")
