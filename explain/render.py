"""Pictures of attributions: heat-map overlays on game frames, feature plots, digit grids, coloured tokens.

Image functions return uint8 RGB arrays (``save_png`` writes one); plot functions write a PNG with
matplotlib (Agg). Every file goes through a temporary file that is ``os.replace``-d into place, so a
crash never leaves half a picture (``core.files``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from core.files import atomic_write_bytes, save_figure
from core.plots import pyplot
from explain.methods import gaussian_blur, to_heatmap

COLORMAPS: dict[str, int] = {"jet": cv2.COLORMAP_JET, "inferno": cv2.COLORMAP_INFERNO}
FONT = cv2.FONT_HERSHEY_SIMPLEX


# ---------------------------------------------------------------------------------------------
# Frames and overlays (uint8 RGB)
# ---------------------------------------------------------------------------------------------


def frame_to_rgb(frame: np.ndarray | torch.Tensor) -> np.ndarray:
    """A displayable (H, W, 3) uint8 RGB frame.

    Args:
        frame: (H, W, 3) or (H, W, 1) or (H, W) image, or a (C, H, W) frame stack (C <= 4, channels
            first; its newest frame, the last channel, is shown). uint8, or float in [0, 1].

    Returns:
        (H, W, 3) uint8.
    """
    image = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if image.ndim == 3 and image.shape[-1] not in (1, 3) and image.shape[0] <= 4:
        image = image[-1]  # (C, H, W) stack -> newest frame
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"cannot show an image of shape {np.shape(frame)} as an RGB frame")
    return np.ascontiguousarray(image)


def overlay(
    frame_rgb: np.ndarray,
    heatmap: np.ndarray | torch.Tensor,
    alpha: float = 0.5,
    colormap: str = "jet",
    by_heat: bool = True,
) -> np.ndarray:
    """The heat map, upscaled to the frame and coloured, alpha-blended over the frame.

    Args:
        frame_rgb: (H, W, 3) uint8 (other layouts go through ``frame_to_rgb``).
        heatmap: (h, w) in [0, 1] (``methods.to_heatmap``); resized bilinearly to (H, W).
        alpha: Weight of the colour map in the blend (where the heat is 1, with ``by_heat``).
        colormap: "jet" or "inferno".
        by_heat: Blend each pixel in proportion to its heat, so that cold parts of the frame stay as
            they are and the eye goes to the hot ones; False blends the whole colour map evenly.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap '{colormap}'; valid: {', '.join(COLORMAPS)}")
    frame = frame_to_rgb(frame_rgb)
    height, width = frame.shape[:2]
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), COLORMAPS[colormap])  # BGR
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
    if not by_heat:
        return cv2.addWeighted(frame, 1.0 - alpha, colored, alpha, 0.0)
    weight = (alpha * heat**1.5)[..., None]  # the power keeps the faint background of a map out of view
    blended = frame.astype(np.float32) * (1.0 - weight) + colored.astype(np.float32) * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _wrap(text: str, width: int, font_scale: float) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and cv2.getTextSize(candidate, FONT, font_scale, 1)[0][0] > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def side_by_side(
    frame: np.ndarray | torch.Tensor,
    overlay_rgb: np.ndarray,
    caption_text: str,
    scale: int = 3,
    font_scale: float = 0.5,
) -> np.ndarray:
    """Game frame and its heat-map overlay next to each other, over a caption bar.

    Args:
        frame: The frame (any layout ``frame_to_rgb`` takes), e.g. the newest frame of the stack.
        overlay_rgb: (H, W, 3) uint8 from ``overlay``, same H, W as the frame.
        caption_text: E.g. "action: right+A  Q: 3.21  method: saliency"; wrapped to the width, "\\n"
            starts a new line.
        scale: Integer upscaling (nearest) of both images, so that 84x84 frames are readable.
        font_scale: Size of the caption's font (cv2's scale; 0.5 is about 10 pixels high).

    Returns:
        (scale * H + bar, 2 * scale * W, 3) uint8 RGB.
    """
    left, right = frame_to_rgb(frame), frame_to_rgb(overlay_rgb)
    if left.shape != right.shape:
        raise ValueError(f"frame {left.shape} and overlay {right.shape} differ in size")
    height, width = left.shape[0] * scale, left.shape[1] * scale
    images = [cv2.resize(image, (width, height), interpolation=cv2.INTER_NEAREST) for image in (left, right)]
    lines = _wrap(caption_text, 2 * width - 12, font_scale)
    line_height = cv2.getTextSize("Ag", FONT, font_scale, 1)[0][1] + 10
    bar = np.zeros((line_height * len(lines) + 8, 2 * width, 3), dtype=np.uint8)
    for row, line in enumerate(lines):
        baseline = 4 + line_height * (row + 1) - 6
        cv2.putText(bar, line, (6, baseline), FONT, font_scale, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([np.concatenate(images, axis=1), bar], axis=0)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Writes an (H, W, 3) uint8 RGB image as a PNG, atomically. Returns the path."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(frame_to_rgb(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cv2 could not encode an image of shape {np.shape(image)} as PNG")
    atomic_write_bytes(path, encoded.tobytes())
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib)
# ---------------------------------------------------------------------------------------------


