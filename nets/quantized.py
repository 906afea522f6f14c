"""Int8 versions of Conv2d and Linear, and ``int8_skeleton`` to load a quantised model's saved state.

The scheme, per layer (``compress.quantize`` computes it; this module only runs it):

- weights: symmetric int8 per output channel, ``w ~= q_w * s_w[o]`` with ``s_w[o] = max|w[o]| / 127``;
- input activations: symmetric int8 per tensor, ``x ~= q_x * s_x``, with ``s_x`` calibrated on frames
  from the agent's own environment;
- output: ``(q_x @ q_w) * s_x * s_w + bias`` in fp32, with the bias kept in fp32.

Every layer holds plain tensors (``weight`` int8, ``weight_scale``, ``input_scale``, ``bias`` fp32),
so its state dict is ordinary tensors that safetensors writes and ``load_state_dict`` reads. A model
saved quantised loads in two steps, as ``agents.ppo.load_policy`` does: build the fp32 architecture,
``int8_skeleton`` swaps its layers for int8 ones with empty tensors, ``load_state_dict`` fills them.

Which library computes what:

- ``Int8Linear`` runs on torchao (imported on first use, so that ``import nets`` stays light): a
  ``torchao.quantization.Int8Tensor`` with a static per-tensor activation scale, the tensor that
  ``quantize_(model, Int8StaticActivationInt8WeightConfig(...))`` would put in place of the weight.
  Its ``F.linear`` quantises the input with the calibrated scale and multiplies int8 by int8 with
  int32 accumulation (``torch._int_mm`` on the CPU).
- ``Int8Conv2d`` computes in plain torch: torchao's int8 tensors implement linear, embedding and
  slicing only, and ``torch.ao.quantization`` (the fbgemm/qnnpack convolutions) is deprecated. The
  convolution multiplies integer-valued fp32 activations by integer-valued fp32 weights, which is the
  int8 arithmetic exactly while every partial sum stays below 2**24: ``fan_in * 128 * 127 < 2**24``,
  i.e. fan_in <= 1032 (Mario's largest is 64 * 3 * 3 = 576). Beyond that fp32 rounds the sums to 24
  significant bits, far below the int8 rounding error.

Neither path is faster than fp32 in eager mode on a CPU: the gain is a quarter of the bytes on disk
and in memory.

Gradients: when the input requires them (``lab explain``'s attribution methods), both layers compute
the same numbers with the rounding as a straight-through estimator (Bengio et al. 2013): the
forward pass rounds, the backward pass treats the rounding as the identity, so saliency maps of an
int8 agent show what its int8 arithmetic looks at instead of the zeros of ``round``'s derivative.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

QMIN, QMAX = -128, 127


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (O, *) fp32 -> (q (O, *) int8, scale (O,) fp32).

    ``q * scale`` reconstructs the weight to within ``scale / 2`` per entry; all-zero channels get a
    tiny scale (not 0) so that dequantisation never divides by zero.
    """
    flat = weight.detach().float().reshape(len(weight), -1)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.round(flat * (1.0 / scale[:, None])).clamp(QMIN, QMAX).to(torch.int8)
    return q.reshape(weight.shape), scale


