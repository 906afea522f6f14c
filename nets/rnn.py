"""Recurrent encoders (LSTM, GRU) with explicit, batch-first state, reset masks and padding masks.

Three paths through ``forward``, all with the same result as feeding the steps one at a time:

- no reset, no padding: one cuDNN call over the whole sequence (the fast path);
- right padding only: ``pack_padded_sequence``, so the final state is the one after each row's last
  real token and padded outputs are zero;
- resets (or padding that is not right-aligned): the sequence is cut at the steps where some row
  resets, the state of those rows is zeroed, and each piece is one cuDNN call; with padding the
  pieces are single steps and padded steps keep the state unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nets.sequence import check_sequence_args


class RecurrentEncoder(nn.Module):
    """Shared code of LSTMEncoder and GRUEncoder; use those.

    Args:
        in_dim: Width of the float input, or of the token embedding when ``vocab_size`` is given.
        hidden_size: Width of the hidden state; ``out_dim == hidden_size``.
        num_layers: Stacked recurrent layers.
        vocab_size: If given, the input is (B, T) token ids embedded inside the net.
    """

    rnn_class: type[nn.RNNBase] = nn.LSTM
    num_state_tensors = 2  # LSTM: (h, c); GRU: (h,)

    def __init__(
        self, in_dim: int, hidden_size: int = 128, num_layers: int = 1, vocab_size: int | None = None
    ) -> None:
        super().__init__()
        self.in_dim, self.hidden_size, self.num_layers, self.vocab_size = (
            in_dim,
            hidden_size,
            num_layers,
            vocab_size,
        )
        self.embedding = nn.Embedding(vocab_size, in_dim) if vocab_size is not None else None
        self.rnn = self.rnn_class(in_dim, hidden_size, num_layers, batch_first=True)
        for name, param in self.rnn.named_parameters():  # as CleanRL's LSTM agents
            if "weight" in name:
                nn.init.orthogonal_(param, 1.0)
            else:
                nn.init.zeros_(param)
        self.out_dim = hidden_size

    def initial_state(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Zero state: a tuple of (B, num_layers, hidden_size) tensors, (h, c) for LSTM, (h,) for GRU."""
        shape = (batch_size, self.num_layers, self.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in range(self.num_state_tensors))

    def _run(self, x: torch.Tensor | nn.utils.rnn.PackedSequence, hx: tuple[torch.Tensor, ...]):
        """One cuDNN call; hx and the returned state are torch's layout, (num_layers, B, H) each."""
        out, new = self.rnn(x, hx if self.num_state_tensors == 2 else hx[0])
        return out, (new if isinstance(new, tuple) else (new,))

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, ...] | None = None,
        reset: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Runs the recurrence over a batch of sequences.

        Args:
            x: (B, T, in_dim) floats, or (B, T) long token ids when ``vocab_size`` is set.
            state: From ``initial_state`` or a previous call; None means zeros.
            reset: (B, T) bool; True zeroes that row's state before step t (a new episode starts).
            padding_mask: (B, T) bool, True at padded steps: they leave the state unchanged.

        Returns:
            y (B, T, hidden_size) (top layer, zero at padded steps) and the new state.
        """
        check_sequence_args(x, reset, padding_mask, self.embedding is not None, type(self).__name__)
        if self.embedding is not None:
            x = self.embedding(x)  # (B, T, in_dim)
        B, T, _ = x.shape
        if state is None:
            state = self.initial_state(B, x.device)
        hx = tuple(s.transpose(0, 1).contiguous().to(x.dtype) for s in state)  # (L, B, H) each

        if reset is None and padding_mask is None:
            y, hx = self._run(x, hx)
        elif reset is None and self._is_right_padded(padding_mask):
            lengths = (~padding_mask).sum(dim=1).cpu()
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, hx = self._run(packed, hx)
            y, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        else:
            y, hx = self._forward_in_pieces(x, hx, reset, padding_mask)
        return y, tuple(h.transpose(0, 1) for h in hx)

    @staticmethod
    def _is_right_padded(padding_mask: torch.Tensor) -> bool:
        """True when every row is real tokens then padding, with at least one real token."""
        lengths = (~padding_mask).sum(dim=1, keepdim=True)  # (B, 1)
        expected = torch.arange(padding_mask.shape[1], device=padding_mask.device) >= lengths  # (B, T)
        return bool((lengths > 0).all()) and torch.equal(expected, padding_mask)

    def _forward_in_pieces(
        self,
        x: torch.Tensor,
        hx: tuple[torch.Tensor, ...],
        reset: torch.Tensor | None,
        padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        T = x.shape[1]
        if padding_mask is not None:
            cuts = list(range(T))  # padded steps must not update the state: go one step at a time
        else:
            cuts = sorted({0, *reset.any(dim=0).nonzero().flatten().tolist()})  # steps where some row resets
        outputs = []
        for start, end in zip(cuts, [*cuts[1:], T], strict=True):
            if reset is not None:
                keep = (~reset[:, start]).to(x.dtype).view(1, -1, 1)  # (1, B, 1)
                hx = tuple(h * keep for h in hx)
            out, new = self._run(x[:, start:end], hx)  # (B, end-start, H)
            if padding_mask is not None:  # end == start + 1
                pad = padding_mask[:, start].view(1, -1, 1)  # (1, B, 1)
                new = tuple(torch.where(pad, h, n) for h, n in zip(hx, new, strict=True))
                out = out.masked_fill(pad.view(-1, 1, 1), 0.0)
            hx = new
            outputs.append(out)
        return torch.cat(outputs, dim=1), hx


class LSTMEncoder(RecurrentEncoder):
    """LSTM over (B, T) sequences; state (h, c), each (B, num_layers, hidden_size). See RecurrentEncoder."""

    rnn_class = nn.LSTM
    num_state_tensors = 2


class GRUEncoder(RecurrentEncoder):
    """GRU over (B, T) sequences; state (h,), (B, num_layers, hidden_size). See RecurrentEncoder."""

    rnn_class = nn.GRU
    num_state_tensors = 1
