"""TensorFlow-Playground-style 2-D classification: circle, xor, gaussian and spiral, with noise.

The four generators follow playground.tensorflow.org (dataset.ts): points live in [-6, 6]^2 and are
divided by 6 before the network sees them, so inputs are about unit scale. ``noise`` in [0, 0.5] means
what it means there (uniform jitter of ``noise * radius`` for circle and xor, ``noise`` per coordinate
for the spiral, a wider variance for the Gaussians). The run writes the decision boundary as a PNG
and, frame by frame over training, as a GIF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import nets
from core.compute import DEVICES, seed_everything
from core.config import option
from core.plots import pyplot
from tasks import scratch_fit
from tasks.loop import fit, predict
from tasks.models import Classifier

NAME = "playground"
DESCRIPTION = (
    "TensorFlow-Playground 2-D sets (circle, xor, gaussian, spiral) with noise; decision-boundary plots"
)
NETS = ("mlp",)
DATASETS = ("circle", "xor", "gaussian", "spiral")
SCALE = 6.0  # data coordinates are divided by this before they reach the network
GRID = 120  # decision-boundary raster resolution (GRID x GRID network evaluations)


@dataclass
class PlaygroundConfig:
    """Settings of ``lab fit playground``."""

    net: str = option("mlp", "encoder network", choices=NETS)
    epochs: int = option(200, "passes over the training points", min=1, max=100_000)
    seed: int = option(0, "seed of the data, the split, torch, numpy and random", min=0)
    lr: float = option(0.01, "peak AdamW learning rate (cosine decay)", min=1e-6, max=10.0)
    batch_size: int = option(32, "points per gradient step", min=1, max=100_000)
    dataset: str = option("spiral", "which 2-D data set", choices=DATASETS)
    noise: float = option(0.05, "noise level as in TensorFlow Playground", min=0.0, max=0.5)
    num_points: int = option(1000, "points in total, before the train/test split", min=8, max=1_000_000)
    test_fraction: float = option(0.5, "share of the points held out for testing", min=0.05, max=0.95)
    hidden: tuple[int, ...] = option((32, 32, 32), "hidden layer widths of the MLP", min=1, max=4096)
    activation: str = option("relu", "hidden activation", choices=("tanh", "relu"))
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0, max=1.0)
    warmup: float = option(0.0, "share of all steps spent warming up the learning rate", min=0.0, max=0.5)
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=("cosine", "constant"))
    gif: bool = option(True, "also write boundary.gif, the decision boundary over training")
    device: str = option("auto", "auto (CUDA when available), cpu or cuda", choices=DEVICES)
    engine: str = option("torch", "torch, or scratch: the numpy engine", choices=scratch_fit.ENGINES)
    compare: bool = option(True, "with engine=scratch: also train torch from the same start, report both")

    def check(self) -> None:
        scratch_fit.check_engine(NAME, self.engine, self.net)


def make_points(
    dataset: str, num_points: int, noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Generates a Playground data set.

    Args:
        dataset: ``circle``, ``xor``, ``gaussian`` or ``spiral``.
        num_points: how many points (both classes together).
        noise: noise level in [0, 0.5].
        rng: the random generator (the caller seeds it).

    Returns:
        ``points`` (N, 2) float32 in data coordinates (about [-6, 6]) and ``labels`` (N,) int64 in {0, 1}.
    """
    half = num_points // 2
    if dataset == "circle":
        # Class 1 inside radius 2.5, class 0 on a ring between 3.5 and 5; jitter by noise * 5.
        radius = 5.0
        inner = rng.uniform(0, radius * 0.5, half)
        outer = rng.uniform(radius * 0.7, radius, num_points - half)
        r = np.concatenate([inner, outer])
        angle = rng.uniform(0, 2 * math.pi, num_points)
        points = np.stack([r * np.sin(angle), r * np.cos(angle)], axis=1)
        points += rng.uniform(-radius, radius, points.shape) * noise
        labels = np.concatenate([np.ones(half), np.zeros(num_points - half)])
    elif dataset == "xor":
        # Quadrants, pushed 0.3 away from the axes; the label is the sign of x * y after the jitter.
        points = rng.uniform(-5, 5, (num_points, 2))
        points += np.where(points > 0, 0.3, -0.3)
        points += rng.uniform(-5, 5, points.shape) * noise
        labels = (points[:, 0] * points[:, 1] >= 0).astype(np.float64)
    elif dataset == "gaussian":
        # Two blobs at (2, 2) and (-2, -2); the variance grows from 0.5 to 4 as noise goes 0 -> 0.5.
        variance = 0.5 + (4.0 - 0.5) * noise / 0.5
        centers = np.array([[2.0, 2.0]] * half + [[-2.0, -2.0]] * (num_points - half))
        points = centers + rng.normal(0, math.sqrt(variance), (num_points, 2))
        labels = np.concatenate([np.ones(half), np.zeros(num_points - half)])
    elif dataset == "spiral":
        # Two arms, 1.75 turns each, radius growing to 5; the second arm is the first turned by pi.
        arm_points, arms = [], []
        for label, (count, delta) in enumerate([(half, 0.0), (num_points - half, math.pi)]):
            t = np.arange(count) / count
            r = 5.0 * t
            angle = 1.75 * t * 2 * math.pi + delta
            arm = np.stack([r * np.sin(angle), r * np.cos(angle)], axis=1)
            arm_points.append(arm + rng.uniform(-1, 1, arm.shape) * noise)
            arms.append(np.full(count, 1 - label))
        points, labels = np.concatenate(arm_points), np.concatenate(arms)
    else:
        raise ValueError(f"unknown playground dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    return points.astype(np.float32), labels.astype(np.int64)


def split(points: np.ndarray, labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    """Shuffles and splits into ``(train_points, train_labels), (test_points, test_labels)`` tensors."""
    order = rng.permutation(len(points))
    n_test = max(1, round(len(points) * test_fraction))
    test_index, train_index = order[:n_test], order[n_test:]
    to_tensors = lambda index: (torch.from_numpy(points[index]) / SCALE, torch.from_numpy(labels[index]))  # noqa: E731
    return to_tensors(train_index), to_tensors(test_index)


def build_model(config: PlaygroundConfig) -> Classifier:
    """MLP encoder ``(B, 2) -> (B, hidden[-1])`` and a linear head to the two classes."""
    encoder = nets.build(config.net, in_shape=2, hidden=tuple(config.hidden), activation=config.activation)
    return Classifier(encoder, num_classes=2)


def boundary_grid(model: torch.nn.Module, extent: float = 1.0, resolution: int = GRID) -> np.ndarray:
    """P(class 1) on a ``(resolution, resolution)`` grid over ``[-extent, extent]^2`` (row 0 at the top)."""
    axis = torch.linspace(-extent, extent, resolution)
    ys, xs = torch.meshgrid(axis.flip(0), axis, indexing="ij")  # flip: image rows run downwards
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)  # (R*R, 2)
    probs = predict(model, (grid,)).softmax(-1)[:, 1]
    return probs.reshape(resolution, resolution).numpy()


def render_frame(
    probs: np.ndarray, points: np.ndarray, labels: np.ndarray, extent: float = 1.0
) -> np.ndarray:
    """Rasterises a decision boundary with its points into an ``(H, W, 3)`` uint8 image, without matplotlib.

    Cheap enough to run every few epochs; the GIF is assembled from these frames.
    """
    low, high = np.array([0.96, 0.60, 0.26]), np.array([0.26, 0.52, 0.80])  # orange = 0, blue = 1
    image = (1 - probs[..., None]) * low + probs[..., None] * high  # (R, R, 3)
    image = 0.35 + 0.65 * image  # lighten the background so that points stand out
    upscale = 3
    image = np.kron(image, np.ones((upscale, upscale, 1)))  # (3R, 3R, 3)
    size = image.shape[0]
    pixels = ((points * [1, -1] + extent) / (2 * extent) * (size - 1)).round().astype(int).clip(1, size - 2)
    for (col, row), label in zip(pixels, labels, strict=True):
        image[row - 1 : row + 2, col - 1 : col + 2] = high * 0.8 if label == 1 else low * 0.8
    return (image * 255).clip(0, 255).astype(np.uint8)


def plot_boundary(
    probs: np.ndarray, train: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...], path: Path, title: str
) -> Path:
    """Decision boundary PNG: P(class 1) as a filled contour, training points filled, test points hollow."""
    plt = pyplot()

    extent = 1.0
    axis = np.linspace(-extent, extent, probs.shape[0])
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.contourf(axis, axis[::-1], probs, levels=np.linspace(0, 1, 11), cmap="RdBu", alpha=0.7)
    ax.contour(axis, axis[::-1], probs, levels=[0.5], colors="k", linewidths=1)
    colors = np.array(["tab:orange", "tab:blue"])
    ax.scatter(train[0][:, 0], train[0][:, 1], c=colors[train[1].numpy()], s=8, label="train")
    ax.scatter(
        test[0][:, 0],
        test[0][:, 1],
        facecolors="none",
        edgecolors=colors[test[1].numpy()],
        s=12,
        label="test",
    )
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(
    config: PlaygroundConfig, run_dir: Path, progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Generates the data set, trains the MLP and writes metrics, boundary plots and checkpoint.

    Args:
        config: the task settings.
        run_dir: existing directory receiving the outputs.
        progress: show a progress bar.
        resume: continue the run in ``run_dir`` from its newest epoch checkpoint (the GIF then
            shows the epochs trained after the resume).

    Returns:
        The metrics dict written to ``run_dir/metrics.json``.
    """
    seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)
    points, labels = make_points(config.dataset, config.num_points, config.noise, rng)
    train, test = split(points, labels, config.test_fraction, rng)
    model = build_model(config)

    frames: list[np.ndarray] = []
    frame_every = max(1, config.epochs // 40)  # about 40 frames whatever the epoch count

    def capture(epoch: int, model: torch.nn.Module) -> None:
        if config.gif and (epoch % frame_every == 0 or epoch == config.epochs):
            frames.append(
                render_frame(boundary_grid(model, resolution=80), train[0].numpy(), train[1].numpy())
            )

    fit_with = scratch_fit.fit if config.engine == "scratch" else fit
    result = fit_with(
        task=NAME,
        config=config,
        model=model,
        train=train,
        test=test,
        run_dir=run_dir,
        progress=progress,
        resume=resume,
        on_epoch_end=capture,
        extra_metrics={"dataset": config.dataset, "noise": config.noise},
    )
    title = f"{config.dataset}, noise {config.noise}: test accuracy {result.metrics['test_accuracy']:.3f}"
    plot_boundary(boundary_grid(result.model), train, test, Path(run_dir) / "boundary.png", title)
    if frames:
        import imageio.v3 as iio

        # Hold the last frame a little longer so the final boundary is readable before the loop restarts.
        durations = [80] * (len(frames) - 1) + [1500]
        # Pillow takes a list only for several frames (one epoch, or one after a resume: a still image).
        duration = durations if len(frames) > 1 else durations[0]
        iio.imwrite(Path(run_dir) / "boundary.gif", np.stack(frames), duration=duration, loop=0)
    return result.metrics