def _quantize_input(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded and clamped to [-128, 127], as integer-valued fp32; straight-through gradients."""
    scaled = (x.float() * (1.0 / scale)).clamp(QMIN, QMAX)
    rounded = torch.round(scaled)
    return scaled + (rounded - scaled).detach() if scaled.requires_grad else rounded


def _int8_tensors(
    module: nn.Module, weight_shape: tuple[int, ...], bias: bool, device: torch.device | None
) -> None:
    """Registers empty ``weight`` (int8) and ``bias`` (fp32) as frozen parameters, ``weight_scale`` and
    ``input_scale`` as buffers: the state dict holds all four, and code that walks a model's parameters
    (counting them, randomising layers to test explanations) finds the int8 layers too."""
    module.weight = nn.Parameter(
        torch.zeros(weight_shape, dtype=torch.int8, device=device), requires_grad=False
    )
    module.register_buffer("weight_scale", torch.ones(weight_shape[0], device=device))
    module.register_buffer("input_scale", torch.ones((), device=device))
    if bias:
        module.bias = nn.Parameter(torch.zeros(weight_shape[0], device=device), requires_grad=False)
    else:
        module.register_parameter("bias", None)


def _fill(module: nn.Module, layer: nn.Conv2d | nn.Linear, input_scale: torch.Tensor) -> None:
    q, scale = quantize_weight(layer.weight)
    with torch.no_grad():
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        module.input_scale.copy_(input_scale.detach().float().reshape(()))
        if layer.bias is not None:
            module.bias.copy_(layer.bias.detach().float())


@torch.no_grad()
def _reset(module: nn.Module) -> None:
    """Random weights as torch initialises the float layer (Kaiming-uniform weights, uniform bias in
    +-1/sqrt(fan_in)), then quantised; the input scale stays."""
    weight = torch.empty(module.weight.shape, device=module.weight.device)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    q, scale = quantize_weight(weight)
    module.weight.copy_(q)
    module.weight_scale.copy_(scale)
    if module.bias is not None:
        bound = 1.0 / math.sqrt(weight[0].numel())
        module.bias.uniform_(-bound, bound)


class Int8Conv2d(nn.Module):
    """A Conv2d with int8 weights and a static int8 input: (N, C_in, H, W) -> (N, C_out, H', W') fp32.

    State (what the state dict and the safetensors file hold): ``weight`` (C_out, C_in/groups, kh, kw)
    int8 and ``bias`` (C_out,) fp32 if any, frozen parameters; ``weight_scale`` (C_out,) and
    ``input_scale`` () fp32 buffers. The constructor makes empty ones of the right shapes;
    ``from_float`` quantises a Conv2d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        _int8_tensors(self, (out_channels, in_channels // groups, *kernel_size), bias, device)

    @classmethod
    def like(cls, conv: nn.Conv2d) -> Int8Conv2d:
        """An empty Int8Conv2d of ``conv``'s shapes, on its device."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"Int8Conv2d supports numeric padding with padding_mode 'zeros' only, got "
                f"padding={conv.padding!r}, padding_mode='{conv.padding_mode}'"
            )
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
        )

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_scale: torch.Tensor) -> Int8Conv2d:
        """Quantises ``conv`` (left unchanged) with the given calibrated input scale () fp32."""
        layer = cls.like(conv)
        _fill(layer, conv, input_scale)
        return layer

    def reset_parameters(self) -> None:
        """Random int8 weights (a layer randomisation test re-initialises layers with this)."""
        _reset(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = _quantize_input(x, self.input_scale)  # integer-valued fp32
        # Integer-valued fp32 operands: exact int8 x int8 -> int32 arithmetic while fan_in <= 1032.
        acc = F.conv2d(x_q, self.weight.float(), None, self.stride, self.padding, self.dilation, self.groups)
        y = acc * (self.input_scale * self.weight_scale)[:, None, None]
        return y if self.bias is None else y + self.bias[:, None, None]

    def extra_repr(self) -> str:
        out_c, in_c, kh, kw = self.weight.shape
        return f"{in_c * self.groups}, {out_c}, kernel_size=({kh}, {kw}), stride={self.stride}, int8"


class Int8Linear(nn.Module):
    """A Linear with int8 weights and a static int8 input, computed by torchao: (*, in) -> (*, out) fp32.

    State: ``weight`` (out, in) int8 and ``bias`` (out,) fp32 if any, frozen parameters;
    ``weight_scale`` (out,) and ``input_scale`` () fp32 buffers. The torchao ``Int8Tensor`` that
    wraps them is rebuilt in every ``forward`` (a cheap wrapper, no copy) so that ``.to()``,
    ``load_state_dict`` and ``deepcopy`` only ever see plain tensors.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device: torch.device | None = None
    ) -> None:
        super().__init__()
        _int8_tensors(self, (out_features, in_features), bias, device)

    @classmethod
    def like(cls, linear: nn.Linear) -> Int8Linear:
        """An empty Int8Linear of ``linear``'s shapes, on its device."""
        return cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device
        )

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: torch.Tensor) -> Int8Linear:
        """Quantises ``linear`` (left unchanged) with the given calibrated input scale () fp32."""
        layer = cls.like(linear)
        _fill(layer, linear, input_scale)
        return layer

    def reset_parameters(self) -> None:
        """Random int8 weights (a layer randomisation test re-initialises layers with this)."""
        _reset(self)

    def _torchao_weight(self) -> torch.Tensor:
        Int8Tensor, MappingType, PerTensor, QuantizeTensorToInt8Kwargs = _torchao()  # noqa: N806
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
        flat = x.float().reshape(-1, x.shape[-1])  # (N, in)
        if flat.requires_grad:  # the same arithmetic in fp32, differentiable (see the module docstring)
            acc = F.linear(_quantize_input(flat, self.input_scale), self.weight.float())
            y = acc * (self.input_scale * self.weight_scale)
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(flat, self._torchao_weight(), self.bias)  # (N, out)
        return y.reshape(*lead, out_features)

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"in_features={in_f}, out_features={out_f}, int8 (torchao)"


@functools.cache
def _torchao() -> tuple[type, Any, type, type]:
    """torchao's int8 tensor classes, imported on first use.

    torchao registers an enum with torch's pytree on import, which torch logs as a deprecation warning
    on every load of an int8 agent; the warning concerns torchao's code, so it is silenced here.
    """
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8Tensor, MappingType, PerTensor
        from torchao.quantization.quantize_.workflows import QuantizeTensorToInt8Kwargs
    finally:
        logger.setLevel(level)
    return Int8Tensor, MappingType, PerTensor, QuantizeTensorToInt8Kwargs


def int8_counterpart(layer: nn.Conv2d | nn.Linear) -> Int8Conv2d | Int8Linear:
    """An empty int8 layer of ``layer``'s shapes (Conv2d -> Int8Conv2d, Linear -> Int8Linear)."""
    return Int8Conv2d.like(layer) if isinstance(layer, nn.Conv2d) else Int8Linear.like(layer)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replaces the submodule called ``name`` (dotted, not empty) of ``root`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def int8_skeleton(module: nn.Module) -> nn.Module:
    """Swaps every Conv2d and Linear of ``module`` for its int8 counterpart with empty tensors.

    ``load_state_dict`` of a state saved by ``compress.quantize`` (every layer quantised) then fills
    them. The module is changed in place and returned (a bare Conv2d or Linear is returned swapped).
    """
    if isinstance(module, nn.Conv2d | nn.Linear):
        return int8_counterpart(module)
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for name, layer in layers:
        set_submodule(module, name, int8_counterpart(layer))
    return module
