"""Static int8 post-training quantisation of Conv2d and Linear layers, saved as plain safetensors.

The int8 layers themselves (``Int8Conv2d``, ``Int8Linear``) and the scheme they compute live in
``nets.quantized``, because loading a quantised agent (``agents.ppo.load_policy``) needs them; this
module makes them: ``calibrate`` records each layer's input range on the agent's own frames,
``quantize_int8`` swaps the layers of a copy of a model, ``quantized_state`` / ``save_quantized``
write int8 weights with fp32 scales and biases to safetensors (no pickle), and ``load_quantized``
rebuilds the model from an fp32 skeleton of the same architecture and such a state dict.

Linear layers run on torchao (``torchao.quantization.Int8Tensor`` with a static activation scale);
convolutions on plain torch (torchao's int8 tensors have no convolution, and ``torch.ao.quantization``
is deprecated). The comparison table (``compress.compare``) shows what that costs in latency.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Collection
from typing import NamedTuple

import safetensors.torch
import torch
from torch import nn

from core.files import atomic_write_bytes
from nets.quantized import (
    Int8Conv2d,
    Int8Linear,
    int8_counterpart,
    quantize_weight,
    set_submodule,
)

FORMAT = "agent-lab-int8-static-v1"  # safetensors metadata "format" of files written by save_quantized

__all__ = [
    "FORMAT",
    "Calibration",
    "Int8Conv2d",
    "Int8Linear",
    "calibrate",
    "load_quantized",
    "quantize_int8",
    "quantize_weight",
    "quantized_state",
    "save_quantized",
]


class Calibration(NamedTuple):
    """Largest |input| each Conv2d/Linear saw over the calibration frames.

    Attributes:
        input_amax: Qualified module name -> max |x| over every element of the layer's input.
        frames: Number of calibration observations.
    """

    input_amax: dict[str, float]
    frames: int


def _layers(module: nn.Module) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@torch.inference_mode()
def calibrate(module: nn.Module, frames: torch.Tensor, batch_size: int = 256) -> Calibration:
    """Runs the fp32 model on observations and records the input range of every Conv2d/Linear.

    Args:
        module: Any model whose ``forward`` takes a batch of observations (B, *obs_shape).
        frames: (N, *obs_shape) observations, uint8 frames for image agents (collect them with the
            agent's own policy: the ranges of random noise are not those of the game).
        batch_size: Observations per forward pass.

    Returns:
        The max |input| per layer; layers that never ran are missing and stay fp32 in ``quantize_int8``.
    """
    if len(frames) == 0:
        raise ValueError("calibrate needs at least one frame")
    amax: dict[str, float] = {}

    def record(name: str):
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            value = inputs[0].detach().abs().max().item()
            amax[name] = max(amax.get(name, 0.0), value)

        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in _layers(module)]
    was_training = module.training
    module.eval()
    try:
        for start in range(0, len(frames), batch_size):
            module(frames[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    return Calibration(amax, len(frames))


def _input_scale(amax: float) -> torch.Tensor:
    return torch.tensor(max(amax, 1e-8) / 127.0, dtype=torch.float32)


def quantize_int8(module: nn.Module, calibration: Calibration, skip: Collection[str] = ()) -> nn.Module:
    """A copy of ``module`` with every calibrated Conv2d/Linear replaced by its int8 version.

    Args:
        module: The fp32 model (left unchanged).
        calibration: From ``calibrate`` on the same model.
        skip: Qualified names of layers to keep in fp32 (e.g. a sensitive output layer).

    Returns:
        The quantised copy in eval mode; layers without a calibration entry stay fp32.
    """
    if isinstance(module, Int8Conv2d | Int8Linear):
        raise ValueError("the module is already quantised")
    quantized = copy.deepcopy(module).eval()
    for name, layer in _layers(quantized):
        if name in skip or name not in calibration.input_amax:
            continue
        scale = _input_scale(calibration.input_amax[name])
        kind = Int8Conv2d if isinstance(layer, nn.Conv2d) else Int8Linear
        new = kind.from_float(layer, scale)
        if name == "":
            return new
        set_submodule(quantized, name, new)
    return quantized


def quantized_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a quantised model as contiguous CPU tensors, ready for safetensors.

    Int8 layers contribute ``<name>.weight`` (int8), ``<name>.weight_scale``, ``<name>.input_scale``
    and ``<name>.bias`` (fp32); fp32 layers their usual entries. Tensors that share memory (safetensors
    refuses those) are cloned.
    """
    return {key: value.detach().cpu().contiguous().clone() for key, value in module.state_dict().items()}


def save_quantized(module: nn.Module, path: str | os.PathLike) -> None:
    """Writes ``quantized_state(module)`` to a safetensors file, atomically (no pickle)."""
    data = safetensors.torch.save(quantized_state(module), metadata={"format": FORMAT})
    atomic_write_bytes(path, data)


def load_quantized(skeleton: nn.Module, state: dict[str, torch.Tensor] | str | os.PathLike) -> nn.Module:
    """Rebuilds a quantised model from an fp32 skeleton of the same architecture and its saved state.

    Args:
        skeleton: A freshly built fp32 model (its weights are overwritten; the module is changed in place).
        state: A dict from ``quantized_state`` or the path of a file from ``save_quantized``.

    Returns:
        The skeleton with int8 layers wherever the state holds an int8 ``weight``, in eval mode.

    Raises:
        ValueError: If the state does not fit the skeleton (missing or unexpected keys, other shapes).
    """
    if not isinstance(state, dict):
        state = safetensors.torch.load_file(os.fspath(state))
    root = skeleton
    for name, layer in _layers(skeleton):
        prefix = f"{name}." if name else ""
        weight = state.get(f"{prefix}weight")
        if weight is None or weight.dtype != torch.int8:
            continue
        new = int8_counterpart(layer)  # empty buffers, filled by load_state_dict below
        if name:
            set_submodule(skeleton, name, new)
        else:
            root = new
    try:
        root.load_state_dict(state, strict=True)
    except RuntimeError as error:
        reason = " ".join(line.strip() for line in str(error).strip().splitlines())
        raise ValueError(f"quantised state does not fit the model: {reason}") from None
    return root.eval()
