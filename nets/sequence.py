"""Helpers shared by the sequence modules (RNNs, Transformer): input checks and pooling.

Conventions of every sequence module in ``nets``:

- ``forward(x, state=None, reset=None, padding_mask=None) -> (y, new_state)``, batch first:
  x is (B, T, in_dim) float, or (B, T) long token ids when the module has a ``vocab_size``;
  y is (B, T, out_dim) and is zero at padded positions.
- ``state`` is a tuple of tensors whose first dim is the batch (B, ...), so ``state[i][env_ids]``
  selects environments; ``initial_state(batch_size, device)`` builds it and None means "initial".
- ``reset`` (B, T) bool: True where a new episode starts; memory from before is dropped first.
- ``padding_mask`` (B, T) bool: True at padded positions; they neither change the state nor are
  seen by other positions.
"""

from __future__ import annotations

import torch


def check_sequence_args(
    x: torch.Tensor, reset: torch.Tensor | None, padding_mask: torch.Tensor | None, tokens: bool, name: str
) -> None:
    """Raises a ValueError that names the problem when the forward arguments have the wrong shapes."""
    want = "(B, T) token ids" if tokens else "(B, T, in_dim) floats"
    if x.dim() != (2 if tokens else 3) or (tokens and x.is_floating_point()):
        raise ValueError(f"{name} expects {want}, got {tuple(x.shape)} {x.dtype}")
    for label, mask in (("reset", reset), ("padding_mask", padding_mask)):
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2])):
            raise ValueError(f"{name}: {label} must be a bool tensor of shape {tuple(x.shape[:2])}")


def pool_sequence(
    y: torch.Tensor, padding_mask: torch.Tensor | None = None, how: str = "last"
) -> torch.Tensor:
    """Summarises a (B, T, D) sequence of outputs as (B, D), skipping padded positions.

    Args:
        y: Outputs of a sequence module, (B, T, D).
        padding_mask: (B, T) bool, True at padded positions; None means no padding.
        how: "last" takes the output at the last real (non-padded) position of each row, wherever the
            padding is; "mean" averages the real positions.

    Returns:
        (B, D) summary; rows that are all padding give the output at position 0 ("last") or zeros ("mean").
    """
    if how == "last":
        if padding_mask is None:
            return y[:, -1]
        positions = torch.arange(y.shape[1], device=y.device)  # (T,)
        last = (positions * ~padding_mask).argmax(dim=1)  # (B,) index of the last real position
        return y[torch.arange(y.shape[0], device=y.device), last]
    if how == "mean":
        if padding_mask is None:
            return y.mean(dim=1)
        weights = (~padding_mask).unsqueeze(-1).to(y.dtype)  # (B, T, 1)
        return (y * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    raise ValueError(f"unknown pooling '{how}'; valid poolings: last, mean")
