"""Task models: an encoder from nets/ plus a head from nets/, composed, with no layers of their own.

Every layer (linear, conv, recurrent, attention) is built by ``nets``; these wrappers only route
tensors: image/vector -> encoder -> head, or tokens -> sequence encoder -> pooled summary -> head,
or tokens -> sequence encoder -> the head at every position.
"""

from __future__ import annotations

import torch
from torch import nn

import nets

SEQUENCE_NETS = ("lstm", "gru", "transformer")


class Classifier(nn.Module):
    """``head(encoder(x))``: a vector or image classifier, ``(B, *in_shape) -> (B, num_classes)``."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nets.LinearClassifier(encoder.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class SequenceClassifier(nn.Module):
    """One label per sequence: ``(B, T)`` token ids + ``(B, T)`` padding mask -> ``(B, num_classes)``.

    The encoder's per-position outputs ``(B, T, D)`` are pooled over the valid positions, either the
    last one (natural for a left-to-right RNN) or their mean (natural for a Transformer).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "last") -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.head = nets.LinearClassifier(encoder.out_dim, num_classes)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        y, _ = self.encoder(tokens, padding_mask=padding_mask)  # (B, T, D)
        return self.head(nets.pool_sequence(y, padding_mask, how=self.pool))  # (B, C)


class SequenceTagger(nn.Module):
    """One label per position: ``(B, T)`` token ids + padding mask -> ``(B, T, num_classes)``."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nets.LinearClassifier(encoder.out_dim, num_classes)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        y, _ = self.encoder(tokens, padding_mask=padding_mask)  # (B, T, D)
        return self.head(y)  # (B, T, C): the head maps the last dim at every position


def build_sequence_encoder(
    net: str,
    vocab_size: int,
    *,
    hidden_size: int,
    num_layers: int,
    heads: int,
    max_len: int,
    causal: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """An LSTM, GRU or Transformer encoder over token ids (the embedding lives inside the net).

    Args:
        net: ``lstm``, ``gru`` or ``transformer``.
        vocab_size: number of token ids, padding included.
        hidden_size: RNN hidden size, or the Transformer's ``d_model``; also the embedding width.
        num_layers: RNN layers or Transformer blocks.
        heads: attention heads (Transformer only).
        max_len: longest sequence the positional encoding must cover (Transformer only).
        causal: Transformer attends only to earlier positions.
        dropout: Transformer dropout.
    """
    if net in ("lstm", "gru"):
        return nets.build(
            net, in_dim=hidden_size, hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size
        )
    if net == "transformer":
        return nets.build(
            "transformer",
            in_dim=hidden_size,
            d_model=hidden_size,
            depth=num_layers,
            heads=heads,
            max_len=max_len,
            causal=causal,
            vocab_size=vocab_size,
            dropout=dropout,
        )
    raise ValueError(f"unknown sequence net {net!r}; valid: {', '.join(SEQUENCE_NETS)}")
