"""Convolutional image encoders: NatureCNN (Mnih et al. 2015) and ImpalaCNN (Espeholt et al. 2018).

Both take (*, C, H, W) uint8 or float images (uint8 is scaled by 1/255 inside ``forward``) and return
(*, out_dim) features. Both work from Mario's 4x84x84 frame stacks down to 1x8x8 digits: NatureCNN
switches to small 3x3 kernels when the image is too small for its 8x8 stride-4 stem, and ImpalaCNN's
three stride-2 pools shrink any image to at least 1x1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nets.layers import check_image_shape, image_to_float, layer_init

# Per-layer (kernels, strides, paddings) of the three NatureCNN convolutions.
NATURE_GEOMETRIES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]] = {
    "nature": ((8, 4, 3), (4, 2, 1), (0, 0, 0)),  # 84 -> 20 -> 9 -> 7
    "small": ((3, 3, 3), (1, 2, 1), (1, 1, 1)),  # 8 -> 8 -> 4 -> 4; 7 -> 7 -> 4 -> 4
}


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _fits(geometry: str, height: int, width: int) -> bool:
    for k, s, p in zip(*NATURE_GEOMETRIES[geometry], strict=True):
        height, width = _conv_out(height, k, s, p), _conv_out(width, k, s, p)
        if min(height, width) < 1:
            return False
    return True


class NatureCNN(nn.Module):
    """The DQN encoder of Mnih et al. (2015): three ReLU convolutions and a ReLU Linear layer.

    Args:
        in_shape: (C, H, W) of one image.
        out_dim: Size of the final Linear layer; None returns the flattened convolution output.
        channels: Output channels of the three convolutions.
        geometry: "nature" (8x8/4, 4x4/2, 3x3/1; needs H, W >= 36), "small" (3x3 kernels, strides
            1, 2, 1, padding 1; for digits and MiniGrid views), or "auto": "nature" when it fits.
        channels_last: Run the convolutions in channels-last memory format (faster on recent GPUs,
            same results); the input is still indexed (B, C, H, W).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (4, 84, 84),
        out_dim: int | None = 512,
        channels: tuple[int, int, int] = (32, 64, 64),
        geometry: str = "auto",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        c, h, w = self.in_shape
        if geometry == "auto":
            geometry = "nature" if _fits("nature", h, w) else "small"
        if geometry not in NATURE_GEOMETRIES:
            raise ValueError(
                f"unknown geometry '{geometry}'; valid geometries: auto, {', '.join(NATURE_GEOMETRIES)}"
            )
        if not _fits(geometry, h, w):
            raise ValueError(f"NatureCNN geometry '{geometry}' does not fit images of size {h}x{w}")
        self.geometry = geometry
        layers: list[nn.Module] = []
        for out_c, k, s, p in zip(channels, *NATURE_GEOMETRIES[geometry], strict=True):
            layers += [layer_init(nn.Conv2d(c, out_c, k, s, p)), nn.ReLU()]
            c = out_c
        self.conv = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, *self.in_shape)).shape[1]
        self.fc = (
            nn.Identity()
            if out_dim is None
            else nn.Sequential(layer_init(nn.Linear(flat, out_dim)), nn.ReLU())
        )
        self.out_dim = flat if out_dim is None else out_dim
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(*, C, H, W) uint8 or float -> (*, out_dim)."""
        check_image_shape(x, self.in_shape, "NatureCNN")
        lead = x.shape[:-3]
        x = x.reshape(-1, *self.in_shape)  # (N, C, H, W)
        if self.channels_last:  # reorder the uint8 pixels: a quarter of the bytes of the float image
            x = x.contiguous(memory_format=torch.channels_last)
        x = image_to_float(x)  # in [0, 1] for uint8; keeps the memory format
        return self.fc(self.conv(x)).reshape(*lead, self.out_dim)


class ResidualBlock(nn.Module):
    """x + conv(relu(conv(relu(x)))), two 3x3 convolutions that keep the channel count."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ConvSequence(nn.Module):
    """IMPALA stage: 3x3 conv, 3x3 max-pool with stride 2 (halves H and W, rounding up), two residual blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.res0 = ResidualBlock(out_channels)
        self.res1 = ResidualBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv(x), kernel_size=3, stride=2, padding=1)
        return self.res1(self.res0(x))


class ImpalaCNN(nn.Module):
    """The IMPALA ResNet encoder of Espeholt et al. (2018), as in CleanRL's procgen PPO.

    Convolutions keep PyTorch's default init (as CleanRL does); the final Linear is orthogonal.
    84x84 images shrink to 11x11 after the three stages, 8x8 digits to 1x1.

    Args:
        in_shape: (C, H, W) of one image.
        channels: Output channels of each stage (one stride-2 pool per stage).
        out_dim: Size of the final ReLU Linear layer; None returns the flattened stage output.
        channels_last: Run the convolutions in channels-last memory format (same results).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (4, 84, 84),
        channels: tuple[int, ...] = (16, 32, 32),
        out_dim: int | None = 256,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        stages: list[nn.Module] = []
        c = self.in_shape[0]
        for out_c in channels:
            stages.append(ConvSequence(c, out_c))
            c = out_c
        self.stages = nn.Sequential(*stages, nn.Flatten(), nn.ReLU())
        with torch.no_grad():
            flat = self.stages(torch.zeros(1, *self.in_shape)).shape[1]
        self.fc = (
            nn.Identity()
            if out_dim is None
            else nn.Sequential(layer_init(nn.Linear(flat, out_dim)), nn.ReLU())
        )
        self.out_dim = flat if out_dim is None else out_dim
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(*, C, H, W) uint8 or float -> (*, out_dim)."""
        check_image_shape(x, self.in_shape, "ImpalaCNN")
        lead = x.shape[:-3]
        x = x.reshape(-1, *self.in_shape)  # (N, C, H, W)
        if self.channels_last:  # reorder the uint8 pixels: a quarter of the bytes of the float image
            x = x.contiguous(memory_format=torch.channels_last)
        x = image_to_float(x)  # keeps the memory format
        return self.fc(self.stages(x)).reshape(*lead, self.out_dim)
