"""Handwritten digits: scikit-learn's bundled 8x8 images (1797 of them, 10 classes).

The same CNN classes the agents use on 84x84 Mario frames (``nature``, ``impala``) run here on
``(1, 8, 8)`` images (nets switches NatureCNN to 3x3 kernels for small images), next to the ViT and
the MLP on the flattened 64 pixels. The test split is held out and
stratified by class; it is never used for model selection. Training batches may be shifted by up to
``shift`` pixels (zero padding), a cheap augmentation that matters with only ~1400 training images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import nets
from core.compute import DEVICES, seed_everything
from core.config import option
from core.plots import pyplot
from tasks import scratch_fit
from tasks.loop import Tensors, fit
from tasks.models import Classifier

NAME = "digits"
DESCRIPTION = "scikit-learn's 8x8 handwritten digits with a CNN (impala, nature), the ViT or the MLP"
NETS = ("nature", "impala", "vit", "mlp")


@dataclass
class DigitsConfig:
    """Settings of ``lab fit digits``."""

    net: str = option("nature", "encoder network", choices=NETS)
    epochs: int = option(40, "passes over the training images", min=1, max=10_000)
    seed: int = option(0, "seed of the split, torch, numpy and random", min=0)
    lr: float = option(3e-3, "peak AdamW learning rate", min=1e-6, max=10.0)
    batch_size: int = option(64, "images per gradient step", min=1, max=10_000)
    test_fraction: float = option(0.2, "share of the images held out (stratified)", min=0.05, max=0.9)
    shift: int = option(
        -1,
        "random shift augmentation in pixels: 0 = off, -1 = 1 for image encoders, 0 for the MLP",
        min=-1,
        max=3,
    )
    hidden: tuple[int, ...] = option((256, 128), "hidden widths when net=mlp", min=1, max=8192)
    features: int = option(256, "encoder output width for the CNNs", min=8, max=8192)
    weight_decay: float = option(1e-4, "AdamW weight decay", min=0.0, max=1.0)
    warmup: float = option(0.05, "share of all steps spent warming up the learning rate", min=0.0, max=0.5)
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=("cosine", "constant"))
    device: str = option("auto", "auto (CUDA when available), cpu or cuda", choices=DEVICES)
    engine: str = option("torch", "torch, or scratch: the numpy engine", choices=scratch_fit.ENGINES)
    compare: bool = option(True, "with engine=scratch: also train torch from the same start, report both")

    def check(self) -> None:
        scratch_fit.check_engine(NAME, self.engine, self.net)


def load_split(test_fraction: float, seed: int) -> tuple[Tensors, Tensors]:
    """Loads the digits and splits them, stratified by class.

    Returns:
        ``(train_images, train_labels), (test_images, test_labels)``: images ``(N, 1, 8, 8)`` uint8
        scaled from 0..16 to 0..255 (the encoders divide uint8 by 255), labels ``(N,)`` int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    as_tensors = lambda x, y: (torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))  # noqa: E731
    return as_tensors(train_x, train_y), as_tensors(test_x, test_y)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shifts each image by its own random (dy, dx) in [-max_shift, max_shift], filling with zeros.

    Args:
        images: ``(B, C, H, W)``.
        max_shift: the largest shift in pixels.
        generator: source of the shifts.

    Returns:
        ``(B, C, H, W)``, same dtype.
    """
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # (B, C, H + 2s, W + 2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator)
    rows = offsets[0][:, None] + torch.arange(height)  # (B, H): source row of each output row
    cols = offsets[1][:, None] + torch.arange(width)  # (B, W)
    batch_index = torch.arange(batch)[:, None, None, None]
    channel_index = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


def build_model(config: DigitsConfig) -> Classifier:
    """Encoder ``(B, 1, 8, 8) -> (B, D)`` from nets and a linear head to the ten digits."""
    if config.net == "mlp":
        encoder = nets.build("mlp", in_shape=(1, 8, 8), hidden=tuple(config.hidden), activation="relu")
    else:
        encoder = nets.build(config.net, in_shape=(1, 8, 8), out_dim=config.features)
    return Classifier(encoder, num_classes=10)


def run(config: DigitsConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Trains on the training split and reports accuracy on the held-out split.

    Args:
        config: the task settings.
        run_dir: existing directory receiving the outputs.
        progress: show a progress bar.
        resume: continue the run in ``run_dir`` from its newest epoch checkpoint.

    Returns:
        The metrics dict written to ``run_dir/metrics.json``.
    """
    seed_everything(config.seed)
    train, test = load_split(config.test_fraction, config.seed)
    model = build_model(config)

    # Shifts teach the convolutions translation invariance; the MLP only loses accuracy from them.
    shift = config.shift if config.shift >= 0 else (0 if config.net == "mlp" else 1)

    def augment(batch: Tensors, generator: torch.Generator) -> Tensors:
        images, labels = batch
        return (random_shift(images, shift, generator), labels) if shift else batch

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
        augment=augment,
        extra_metrics={"shift": shift},
    )
    plot_confusion(result.model, test, Path(run_dir) / "confusion.png", result.metrics["test_accuracy"])
    return result.metrics


def plot_confusion(model: torch.nn.Module, test: Tensors, path: Path, accuracy: float) -> Path:
    """Confusion matrix of the held-out split as a PNG (rows: true digit, columns: predicted)."""
    plt = pyplot()

    from tasks.loop import predict

    images, labels = test
    predicted = predict(model, (images,)).argmax(-1)
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    ax.imshow(confusion.numpy(), cmap="Blues")
    for (true, pred), count in np.ndenumerate(confusion.numpy()):
        if count:
            ax.text(
                pred,
                true,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="k" if true != pred else "w",
            )
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"digits, held-out accuracy {accuracy:.3f}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
