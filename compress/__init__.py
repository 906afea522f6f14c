"""The computational core of ``lab compress``: distillation, pruning, int8 quantisation, measurement.

Everything works on plain ``nn.Module``s and tensors; agents, environments and the command line are
wired on top elsewhere. This package imports torch, numpy, safetensors, torchao, ``nets`` and ``core``
only.

- ``compress.distill``: policy distillation into a smaller student (Rusu et al. 2016), DAgger mixing.
- ``compress.prune``: global magnitude pruning with a cubic schedule; NatureCNN channel pruning.
- ``compress.quantize``: static int8 with calibration, saved as int8 safetensors.
- ``compress.measure``: parameter counts, file sizes, batch-1 latency, the comparison table.
"""

from __future__ import annotations

from typing import NamedTuple

from compress.distill import (
    DistillBatch,
    DistillBuffer,
    DistillStats,
    beta,
    distill_step,
    distillation_loss,
    teacher_logits_from_q,
    teacher_targets_from_q,
)
from compress.measure import (
    CompressionRow,
    OutputComparison,
    ParameterCount,
    compare_outputs,
    count_parameters,
    file_bytes,
    format_table,
    latency_ms,
)
from compress.prune import (
    ChannelPruning,
    SparsityCount,
    cubic_schedule,
    fold_masks,
    prune_channels,
    prune_global,
    sparsity,
    sparsity_count,
)
from compress.quantize import (
    Calibration,
    Int8Conv2d,
    Int8Linear,
    calibrate,
    load_quantized,
    quantize_int8,
    quantized_state,
    save_quantized,
)


class Method(NamedTuple):
    """A compression method of ``lab compress``.

    Attributes:
        name: Its name on the command line.
        summary: One line for ``--help``.
        needs_frames: Needs observations from the environment (calibration or distillation states).
        needs_training: Runs gradient steps (distillation, fine-tuning between pruning rounds).
        smaller_architecture: The result has fewer parameters, not only zeros or fewer bits.
    """

    name: str
    summary: str
    needs_frames: bool
    needs_training: bool
    smaller_architecture: bool


METHODS: dict[str, Method] = {
    "distill": Method("distill", "train a smaller student on the teacher's actions", True, True, True),
    "prune": Method("prune", "zero the smallest weights of all layers, gradually", True, True, False),
    "channels": Method("channels", "remove the lowest-L1 convolution channels", False, False, True),
    "int8": Method("int8", "static int8, calibrated on the agent's own frames", True, False, False),
}


def get_method(name: str) -> Method:
    """The method called ``name``; a ValueError naming the valid methods otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown compression method '{name}'; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "Calibration",
    "ChannelPruning",
    "CompressionRow",
    "DistillBatch",
    "DistillBuffer",
    "DistillStats",
    "Int8Conv2d",
    "Int8Linear",
    "Method",
    "OutputComparison",
    "ParameterCount",
    "SparsityCount",
    "beta",
    "calibrate",
    "compare_outputs",
    "count_parameters",
    "cubic_schedule",
    "distill_step",
    "distillation_loss",
    "file_bytes",
    "fold_masks",
    "format_table",
    "get_method",
    "latency_ms",
    "load_quantized",
    "prune_channels",
    "prune_global",
    "quantize_int8",
    "quantized_state",
    "save_quantized",
    "sparsity",
    "sparsity_count",
    "teacher_logits_from_q",
    "teacher_targets_from_q",
]
