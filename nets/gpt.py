"""A decoder-only (GPT-style) language model on the shared Transformer of ``nets.transformer``.

``GPT`` is the causal ``TransformerEncoder`` over token ids (learned positions) with a linear head to
next-token logits, as in Radford et al. (2018) and nanoGPT. It adds no layers of its own beyond the
head; activation checkpointing is the encoder's ``checkpoint_blocks`` switch. ``generate`` samples a
continuation of a prompt, one token at a time, seeing at most the last ``context`` tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nets.transformer import TransformerEncoder, init_transformer_weights


class GPT(nn.Module):
    """Token ids ``(B, T)`` -> next-token logits ``(B, T, vocab_size)``, causal: position t sees 0..t.

    Args:
        vocab_size: Number of token ids (256 for bytes).
        d_model: Width of the residual stream (also the embedding width).
        depth: Number of Transformer blocks.
        heads: Attention heads per block; must divide ``d_model``.
        context: Longest sequence the model reads (its learned position table).
        dropout: Dropout on embeddings, attention weights and residual branches (training only).
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        depth: int = 4,
        heads: int = 4,
        context: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size, self.context = vocab_size, context
        self.transformer = TransformerEncoder(
            in_dim=d_model,
            d_model=d_model,
            depth=depth,
            heads=heads,
            max_len=context,
            causal=True,
            vocab_size=vocab_size,
            dropout=dropout,
            pos_encoding="learned",
        )
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        init_transformer_weights(self.head)
        self.out_dim = vocab_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) long with T <= context -> logits (B, T, vocab_size)."""
        y, _ = self.transformer(tokens)  # (B, T, d_model)
        return self.head(y)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Samples ``new_tokens`` tokens after ``prompt``.

        Args:
            prompt: (B, T0) long token ids, T0 >= 1.
            new_tokens: How many tokens to append.
            temperature: Logits are divided by it before the softmax; lower is more conservative.
            top_k: Sample only among the k likeliest tokens; 0 samples from all of them.
            generator: Source of the draws (a CPU generator), for repeatable samples.

        Returns:
            (B, T0 + new_tokens) long: the prompt followed by the sampled tokens.
        """
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(
                f"prompt must be (B, T0) token ids with T0 >= 1, got shape {tuple(prompt.shape)}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        was_training = self.training
        self.eval()
        tokens = prompt
        for _ in range(new_tokens):
            logits = self(tokens[:, -self.context :])[:, -1].float() / temperature  # (B, V)
            if 0 < top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1).cpu()
            next_token = torch.multinomial(probs, 1, generator=generator).to(tokens.device)  # (B, 1)
            tokens = torch.cat([tokens, next_token], dim=1)
        self.train(was_training)
        return tokens
