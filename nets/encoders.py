"""``build_encoder``: the encoder an agent uses for an observation shape, by name or by ``"auto"``."""

from __future__ import annotations

from torch import nn

from nets.registry import build


def build_encoder(
    name: str,
    in_shape: tuple[int, ...],
    hidden: tuple[int, ...],
    activation: str,
    allowed: tuple[str, ...] = (),
) -> nn.Module:
    """Builds the encoder called ``name`` for observations of ``in_shape``.

    Args:
        name: a net of the registry, or ``"auto"``: ``"nature"`` for (C, H, W) images, else ``"mlp"``.
        in_shape: one observation's shape.
        hidden: the MLP's widths (vector observations).
        activation: the MLP's activation (``"tanh"`` for PPO as in CleanRL, ``"relu"`` for DQN).
        allowed: when given, the names this caller can use (DQN: feed-forward nets only).

    Raises:
        ValueError: ``name`` is not in ``allowed``; the message lists them.
    """
    if name == "auto":
        name = "nature" if len(in_shape) == 3 else "mlp"
    if allowed and name not in allowed:
        raise ValueError(f"this agent needs one of the nets {', '.join(allowed)}, got {name!r}")
    if name == "mlp":
        return build("mlp", in_shape=in_shape, hidden=hidden, activation=activation)
    return build(name, in_shape=in_shape)
