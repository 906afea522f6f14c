"""Rollout videos: MP4 (imageio-ffmpeg's bundled ffmpeg, no system ffmpeg) or GIF (pillow).

torch's TensorBoard ``add_video`` needs moviepy's old API, so runs write files with imageio instead
and link them. For Mario with one frame recorded per agent step, the frame rate is 60 / frame_skip
(15 for skip 4): the env's ``metadata["render_fps"]`` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

FORMATS = (".mp4", ".gif")


def _as_rgb(frame: np.ndarray, index: int) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ValueError(f"frame {index} has dtype {frame.dtype}; expected uint8")
    if frame.ndim == 2:  # grayscale -> RGB, so that one video holds one kind of frame
        frame = np.repeat(frame[:, :, None], 3, axis=2)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame {index} has shape {frame.shape}; expected (H, W, 3) or (H, W)")
    return frame


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: float) -> Path:
    """Writes RGB frames to an ``.mp4`` or ``.gif`` file.

    MP4 frames are padded at the bottom/right to even sizes (H.264 with yuv420p needs them), never
    rescaled, so every recorded pixel is kept.

    Args:
        frames: ``(H, W, 3)`` (or ``(H, W)`` grayscale) uint8 arrays, all of one size.
        path: output file; the suffix picks the format. Parent folders are created.
        fps: frames per second of the video (> 0).

    Returns:
        The path written.

    Raises:
        ValueError: no frames, frames of different sizes or types, a bad fps or suffix.
    """
    import imageio.v2 as imageio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unsupported video format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if len(frames) == 0:
        raise ValueError("no frames to write")
    rgb = [_as_rgb(frame, index) for index, frame in enumerate(frames)]
    shape = rgb[0].shape
    for index, frame in enumerate(rgb):
        if frame.shape != shape:
            raise ValueError(f"frame {index} has shape {frame.shape}, frame 0 has {shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        height, width = shape[:2]
        pad = ((0, height % 2), (0, width % 2), (0, 0))
        # macro_block_size=1: imageio would otherwise rescale to multiples of 16 and warn.
        with imageio.get_writer(
            path,
            format="FFMPEG",
            mode="I",
            fps=float(fps),
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=1,
        ) as writer:
            for frame in rgb:
                writer.append_data(np.pad(frame, pad) if any(p[1] for p in pad) else frame)
    else:
        # pillow takes a per-frame duration in milliseconds; GIF stores hundredths of a second.
        imageio.mimwrite(path, rgb, format="GIF", duration=1000.0 / float(fps), loop=0)
    return path
