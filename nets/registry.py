"""Build any encoder from a name and keyword arguments: ``nets.build("impala", in_shape=(4, 84, 84))``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from nets.cnn import ImpalaCNN, NatureCNN
from nets.gpt import GPT
from nets.mlp import MLP
from nets.rnn import GRUEncoder, LSTMEncoder
from nets.transformer import TransformerEncoder
from nets.vit import ViTEncoder


@dataclass(frozen=True)
class NetSpec:
    """One registered net: its constructor, the kind of input it takes and a one-line description."""

    name: str
    builder: Callable[..., nn.Module]
    # "vector" (in_shape), "image" (in_shape=(C, H, W)), "sequence" (in_dim, explicit state) or
    # "language" (vocab_size: token ids -> next-token logits)
    kind: str
    description: str


_NETS: dict[str, NetSpec] = {
    spec.name: spec
    for spec in (
        NetSpec("mlp", MLP, "vector", "MLP: flattened input -> tanh hidden layers (64, 64)"),
        NetSpec(
            "nature",
            NatureCNN,
            "image",
            "NatureCNN (Mnih et al. 2015): 3 convs + 512-unit layer; image (C, H, W)",
        ),
        # Students of `lab compress`: NatureCNN geometry at other widths (channels, out_dim can be set).
        NetSpec(
            "nature-tiny",
            lambda in_shape=(4, 84, 84), channels=(16, 32, 16), out_dim=64, geometry="auto": NatureCNN(
                in_shape, out_dim, channels, geometry
            ),
            "image",
            "NatureCNN at convs 16-32-16 + 64 units: a distillation student, 25x fewer weights on Mario",
        ),
        NetSpec(
            "nature-half",
            lambda in_shape=(4, 84, 84), channels=(16, 32, 32), out_dim=256, geometry="auto": NatureCNN(
                in_shape, out_dim, channels, geometry
            ),
            "image",
            "NatureCNN at half every width (convs 16-32-32 + 256 units): the channel-pruned Mario net",
        ),
        NetSpec(
            "impala",
            ImpalaCNN,
            "image",
            "ImpalaCNN (Espeholt et al. 2018): 3 residual stages + 256-unit layer",
        ),
        NetSpec(
            "vit", ViTEncoder, "image", "ViT: image patches -> pre-norm Transformer blocks -> [CLS] features"
        ),
        NetSpec(
            "lstm", LSTMEncoder, "sequence", "LSTM over (B, T) sequences with explicit state, resets, padding"
        ),
        NetSpec(
            "gru", GRUEncoder, "sequence", "GRU over (B, T) sequences with explicit state, resets, padding"
        ),
        NetSpec(
            "transformer",
            TransformerEncoder,
            "sequence",
            "pre-norm Transformer over (B, T) sequences; causal, padding, resets, RL memory",
        ),
        NetSpec(
            "gpt",
            GPT,
            "language",
            "decoder-only language model: the causal Transformer + next-token head; (B, T) ids -> logits",
        ),
    )
}


def names() -> list[str]:
    """Names accepted by ``build``, in a fixed order (vector, image, sequence nets)."""
    return list(_NETS)


def get_spec(name: str) -> NetSpec:
    """The registry entry of a net.

    Raises:
        ValueError: ``unknown net 'x'; valid nets: mlp, nature, ...``.
    """
    if name not in _NETS:
        raise ValueError(f"unknown net '{name}'; valid nets: {', '.join(_NETS)}")
    return _NETS[name]


def describe(name: str) -> str:
    """One-line description of a net, for ``lab list nets``. Raises ValueError for unknown names."""
    return get_spec(name).description


def kind(name: str) -> str:
    """ "vector", "image", "sequence" (nets taking ``in_dim`` and carrying state) or "language"."""
    return get_spec(name).kind


def build(name: str, **kwargs: object) -> nn.Module:
    """Builds a net by name, e.g. ``build("impala", in_shape=(4, 84, 84))`` or ``build("lstm", in_dim=32)``.

    Args:
        name: One of ``names()``.
        **kwargs: Constructor arguments of that net.

    Raises:
        ValueError: For an unknown name, or arguments the constructor does not accept (missing
            required ones included); the message lists the valid choices.
    """
    spec = get_spec(name)
    signature = inspect.signature(spec.builder)
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        raise ValueError(
            f"bad arguments for net '{name}': {error}; accepted: {', '.join(signature.parameters)}"
        ) from None
    return spec.builder(**kwargs)
