"""XOR: the four-point table no single perceptron separates, learned by a one-hidden-layer MLP.

The training set is the whole table and so is the test set: the question is whether the network can
represent XOR at all, which a linear model cannot (Minsky and Papert, 1969).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import nets
from core.compute import DEVICES, seed_everything
from core.config import option
from tasks import scratch_fit
from tasks.loop import fit
from tasks.models import Classifier

NAME = "xor"
DESCRIPTION = "the four-point XOR table, learned by an MLP (a perceptron cannot)"
NETS = ("mlp",)


@dataclass
class XorConfig:
    """Settings of ``lab fit xor``."""

    net: str = option("mlp", "encoder network", choices=NETS)
    epochs: int = option(300, "full-batch gradient steps over the four points", min=1, max=100_000)
    seed: int = option(0, "seed of torch, numpy and random", min=0)
    lr: float = option(0.05, "AdamW learning rate", min=1e-6, max=10.0)
    batch_size: int = option(4, "examples per step (4 = the whole table)", min=1, max=4)
    hidden: int = option(8, "width of the hidden layer", min=2, max=1024)
    activation: str = option("tanh", "hidden activation", choices=("tanh", "relu"))
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0, max=1.0)
    device: str = option("auto", "auto (CUDA when available), cpu or cuda", choices=DEVICES)
    engine: str = option("torch", "torch, or scratch: the numpy engine", choices=scratch_fit.ENGINES)
    compare: bool = option(True, "with engine=scratch: also train torch from the same start, report both")
    slide: bool = option(False, "also run the slide's hand-built XOR network on both engines")

    def check(self) -> None:
        scratch_fit.check_engine(NAME, self.engine, self.net)


def xor_table() -> tuple[torch.Tensor, torch.Tensor]:
    """The XOR truth table: inputs ``(4, 2)`` float in {0, 1} and labels ``(4,)`` long."""
    inputs = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 0])
    return inputs, labels


def build_model(config: XorConfig) -> Classifier:
    """MLP encoder ``(B, 2) -> (B, hidden)`` and a linear head to the two classes."""
    encoder = nets.build(config.net, in_shape=2, hidden=(config.hidden,), activation=config.activation)
    return Classifier(encoder, num_classes=2)


def run(config: XorConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Trains on the XOR table and reports accuracy on its four points.

    Args:
        config: the task settings.
        run_dir: existing directory receiving metrics, events, checkpoint and plot.
        progress: show a progress bar.
        resume: continue the run in ``run_dir`` from its newest epoch checkpoint.

    Returns:
        The metrics dict written to ``run_dir/metrics.json``.
    """
    seed_everything(config.seed)  # before the model exists, so its initial weights repeat
    data = xor_table()
    model = build_model(config)
    fit_with = scratch_fit.fit if config.engine == "scratch" else fit
    metrics = fit_with(
        task=NAME,
        config=config,
        model=model,
        train=data,
        test=data,
        run_dir=run_dir,
        progress=progress,
        resume=resume,
    ).metrics
    return scratch_fit.with_slide_network(metrics, run_dir) if config.slide else metrics
