"""What a compressed model costs and how far it drifts: parameters, bytes on disk, latency, agreement.

``latency_ms`` times batch-1 forward passes on one CPU thread: acting in an environment runs one
observation at a time, and one thread keeps the number comparable between busy and idle machines.
The comparison table of whole runs (episodes included) is ``compress.compare``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from nets.quantized import Int8Conv2d, Int8Linear


class ParameterCount(NamedTuple):
    """total: weights and biases (int8 layers included); nonzero: those not exactly zero."""

    total: int
    nonzero: int


def _weights(module: nn.Module) -> Iterable[torch.Tensor]:
    """Every learnable tensor as the forward pass sees it: masked weights, int8 weights and biases."""
    for layer in module.modules():
        if isinstance(layer, Int8Conv2d | Int8Linear):
            yield from (t for t in (layer.weight, layer.bias) if t is not None)
            continue
        for name, param in layer.named_parameters(recurse=False):
            # A pruned layer's forward uses weight = weight_orig * weight_mask.
            yield getattr(layer, name.removesuffix("_orig")) if name.endswith("_orig") else param


def count_parameters(module: nn.Module) -> ParameterCount:
    """Counts weights and biases; for a pruned model ``nonzero`` is what a sparse format would store."""
    total = nonzero = 0
    for tensor in _weights(module):
        total += tensor.numel()
        nonzero += int(torch.count_nonzero(tensor))
    return ParameterCount(total, nonzero)


def file_bytes(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> int:
    """Total size in bytes of one file or several."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    return sum(Path(path).stat().st_size for path in paths)


def latency_ms(module: nn.Module, example_obs: torch.Tensor, calls: int = 200, warmup: int = 20) -> float:
    """Median wall time of one forward pass, in milliseconds, on one CPU thread in inference mode.

    Args:
        module: The model (put in eval mode; its training flag is restored).
        example_obs: (1, *obs_shape) observation; batch 1 as when acting.
        calls: Timed calls; the median ignores the slow outliers of a shared machine.
        warmup: Untimed calls first (allocator, lazy initialisation).
    """
    if calls < 1 or warmup < 0:
        raise ValueError(f"calls must be >= 1 and warmup >= 0, got {calls} and {warmup}")
    threads = torch.get_num_threads()
    was_training = module.training
    module.eval()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                module(example_obs)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                module(example_obs)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
        module.train(was_training)
    return statistics.median(times) * 1e3


class OutputComparison(NamedTuple):
    """max_abs_diff: largest |reference - candidate| over all logits; agreement: share of equal argmaxes."""

    max_abs_diff: float
    agreement: float


@torch.inference_mode()
def compare_outputs(reference: nn.Module, candidate: nn.Module, obs: torch.Tensor) -> OutputComparison:
    """Compares the first outputs (logits, Q-values) of two models on obs (B, *obs_shape)."""

    def first(module: nn.Module) -> torch.Tensor:
        out = module.eval()(obs)
        return (out[0] if isinstance(out, tuple | list) else out).float()  # (B, A)

    ref, cand = first(reference), first(candidate)
    agreement = (ref.argmax(-1) == cand.argmax(-1)).float().mean()
    return OutputComparison(float((ref - cand).abs().max()), float(agreement))
