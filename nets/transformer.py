"""Pre-norm Transformer encoder for token sequences and, with ``memory_len > 0``, for RL memory.

Two modes:

- ``memory_len == 0`` (supervised sequences): one pass of self-attention over the whole (B, T)
  batch, optionally causal, with a padding mask, and with reset masks turned into segment ids so that
  no position attends across an episode boundary. Positions count from the start of each segment.
- ``memory_len == M > 0`` (RL): the output at step t is computed from a window of the last M + 1
  embedded inputs (steps t-M .. t, the older ones taken from ``state``), re-running every layer over
  that window. The state is the last M embedded inputs and their validity mask. Because each output
  depends only on its own window, calling ``forward`` step by step (T=1) gives exactly the same
  outputs as one call over the whole rollout, for any T and any depth; that is what recurrent PPO
  needs when it re-runs a rollout from the state saved at its start. Cost: O(T * (M+1)^2) per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nets.sequence import check_sequence_args


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``F.scaled_dot_product_attention`` (flash/efficient kernels).

    Args:
        dim: Model width; must be divisible by ``heads``.
        heads: Number of attention heads.
        dropout: Dropout on the attention weights and on the output projection (training only).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.proj_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """x (B, T, C); attn_mask bool broadcastable to (B, heads, T, T), True = may attend."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (
            z.view(B, T, self.heads, C // self.heads).transpose(1, 2) for z in (q, k, v)
        )  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj_dropout(self.proj(y))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attn_mask, is_causal)
        return x + self.mlp(self.ln2(x))