def _numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def feature_attribution_plot(
    attributions: np.ndarray | torch.Tensor, feature_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Per-feature attribution over an episode (vector observations, e.g. CartPole): lines and a heat strip.

    Args:
        attributions: (T, F) signed attribution of each feature at each step.
        feature_names: F names.
        path: PNG to write.
        title: Figure title.

    Returns:
        ``path``.
    """
    values = _numpy(attributions)
    if values.ndim != 2 or values.shape[1] != len(feature_names):
        raise ValueError(
            f"attributions of shape {values.shape} do not fit {len(feature_names)} feature names"
        )
    plt = pyplot()
    fig, (lines, strip) = plt.subplots(
        2,
        1,
        figsize=(9, 2.2 + 0.35 * len(feature_names) + 2.6),
        sharex=True,
        height_ratios=(2.6, 0.35 * len(feature_names) + 0.4),
        layout="constrained",  # room for long feature names left of the strip
    )
    steps = np.arange(values.shape[0])
    for index, name in enumerate(feature_names):
        lines.plot(steps, values[:, index], label=name, linewidth=1.2)
    lines.axhline(0.0, color="grey", linewidth=0.6)
    lines.set_ylabel("attribution")
    lines.legend(loc="upper right", fontsize=8, ncol=min(4, len(feature_names)))
    limit = float(np.abs(values).max()) or 1.0
    image = strip.imshow(
        values.T,
        aspect="auto",
        cmap="RdBu_r",
        vmin=-limit,
        vmax=limit,
        interpolation="nearest",
        extent=(-0.5, values.shape[0] - 0.5, len(feature_names) - 0.5, -0.5),
    )
    strip.set_yticks(range(len(feature_names)), list(feature_names))
    strip.set_xlabel("step")
    fig.colorbar(image, ax=[lines, strip], shrink=0.6, label="attribution")
    if title:
        fig.suptitle(title)
    return save_figure(fig, Path(path))


def image_grid_plot(
    images: np.ndarray | torch.Tensor,
    maps: np.ndarray | torch.Tensor | Mapping[str, np.ndarray | torch.Tensor],
    true_labels: Sequence[int | str],
    pred_labels: Sequence[int | str],
    path: str | Path,
    columns: int = 6,
    title: str = "",
) -> Path:
    """Small images (digits) next to their heat maps, titled with the true and predicted labels.

    Args:
        images: (N, C, H, W) or (N, H, W); the first channel is shown in grey.
        maps: (N, C, H, W) attributions (reduced with ``to_heatmap``) or (N, H, W) heat maps, or a
            mapping from a method's name to such maps: each example then shows one map per method,
            in the mapping's order, with the method's name over the first row.
        true_labels, pred_labels: N labels each; a wrong prediction gets a red title.
        path: PNG to write.
        columns: Examples per row.
        title: Figure title.

    Returns:
        ``path``.
    """
    pictures = _numpy(images)
    pictures = pictures[:, 0] if pictures.ndim == 4 else pictures
    named = dict(maps) if isinstance(maps, Mapping) else {"": maps}
    heats = {name: _heat(values) for name, values in named.items()}  # each (N, H, W) in [0, 1]
    count = pictures.shape[0]
    sizes = {heat.shape[0] for heat in heats.values()}
    if sizes != {count} or not len(true_labels) == len(pred_labels) == count:
        raise ValueError(
            f"{count} images, {sorted(sizes)} maps, {len(true_labels)}/{len(pred_labels)} labels"
        )
    plt = pyplot()
    panels = 1 + len(heats)
    columns = max(1, min(columns, count))
    rows = max(1, -(-count // columns))
    fig, axes = plt.subplots(
        rows, panels * columns, figsize=(1.5 * columns * panels, 1.7 * rows + 0.5), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for index in range(count):
        first = panels * (index % columns)
        row_axes = axes[index // columns, first : first + panels]
        row_axes[0].imshow(pictures[index], cmap="gray", interpolation="nearest")
        for axis, (name, heat) in zip(row_axes[1:], heats.items(), strict=True):
            axis.imshow(heat[index], cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
            if name and index < columns:
                axis.text(0.5, 1.32, name, transform=axis.transAxes, ha="center", fontsize=7)
        wrong = str(true_labels[index]) != str(pred_labels[index])
        row_axes[0].set_title(
            f"true {true_labels[index]} / pred {pred_labels[index]}",
            fontsize=8,
            color="red" if wrong else "black",
            loc="left",
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def _heat(values: np.ndarray | torch.Tensor) -> np.ndarray:
    raw = _numpy(values)
    return to_heatmap(raw) if raw.ndim == 4 else to_heatmap(raw[:, None])  # (N, H, W) in [0, 1]


@dataclass(frozen=True)
class TokenRow:
    """One line of coloured text in ``token_rows_plot``.

    Attributes:
        tokens: T tokens.
        scores: (T,) one number per token.
        caption: Printed above the tokens (e.g. "true positive / pred positive; integrated gradients").
        signed: True: red for, blue against, scaled by the row's max |score|; False: non-negative
            weights (attention) in shades of green, scaled by the row's max.
    """

    tokens: Sequence[str]
    scores: np.ndarray | torch.Tensor | Sequence[float]
    caption: str = ""
    signed: bool = True


def token_attribution_plot(
    tokens: Sequence[str],
    scores: np.ndarray | torch.Tensor | Sequence[float],
    path: str | Path,
    title: str = "",
) -> Path:
    """Text with each token on a background coloured by its attribution (red for, blue against).

    Args:
        tokens: T tokens, drawn in order and wrapped into lines.
        scores: (T,) signed attribution per token; colour intensity is |score| / max |score|.
        path: PNG to write.
        title: Figure title.

    Returns:
        ``path``.
    """
    return token_rows_plot([TokenRow(tokens, scores)], path, title)


def token_rows_plot(rows: Sequence[TokenRow], path: str | Path, title: str = "", per_line: int = 90) -> Path:
    """Several texts, each token on a background coloured by its score (attributions or attention).

    Each row is scaled by its own largest |score|, so rows of different models or methods are
    comparable in where they point, not in size.

    Args:
        rows: The texts, drawn one under the other, each wrapped to ``per_line`` characters.
        path: PNG to write.
        title: Figure title.
        per_line: Characters per line of text.

    Returns:
        ``path``.
    """
    plt = pyplot()
    from matplotlib import colors

    # Monospace layout: a token's width is its length in characters, so lines wrap without measuring text.
    placed: list[tuple[float, int, str, tuple[float, ...], bool]] = []  # (line, column, text, colour, dark)
    captions: list[tuple[float, str]] = []
    line = 0.0
    for row in rows:
        values = _numpy(row.scores).reshape(-1)
        if len(values) != len(row.tokens):
            raise ValueError(f"{len(row.tokens)} tokens but {len(values)} scores")
        if row.caption:
            captions.append((line, row.caption))
            line += 1
        limit = float(np.abs(values).max()) if len(values) and np.abs(values).max() > 0 else 1.0
        norm = colors.Normalize(-limit, limit) if row.signed else colors.Normalize(0.0, limit)
        cmap = plt.get_cmap("RdBu_r" if row.signed else "Greens")
        column = 0
        for token, score in zip(row.tokens, values, strict=True):
            text = str(token).replace("\n", " ") or " "
            if column and column + len(text) > per_line:
                line, column = line + 1, 0
            placed.append((line, column, text, cmap(norm(score)), abs(score) > 0.6 * limit))
            column += len(text) + 1
        line += 1.4  # a gap between rows
    lines = max(line, 1.0)
    # Heights in inches: title, one row per line of text, the colour legend.
    top, row_height, bottom = 0.45, 0.36, 0.55
    height = top + row_height * lines + bottom
    fig = plt.figure(figsize=(10, height))
    axis = fig.add_axes((0.02, bottom / height, 0.96, row_height * lines / height))
    axis.set_xlim(0, per_line)
    axis.set_ylim(lines, 0)
    axis.axis("off")
    for row_line, caption_text in captions:
        axis.text(0, row_line + 0.5, caption_text, fontsize=9, va="center", ha="left", style="italic")
    for row_line, col, text, colour, dark in placed:
        axis.text(
            col,
            row_line + 0.5,
            text,
            family="monospace",
            fontsize=11,
            va="center",
            ha="left",
            parse_math=False,
            color="white" if dark else "black",  # readable on the darkest colours
            bbox={"facecolor": colour, "edgecolor": "none", "boxstyle": "square,pad=0.15"},
        )
    legend = "red: pushes towards the predicted class, blue: against"
    if any(not row.signed for row in rows):
        legend += "; green: attention weight"
    fig.text(0.5, 0.25 / height, legend + " (each line scaled to its own maximum)", ha="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, Path(path))


# ---------------------------------------------------------------------------------------------
# Agent frames
# ---------------------------------------------------------------------------------------------


def display_heatmaps(
    maps: torch.Tensor | np.ndarray, sigma: float = 1.5, clip_percentile: float = 99.5
) -> np.ndarray:
    """Heat maps for a video: |map| summed over channels, smoothed, scaled to [0, 1] per frame.

    Pixel-level gradient maps are speckled; a light Gaussian blur shows which *regions* the map
    points at. It is for display only: the checks rank the raw maps.

    Args:
        maps: (K, C, H, W) attributions.
        sigma: Blur in observation pixels (0: none).
        clip_percentile: Values above this percentile of each map saturate at 1.

    Returns:
        (K, H, W) float32 in [0, 1].
    """
    heat = torch.as_tensor(maps).detach().float().abs().sum(dim=1)  # (K, H, W)
    if sigma > 0:
        heat = gaussian_blur(heat, sigma)
    return to_heatmap(heat[:, None], clip_percentile=clip_percentile)


def agent_frame(
    frame_rgb: np.ndarray,
    heatmap: np.ndarray,
    caption_text: str,
    crop_top: int = 0,
    alpha: float = 0.7,
    scale: float = 1.0,
    font_scale: float = 0.5,
) -> np.ndarray:
    """The game frame and the same frame under its heat map, side by side over a caption.

    The heat map is over the agent's observation (e.g. 84x84), which is the colour frame below
    ``crop_top`` rows, resized; it is upscaled onto that part of the colour frame.

    Args:
        frame_rgb: (H, W, 3) uint8 colour frame.
        heatmap: (h, w) in [0, 1].
        caption_text: Lines for the caption bar ("\n" starts a new one).
        crop_top: Rows of the colour frame the observation leaves out.
        alpha: Weight of the heat map in the blend where it is hottest.
        scale: Resize the frame by this factor first (0.5 for a small GIF); the caption is drawn
            afterwards, so its text stays sharp.
        font_scale: Size of the caption's font.

    Returns:
        (scale H + bar, 2 scale W, 3) uint8.
    """
    frame = frame_to_rgb(frame_rgb)
    if scale != 1.0:
        size = (round(frame.shape[1] * scale), round(frame.shape[0] * scale))
        frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        crop_top = round(crop_top * scale)
    covered = frame.copy()
    covered[crop_top:] = overlay(frame[crop_top:], heatmap, alpha=alpha)
    return side_by_side(frame, covered, caption_text, scale=1, font_scale=font_scale)


def same_height(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Frames padded with black rows at the bottom to the tallest one's height (a video needs one size;
    captions may wrap into different numbers of lines)."""
    tallest = max(frame.shape[0] for frame in frames)
    return [
        np.pad(frame, ((0, tallest - frame.shape[0]), (0, 0), (0, 0))) if frame.shape[0] < tallest else frame
        for frame in frames
    ]
