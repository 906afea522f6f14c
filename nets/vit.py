"""Vision Transformer encoder (Dosovitskiy et al. 2021): image patches as tokens, then Transformer blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nets.layers import check_image_shape, image_to_float
from nets.transformer import Block, init_transformer_weights


class ViTEncoder(nn.Module):
    """Patch embedding -> [CLS] + learned positions -> pre-norm blocks -> LayerNorm -> pooled features.

    Images whose sides are not a multiple of the patch size are zero-padded on the right and bottom.
    When the image has fewer than two patches per side (e.g. 1x8x8 digits with the default 12), the
    patch size falls back to ``max(1, min(H, W) // 4)``; ``self.patch_size`` holds the value used.

    Args:
        in_shape: (C, H, W) of one image; uint8 input is scaled by 1/255.
        patch_size: Side of the square patches.
        dim: Width of the tokens.
        depth: Number of Transformer blocks.
        heads: Attention heads per block.
        out_dim: If given, a ReLU Linear layer maps the pooled token to out_dim; else ``out_dim == dim``.
        pool: "cls" (the [CLS] token) or "mean" (average of the patch tokens).
        dropout: Dropout in the blocks (training only).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (4, 84, 84),
        patch_size: int = 12,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        out_dim: int | None = None,
        pool: str = "cls",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"unknown pool '{pool}'; valid pools: cls, mean")
        self.in_shape = tuple(in_shape)
        c, h, w = self.in_shape
        if 2 * patch_size > min(h, w):
            patch_size = max(1, min(h, w) // 4)
        self.patch_size, self.pool = patch_size, pool
        self.grid = (math.ceil(h / patch_size), math.ceil(w / patch_size))
        self.padding = (0, self.grid[1] * patch_size - w, 0, self.grid[0] * patch_size - h)  # F.pad order
        self.patch_embed = nn.Conv2d(c, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, dropout) for _ in range(depth)))
        self.blocks.apply(init_transformer_weights)
        self.ln_f = nn.LayerNorm(dim)
        self.fc = nn.Identity() if out_dim is None else nn.Sequential(nn.Linear(dim, out_dim), nn.ReLU())
        self.out_dim = dim if out_dim is None else out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(*, C, H, W) uint8 or float -> (*, out_dim)."""
        check_image_shape(x, self.in_shape, "ViTEncoder")
        lead = x.shape[:-3]
        x = image_to_float(x.reshape(-1, *self.in_shape))  # (N, C, H, W)
        x = F.pad(x, self.padding)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, P, dim) with P = grid_h * grid_w
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (N, 1+P, dim)
        tokens = self.ln_f(self.blocks(tokens + self.pos_embed))
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)  # (N, dim)
        return self.fc(pooled).reshape(*lead, self.out_dim)