def init_transformer_weights(module: nn.Module) -> None:
    """nanoGPT's init for attention and MLP layers: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PositionalEncoding(nn.Module):
    """Maps integer positions (any shape) to (*, dim) vectors: fixed sinusoids or a learned table.

    Args:
        max_len: Number of positions (0 .. max_len-1).
        dim: Width of each vector.
        kind: "sinusoidal" (Vaswani et al. 2017) or "learned".
    """

    def __init__(self, max_len: int, dim: int, kind: str = "sinusoidal") -> None:
        super().__init__()
        self.max_len = max_len
        if kind == "sinusoidal":
            position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (L, 1)
            freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
            table = torch.zeros(max_len, dim)
            table[:, 0::2] = torch.sin(position * freq)
            table[:, 1::2] = torch.cos(position * freq[: dim // 2])
            self.register_buffer("table", table, persistent=False)
        elif kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        else:
            raise ValueError(f"unknown positional encoding '{kind}'; valid encodings: sinusoidal, learned")

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


class TransformerEncoder(nn.Module):
    """Pre-norm Transformer encoder over (B, T) sequences with explicit state (see the module doc).

    Args:
        in_dim: Width of the float input, or of the token embedding when ``vocab_size`` is given.
        d_model: Width of the residual stream; ``out_dim == d_model``.
        depth: Number of blocks.
        heads: Attention heads per block.
        max_len: Longest sequence (memory_len == 0) or window (memory_len + 1 <= max_len).
        causal: Each position attends only to itself and earlier positions.
        memory_len: Steps of past input kept in the state for step-by-step RL use; 0 disables it.
        vocab_size: If given, the input is (B, T) token ids embedded inside the net.
        dropout: Dropout on embeddings, attention weights and residual branches (training only).
        pos_encoding: "sinusoidal" or "learned".
    """

    def __init__(
        self,
        in_dim: int,
        d_model: int = 64,
        depth: int = 2,
        heads: int = 4,
        max_len: int = 512,
        causal: bool = False,
        memory_len: int = 0,
        vocab_size: int | None = None,
        dropout: float = 0.0,
        pos_encoding: str = "sinusoidal",
    ) -> None:
        super().__init__()
        if memory_len < 0 or memory_len + 1 > max_len:
            raise ValueError(f"memory_len must be in [0, max_len - 1] = [0, {max_len - 1}], got {memory_len}")
        self.in_dim, self.d_model, self.max_len = in_dim, d_model, max_len
        self.causal, self.memory_len, self.vocab_size = causal, memory_len, vocab_size
        self.embedding = nn.Embedding(vocab_size, in_dim) if vocab_size is not None else None
        self.input_proj = nn.Linear(in_dim, d_model)
        self.pos = PositionalEncoding(max_len, d_model, pos_encoding)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, heads, dropout) for _ in range(depth))
        self.blocks.apply(init_transformer_weights)
        self.ln_f = nn.LayerNorm(d_model)
        self.out_dim = d_model
        # Activation checkpointing, switched on by a training loop: in a pass that records gradients
        # each block keeps only its input and recomputes its activations during backward.
        self.checkpoint_blocks = False

    def initial_state(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Empty memory: () when memory_len == 0, else (memory (B, M, d_model) zeros, valid (B, M) False)."""
        if self.memory_len == 0:
            return ()
        memory = torch.zeros(batch_size, self.memory_len, self.d_model, device=device)
        valid = torch.zeros(batch_size, self.memory_len, dtype=torch.bool, device=device)
        return memory, valid

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, ...] | None = None,
        reset: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Encodes a batch of sequences.

        Args:
            x: (B, T, in_dim) floats, or (B, T) long token ids when ``vocab_size`` is set.
            state: From ``initial_state`` or a previous call; None means empty memory.
            reset: (B, T) bool, True where a new episode starts; nothing before it is attended to.
            padding_mask: (B, T) bool, True at padded positions; they are never attended to.

        Returns:
            y (B, T, d_model), zero at padded positions, and the new state.
        """
        check_sequence_args(x, reset, padding_mask, self.embedding is not None, "TransformerEncoder")
        h = self.input_proj(self.embedding(x) if self.embedding is not None else x)  # (B, T, D)
        if self.memory_len == 0:
            y, new_state = self._forward_sequence(h, reset, padding_mask), ()
        else:
            y, new_state = self._forward_memory(h, state, reset, padding_mask)
        if padding_mask is not None:
            y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return y, new_state

    def _forward_sequence(
        self, h: torch.Tensor, reset: torch.Tensor | None, padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        B, T, _ = h.shape
        if self.max_len < T:
            raise ValueError(f"sequence length {T} exceeds max_len={self.max_len}")
        t = torch.arange(T, device=h.device)
        # Positions count from the start of each segment: t - (last reset at or before t); (T,) or (B, T).
        positions = t if reset is None else t - torch.cummax(torch.where(reset, t, 0), dim=1).values
        x = self.drop(h + self.pos(positions))
        if reset is None and padding_mask is None:
            attn_mask, is_causal = None, self.causal  # fast path: SDPA builds the causal mask itself
        else:
            allowed = torch.ones(B, T, T, dtype=torch.bool, device=h.device)  # (B, query, key)
            if padding_mask is not None:
                allowed = allowed & ~padding_mask.unsqueeze(1)
            if reset is not None:
                segment = reset.long().cumsum(dim=1)  # (B, T) episode id within the batch row
                allowed = allowed & (segment.unsqueeze(2) == segment.unsqueeze(1))
            if self.causal:
                allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            allowed = allowed | torch.eye(T, dtype=torch.bool, device=h.device)  # no query without keys
            attn_mask, is_causal = allowed.unsqueeze(1), False  # (B, 1, T, T)
        for block in self.blocks:
            x = self._run_block(block, x, attn_mask, is_causal)
        return self.ln_f(x)

    def _run_block(
        self, block: Block, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool = False
    ) -> torch.Tensor:
        """``block(x, ...)``, through non-reentrant activation checkpointing when it is switched on."""
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
        return block(x, attn_mask, is_causal)

    def _forward_memory(
        self,
        h: torch.Tensor,
        state: tuple[torch.Tensor, ...] | None,
        reset: torch.Tensor | None,
        padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, D = h.shape
        M, W = self.memory_len, self.memory_len + 1
        memory, memory_valid = state if state else self.initial_state(B, h.device)
        seq = torch.cat([memory.to(h.dtype), h], dim=1)  # (B, M+T, D) embedded inputs, oldest first
        new_valid = (
            torch.ones(B, T, dtype=torch.bool, device=h.device) if padding_mask is None else ~padding_mask
        )
        valid = torch.cat([memory_valid, new_valid], dim=1)  # (B, M+T)
        starts = torch.zeros(B, M + T, dtype=torch.long, device=h.device)
        if reset is not None:
            starts[:, M:] = reset.long()
        segment = starts.cumsum(dim=1)  # (B, M+T) episode id; the memory is episode 0

        # One window of W = M+1 slots per new step t: slots t .. t+M of the concatenated sequence.
        windows = seq.unfold(1, W, 1).permute(0, 1, 3, 2).reshape(B * T, W, D)  # (B*T, W, D)
        win_valid = valid.unfold(1, W, 1).reshape(B * T, W)  # (B*T, W)
        win_segment = segment.unfold(1, W, 1).reshape(B * T, W)  # (B*T, W)
        same_episode = win_segment.unsqueeze(2) == win_segment.unsqueeze(1)  # (B*T, W query, W key)
        allowed = win_valid.unsqueeze(1) & same_episode
        if self.causal:
            allowed = allowed & torch.ones(W, W, dtype=torch.bool, device=h.device).tril()
        allowed = allowed | torch.eye(W, dtype=torch.bool, device=h.device)
        # Positions are window slots, so the newest step is always at position M.
        x = self.drop(windows + self.pos(torch.arange(W, device=h.device)))
        for block in self.blocks:
            x = self._run_block(block, x, allowed.unsqueeze(1))
        y = self.ln_f(x[:, -1]).view(B, T, D)  # output of each window's newest step

        # Keep the last M inputs; only those of each row's latest episode stay valid.
        keep = valid & (segment == segment[:, -1:])  # (B, M+T)
        return y, (seq[:, -M:], keep[:, -M:])
