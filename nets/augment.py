"""Image augmentations on whole batches, pure torch: the random shift of RAD and DrQ, and the small
affine jitter, crops and noise that self-supervised learning needs on 8x8 digits.

Random shift (Laskin et al. 2020, RAD; Kostrikov et al. 2021, DrQ): pad each image by ``pad``
pixels, repeating its border pixels as DrQ does, and crop back to the original size at an offset
drawn per image from ``[0, 2 * pad]`` in each direction. The content moves by at most ``pad``
pixels; the dtype (uint8 frame stacks stay uint8) and shape are kept, and all channels of one
image (the 4 frames of a Mario stack) move together.

Every function takes ``(B, C, H, W)`` batches and a ``torch.Generator`` (or the offsets
themselves), so that a caller that owns a seeded generator gets the same augmentations again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTS = ("none", "shift")  # the choices of the agents' ``augment`` option
SHIFT_PAD = 4  # pixels each side for 84x84 frames, as in RAD and DrQ


def replicate_pad(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Pads the last two dims by ``pad`` pixels on every side, repeating the border pixels.

    ``F.pad(mode="replicate")`` has no integer kernels on the CPU; five slice copies do the same
    for any dtype.

    Args:
        images: ``(B, C, H, W)``, any dtype.
        pad: pixels added on each side (>= 0).

    Returns:
        ``(B, C, H + 2 pad, W + 2 pad)``, same dtype and device.
    """
    if pad == 0:
        return images
    batch, channels, height, width = images.shape
    padded = images.new_empty((batch, channels, height + 2 * pad, width + 2 * pad))
    padded[:, :, pad : pad + height, pad : pad + width] = images
    padded[:, :, pad : pad + height, :pad] = images[:, :, :, :1]  # left columns
    padded[:, :, pad : pad + height, pad + width :] = images[:, :, :, -1:]  # right columns
    padded[:, :, :pad] = padded[:, :, pad : pad + 1]  # top rows, corners included
    padded[:, :, pad + height :] = padded[:, :, pad + height - 1 : pad + height]  # bottom rows
    return padded


def shift_offsets(batch: int, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop offsets ``(2, B)`` int64 on the CPU, row then column, each uniform in ``[0, 2 * pad]``;
    ``pad`` is the identity shift."""
    return torch.randint(0, 2 * pad + 1, (2, batch), generator=generator)


def shift_images(images: torch.Tensor, offsets: torch.Tensor, pad: int = SHIFT_PAD) -> torch.Tensor:
    """Pads by ``pad`` (border pixels repeated) and crops each image at its own offset.

    Output pixel ``(i, j)`` of image b is input pixel ``(i + dy_b - pad, j + dx_b - pad)``, clamped
    to the image: offsets ``(pad, pad)`` give the image back unchanged.

    On the CPU each image is one slice copy of the padded batch: a gather with per-pixel indices
    moves the same bytes several times slower (``tests/test_augment.py`` checks the two agree).
    On CUDA, where each copy would be a kernel launch, the batch is one gather.

    Args:
        images: ``(B, C, H, W)``, any dtype.
        offsets: ``(2, B)`` integer offsets in ``[0, 2 * pad]`` (:func:`shift_offsets`).
        pad: the largest shift in pixels.

    Returns:
        ``(B, C, H, W)``, same dtype and device.
    """
    if images.dim() != 4:
        raise ValueError(f"shift_images expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    if offsets.shape != (2, images.shape[0]):
        raise ValueError(f"offsets must be (2, {images.shape[0]}), got {tuple(offsets.shape)}")
    if pad == 0:
        return images.clone()
    padded = replicate_pad(images, pad)  # (B, C, H + 2p, W + 2p)
    if images.is_cuda:
        return _crop_by_gather(padded, offsets.to(images.device), images.shape[-2:])
    return _crop_by_slices(padded, offsets, images.shape[-2:])


def _crop_by_slices(padded: torch.Tensor, offsets: torch.Tensor, size: torch.Size) -> torch.Tensor:
    height, width = size
    out = padded.new_empty((*padded.shape[:2], height, width))
    for index, (dy, dx) in enumerate(zip(*offsets.tolist(), strict=True)):
        out[index] = padded[index, :, dy : dy + height, dx : dx + width]
    return out


def _crop_by_gather(padded: torch.Tensor, offsets: torch.Tensor, size: torch.Size) -> torch.Tensor:
    batch, channels, padded_height, padded_width = padded.shape
    height, width = size
    arange_h = torch.arange(height, device=padded.device)
    arange_w = torch.arange(width, device=padded.device)
    # Flat index into each padded image: (dy + i) * W_padded + (dx + j), shape (B, H*W).
    rows = (offsets[0][:, None] + arange_h) * padded_width  # (B, H)
    flat = (rows[:, :, None] + offsets[1][:, None, None] + arange_w).reshape(batch, 1, height * width)
    gathered = padded.reshape(batch, channels, padded_height * padded_width).gather(
        2, flat.expand(batch, channels, height * width)
    )
    return gathered.reshape(batch, channels, height, width)


def random_shift(
    images: torch.Tensor, pad: int = SHIFT_PAD, generator: torch.Generator | None = None
) -> torch.Tensor:
    """RAD/DrQ's random shift: each image moved by up to ``pad`` pixels in each direction.

    Args:
        images: ``(B, C, H, W)``, any dtype (uint8 frame stacks stay uint8).
        pad: the largest shift in pixels.
        generator: source of the offsets (a CPU generator); None uses torch's global one.

    Returns:
        ``(B, C, H, W)``, same dtype and device.
    """
    return shift_images(images, shift_offsets(images.shape[0], pad, generator), pad)


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    max_degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    max_translate: float = 1.0,
) -> torch.Tensor:
    """Small random rotations, zooms (a crop when > 1) and sub-pixel shifts, one per image, in one
    ``affine_grid`` + ``grid_sample`` pass (bilinear, zeros outside the image).

    Args:
        images: ``(B, C, H, W)`` float (values keep their range).
        generator: source of the angles, zooms and shifts (CPU).
        max_degrees: rotations are uniform in ``[-max_degrees, max_degrees]``.
        scale: zoom factors are uniform in this range (1.1 shows the middle 91% of the image).
        max_translate: shifts are uniform in ``[-max_translate, max_translate]`` pixels.

    Returns:
        ``(B, C, H, W)``, same dtype.
    """
    if not images.is_floating_point():
        raise ValueError(f"random_affine expects float images, got {images.dtype}; divide uint8 by 255 first")
    batch, _, height, width = images.shape
    uniform = torch.rand((4, batch), generator=generator).to(images.device, images.dtype)
    angle = (2 * uniform[0] - 1) * math.radians(max_degrees)
    zoom = scale[0] + (scale[1] - scale[0]) * uniform[1]
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
    shift_x = (2 * uniform[2] - 1) * max_translate * 2 / width
    shift_y = (2 * uniform[3] - 1) * max_translate * 2 / height
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift_x], dim=1), torch.stack([sin, cos, shift_y], dim=1)], dim=1
    )  # (B, 2, 3): output coordinates -> input coordinates
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_noise(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``images + N(0, std^2)`` per pixel, clamped to [0, 1]: float images in [0, 1]."""
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    return (images + std * noise).clamp_(0.0, 1.0)
