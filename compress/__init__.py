"""The computational core of ``lab compress``: distillation, pruning, int8 quantisation, measurement.

The modules imported here work on plain ``nn.Module``s and tensors (torch, numpy, safetensors,
torchao, ``nets``, ``core``); the command line is ``lab/compress.py``.

- ``compress.distill``: policy distillation into a smaller student (Rusu et al. 2016), DAgger mixing.
- ``compress.prune``: global magnitude pruning with a cubic schedule; NatureCNN channel pruning.
- ``compress.quantize``: static int8 with calibration, saved as int8 safetensors (the int8 layers
  live in ``nets.quantized``, which loading needs).
- ``compress.measure``: parameter counts, file sizes, batch-1 latency, output agreement.
- ``compress.agents``, ``compress.pipeline`` and ``compress.compare`` (imported on use, they need
  agents and envs): trained agents as teachers and students, the three methods of ``lab compress``
  end to end, and the comparison table of runs (``lab eval RUN RUN ...``).
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
    OutputComparison,
    ParameterCount,
    compare_outputs,
    count_parameters,
    file_bytes,
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
        needs_training: Runs gradient steps (distillation, fine-tuning between pruning rounds).
    """

    name: str
    summary: str
    needs_training: bool


METHODS: dict[str, Method] = {
    "distil": Method("distil", "train a smaller student on the teacher's actions, on its own states", True),
    "prune": Method("prune", "zero the smallest weights gradually (--structured: cut whole channels)", True),
    "quantize": Method("quantize", "static int8, calibrated on the agent's own frames", False),
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
