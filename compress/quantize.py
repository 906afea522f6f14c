"""Static int8 post-training quantisation of Conv2d and Linear layers, saved as plain safetensors.

The scheme, per layer:

- weights: symmetric int8 per output channel, ``w ~= q_w * s_w[o]`` with ``s_w[o] = max|w[o]| / 127``;
- input activations: symmetric int8 per tensor, ``x ~= q_x * s_x`` with ``s_x = max|x| / 127``
  taken over calibration frames from the agent's own environment (``calibrate``);
- output: ``(q_x @ q_w) * s_x * s_w + bias`` in fp32, with the bias kept in fp32.

Which library runs what, and why:

- Linear layers run on torchao: ``torchao.quantization.Int8Tensor`` with a static per-tensor activation
  scale, the tensor that ``quantize_(model, Int8StaticActivationInt8WeightConfig(...))`` would put in
  place of the weight. Its ``F.linear`` quantises the activation with our calibrated scale and
  multiplies int8 by int8 with int32 accumulation (``torch._int_mm`` on this CPU build). ``Int8Linear``
  builds that tensor itself from plain int8 and fp32 buffers instead of calling ``quantize_``: the
  state dict then holds ordinary tensors that safetensors can write, and ``load_quantized`` rebuilds
  the layer from the file without the fp32 weights.
- Conv2d layers run in ``Int8Conv2d`` below: torchao's int8 tensors implement linear, embedding and
  slicing only, and ``torch.ao.quantization`` (the fbgemm/qnnpack convolutions) is deprecated. The
  convolution multiplies the integer-valued activations by the integer-valued weights with fp32
  kernels. That is the int8 arithmetic exactly as long as every partial sum stays below 2**24:
  ``fan_in * 128 * 127 < 2**24``, i.e. fan_in <= 1032 (Mario's largest is 64 * 3 * 3 = 576); beyond
  that fp32 rounds the sums to 24 significant bits, far below the int8 rounding error.

Neither path is faster than fp32 in eager mode on a CPU: the gain is a quarter of the bytes on disk and
in memory. ``compress.measure.latency_ms`` says what it costs.

``quantize_int8`` swaps the layers of a copy of a model; ``quantized_state`` / ``save_quantized`` write
int8 weights and fp32 scales and biases to safetensors (no pickle), and ``load_quantized`` rebuilds the
model from an fp32 skeleton of the same architecture and such a state dict.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Collection
from typing import NamedTuple

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from core.files import atomic_write_bytes

QMIN, QMAX = -128, 127
FORMAT = "agent-lab-int8-static-v1"  # safetensors metadata "format" of files written by save_quantized


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


def _forward(module: nn.Module, obs: torch.Tensor) -> torch.Tensor:
    """The first output of ``module(obs)``: logits of an actor-critic's (logits, value), Q-values, ..."""
    out = module(obs)
    return out[0] if isinstance(out, tuple | list) else out


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


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (O, *) fp32 -> (q (O, *) int8, scale (O,) fp32).

    ``q * scale`` reconstructs the weight to within ``scale / 2`` per entry; all-zero channels get a
    tiny scale (not 0) so that dequantisation never divides by zero.
    """
    flat = weight.detach().float().reshape(len(weight), -1)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.round(flat * (1.0 / scale[:, None])).clamp(QMIN, QMAX).to(torch.int8)
    return q.reshape(weight.shape), scale


def _input_scale(amax: float) -> torch.Tensor:
    return torch.tensor(max(amax, 1e-8) / 127.0, dtype=torch.float32)


class Int8Conv2d(nn.Module):
    """A Conv2d with int8 weights and a static int8 input: (N, C_in, H, W) -> (N, C_out, H', W') fp32.

    Buffers (what the state dict and the safetensors file hold): ``weight`` (C_out, C_in/groups, kh, kw)
    int8, ``weight_scale`` (C_out,) fp32, ``input_scale`` () fp32, ``bias`` (C_out,) fp32 if any.
    """

    def __init__(self, conv: nn.Conv2d, input_scale: torch.Tensor) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"Int8Conv2d supports padding_mode 'zeros' only, got '{conv.padding_mode}'")
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        q, scale = quantize_weight(conv.weight)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("input_scale", input_scale.detach().float().reshape(()).clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = torch.round(x.float() * (1.0 / self.input_scale)).clamp(QMIN, QMAX)  # integer-valued fp32
        # Integer-valued fp32 operands: exact int8 x int8 -> int32 arithmetic while fan_in <= 1032.
        acc = F.conv2d(x_q, self.weight.float(), None, self.stride, self.padding, self.dilation, self.groups)
        y = acc * (self.input_scale * self.weight_scale)[:, None, None]
        return y if self.bias is None else y + self.bias[:, None, None]

    def extra_repr(self) -> str:
        out_c, in_c, kh, kw = self.weight.shape
        return f"{in_c * self.groups}, {out_c}, kernel_size=({kh}, {kw}), stride={self.stride}, int8"


class Int8Linear(nn.Module):
    """A Linear with int8 weights and a static int8 input, computed by torchao: (*, in) -> (*, out) fp32.

    Buffers: ``weight`` (out, in) int8, ``weight_scale`` (out,) fp32, ``input_scale`` () fp32,
    ``bias`` (out,) fp32 if any. The torchao ``Int8Tensor`` that wraps them is rebuilt in every
    ``forward`` (a cheap wrapper, no copy) so that ``.to()``, ``load_state_dict`` and ``deepcopy``
    only ever see plain tensors.
    """

    def __init__(self, linear: nn.Linear, input_scale: torch.Tensor) -> None:
        super().__init__()
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("input_scale", input_scale.detach().float().reshape(()).clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def _torchao_weight(self) -> torch.Tensor:
        from torchao.quantization import Int8Tensor, MappingType, PerTensor
        from torchao.quantization.quantize_.workflows import QuantizeTensorToInt8Kwargs

        return Int8Tensor(
            self.weight,
            self.weight_scale[:, None],  # (out, 1): one scale per row
            block_size=[1, self.weight.shape[1]],
            dtype=torch.float32,
            act_quant_scale=self.input_scale.reshape(1, 1),  # static per-tensor activation scale
            act_quant_kwargs=QuantizeTensorToInt8Kwargs(
                granularity=PerTensor(), mapping_type=MappingType.SYMMETRIC
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, out_features = x.shape[:-1], self.weight.shape[0]
        if x.numel() == 0:  # torchao's per-tensor scale needs at least one row
            return x.new_zeros(*lead, out_features, dtype=torch.float32)
        y = F.linear(x.float().reshape(-1, x.shape[-1]), self._torchao_weight(), self.bias)  # (N, out)
        return y.reshape(*lead, out_features)

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"in_features={in_f}, out_features={out_f}, int8 (torchao)"


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


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
        new = Int8Conv2d(layer, scale) if isinstance(layer, nn.Conv2d) else Int8Linear(layer, scale)
        if name == "":
            return new
        _set_submodule(quantized, name, new)
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
        scale = torch.ones(())  # overwritten by the state
        new = Int8Conv2d(layer, scale) if isinstance(layer, nn.Conv2d) else Int8Linear(layer, scale)
        if name:
            _set_submodule(skeleton, name, new)
        else:
            root = new
    try:
        root.load_state_dict(state, strict=True)
    except RuntimeError as error:
        reason = " ".join(line.strip() for line in str(error).strip().splitlines())
        raise ValueError(f"quantised state does not fit the model: {reason}") from None
    return root.eval()
