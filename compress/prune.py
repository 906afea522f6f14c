"""Magnitude pruning: global unstructured sparsity (gradual, Zhu & Gupta 2017) and channel pruning.

Unstructured pruning zeroes the smallest-magnitude weights over all Conv2d/Linear layers at once
(``torch.nn.utils.prune.global_unstructured``), so layers with many redundant weights lose more. The
weights keep their dense shapes: the file compresses well but dense kernels run no faster.
Structured channel pruning instead removes whole convolution channels from a NatureCNN and returns
a genuinely smaller network.

A pruning run alternates ``prune_global(model, schedule[i])`` with fine-tuning (``compress.pipeline``),
then folds the masks (``fold_masks``, or ``folded_state`` to save without touching the model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import prune

from nets.cnn import NatureCNN


class SparsityCount(NamedTuple):
    """Zero and total entries over the weights of every Conv2d/Linear (biases excluded)."""

    zeros: int
    total: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def prunable_weights(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(layer, "weight") for every Conv2d and Linear in ``module``, in ``named_modules`` order."""
    return [(m, "weight") for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def end_layers(module: nn.Module) -> list[nn.Module]:
    """The layers ``dense_ends`` keeps dense: the first Conv2d/Linear (it reads the raw input) and the
    output layers (every Conv2d/Linear under a submodule named ``head``, as in PPO's and DQN's
    networks, else the last one). Han et al. (2015) and Zhu & Gupta (2017) leave these unpruned or
    prune them less: they hold few of the weights and every output depends on them."""
    layers = [layer for layer, _ in prunable_weights(module)]
    if not layers:
        return []
    heads = [
        layer
        for name, sub in module.named_modules()
        if name.rsplit(".", 1)[-1] == "head"
        for layer in sub.modules()
        if isinstance(layer, nn.Conv2d | nn.Linear)
    ]
    return [layers[0], *[layer for layer in heads or layers[-1:] if layer is not layers[0]]]


def _check_sparsity(value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {value}")


def sparsity_count(module: nn.Module) -> SparsityCount:
    """Exact counts of zero weights; works on masked (``weight = weight_orig * weight_mask``) and folded models."""
    zeros = total = 0
    for layer, name in prunable_weights(module):
        weight = getattr(layer, name)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return SparsityCount(zeros, total)


def sparsity(module: nn.Module) -> float:
    """Fraction of zero entries over all Conv2d/Linear weights, in [0, 1]."""
    return sparsity_count(module).sparsity


def prune_global(module: nn.Module, target: float, keep_dense: Sequence[nn.Module] = ()) -> SparsityCount:
    """Masks the smallest-|w| weights of all Conv2d/Linear layers so that exactly ``round(target * total)`` are masked.

    Repeated calls with rising targets (``cubic_schedule``) extend the existing masks: masked weights stay
    masked, and torch's pruning container applies the new amount to the weights still unmasked.

    Args:
        module: The model, pruned in place (adds ``weight_orig`` parameters and ``weight_mask`` buffers).
        target: Overall sparsity in (0, 1), over the weights of all prunable layers together.
        keep_dense: Layers left unpruned (e.g. :func:`end_layers`); their weights still count in the
            total, so the other layers lose more to reach ``target``.

    Returns:
        The resulting zero count over the prunable weights: ``round(target * total)`` exactly (weights that
        are exactly zero already count towards it).

    Raises:
        ValueError: If ``target`` is outside (0, 1), below the sparsity the weights already have, or out
            of reach with the ``keep_dense`` layers left whole.
    """
    _check_sparsity(target)
    every = prunable_weights(module)
    dense_ids = {id(layer) for layer in keep_dense}
    dense = [(m, n) for m, n in every if id(m) in dense_ids]
    params = [(m, n) for m, n in every if id(m) not in dense_ids]
    if not params:
        raise ValueError("the module has no Conv2d or Linear layer to prune")
    total = sum(getattr(m, n).numel() for m, n in every)
    masked = sum(int((getattr(m, f"{n}_mask") == 0).sum()) for m, n in params if hasattr(m, f"{n}_mask"))
    dense_zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in dense)
    goal = round(target * total)
    current = sparsity_count(module)
    if goal < current.zeros:
        raise ValueError(f"target sparsity {target} is below the current sparsity {current.sparsity:.6f}")
    reachable = dense_zeros + sum(getattr(m, n).numel() for m, n in params)
    if goal > reachable:
        raise ValueError(
            f"target sparsity {target} needs {goal:,} zero weights; with the dense layers whole at most "
            f"{reachable:,} of {total:,} can be zero"
        )
    # An int amount counts entries among those still unmasked; L1 picks the unmasked zeros first (there
    # are at most goal - masked - dense_zeros of them), so exactly ``goal`` weights end up zero.
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=goal - masked - dense_zeros)
    return sparsity_count(module)


def cubic_schedule(final: float, rounds: int, initial: float = 0.0) -> list[float]:
    """Per-round sparsity targets of Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - t / n)^3, t = 1..n.

    Pruning is fast at first, while many weights are redundant, and slows down towards the target,
    leaving the fine-tuning between rounds more time to recover. The list is non-decreasing and its last
    entry equals ``final``.
    """
    _check_sparsity(final)
    if not 0.0 <= initial < final:
        raise ValueError(f"initial sparsity must be in [0, final={final}), got {initial}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [final + (initial - final) * (1.0 - t / rounds) ** 3 for t in range(1, rounds + 1)]


def fold_masks(module: nn.Module) -> nn.Module:
    """Makes pruning permanent: ``weight = weight_orig * weight_mask`` becomes a plain parameter.

    The state dict then has the keys of the unpruned model (no ``_orig`` / ``_mask``), with zeros in place.
    """
    for layer in module.modules():
        names = [key for key, _ in layer.named_parameters(recurse=False)]
        for name in names:
            if name.endswith("_orig"):
                prune.remove(layer, name.removesuffix("_orig"))
    return module


def folded_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict that ``fold_masks`` would give, computed without touching ``module``.

    ``weight_orig * weight_mask`` under the key ``weight``, masks dropped; other entries as they are.
    (A pruned module cannot be deep-copied after a forward pass with gradients: its ``weight`` is then
    a non-leaf tensor.)
    """
    state = module.state_dict()
    folded: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("_orig"):
            base = key.removesuffix("_orig")
            folded[base] = (value * state[f"{base}_mask"]).detach()
        elif not key.endswith("_mask"):
            folded[key] = value.detach()
    return folded


# ---------------------------------------------------------------------------------------------
# Structured: remove whole convolution channels from a NatureCNN
# ---------------------------------------------------------------------------------------------


class ChannelPruning(NamedTuple):
    """Result of ``prune_channels``.

    Attributes:
        module: The new, smaller NatureCNN (same in_shape and geometry).
        channels: Its three convolution widths.
        kept: Per convolution, the original indices of the surviving channels (ascending), (C_i',) int64.
        kept_units: The original indices of the surviving units of the Linear layer (ascending),
            (out_dim',) int64; the layers that read the features keep these input columns
            (``slice_inputs``).
    """

    module: NatureCNN
    channels: tuple[int, int, int]
    kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    kept_units: torch.Tensor


def _convs(net: NatureCNN) -> list[nn.Conv2d]:
    return [m for m in net.conv if isinstance(m, nn.Conv2d)]


def channel_l1(conv: nn.Conv2d) -> torch.Tensor:
    """L1 norm of each output channel's kernel (Li et al. 2017): (C_out, C_in, kh, kw) -> (C_out,)."""
    return conv.weight.detach().abs().sum(dim=(1, 2, 3))


def nature_widths(net: nn.Module) -> tuple[tuple[int, int, int], int]:
    """(the three convolution widths, the Linear layer's width) of a NatureCNN with ``out_dim`` set."""
    if not isinstance(net, NatureCNN):
        raise ValueError(f"channel pruning needs a nets.NatureCNN, got {type(net).__name__}")
    if isinstance(net.fc, nn.Identity):
        raise ValueError(
            "channel pruning needs a NatureCNN with out_dim set (its Linear layer takes the cut)"
        )
    channels = tuple(conv.out_channels for conv in _convs(net))
    return channels, net.fc[0].out_features  # type: ignore[return-value]


@torch.no_grad()
def prune_channels(
    net: NatureCNN,
    keep: float | tuple[float, float, float] | None = None,
    units: float | None = None,
    channels: tuple[int, int, int] | None = None,
    out_dim: int | None = None,
) -> ChannelPruning:
    """Keeps the largest-L1 output channels of each convolution (and units of the Linear layer) and
    builds a smaller NatureCNN from them.

    A removed channel still emitted relu(bias) where its kernel was near zero; that constant is lost,
    so fine-tune (or distil) afterwards. Channels whose kernel and bias are both zero are removed exactly.

    Args:
        net: A NatureCNN with a Linear layer (``out_dim`` not None), unchanged.
        keep: Fraction of channels to keep, in (0, 1], for all three convolutions or one per convolution;
            at least one channel survives, ``ceil(keep * C)`` in general.
        units: Fraction of the Linear layer's units to keep, in (0, 1]; None keeps them all. Units are
            ranked by the L1 norm of their incoming weights.
        channels: Exact widths to keep instead of ``keep`` (e.g. a registered student's).
        out_dim: Exact number of units to keep instead of ``units``.

    Returns:
        The new network, its channel counts and the kept indices.
    """
    old_channels, old_units = nature_widths(net)
    if (keep is None) == (channels is None):
        raise ValueError("prune_channels needs either keep (fractions) or channels (exact widths)")
    if channels is None:
        fractions = (keep,) * 3 if isinstance(keep, int | float) else tuple(keep)  # type: ignore[arg-type]
        if len(fractions) != 3 or not all(0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"keep must be in (0, 1], one value or three, got {keep}")
        channels = tuple(max(1, math.ceil(f * c)) for f, c in zip(fractions, old_channels, strict=True))
    if out_dim is None:
        if units is not None and not 0.0 < units <= 1.0:
            raise ValueError(f"units must be in (0, 1], got {units}")
        out_dim = old_units if units is None else max(1, math.ceil(units * old_units))
    if len(channels) != 3 or not all(1 <= c <= o for c, o in zip(channels, old_channels, strict=True)):
        raise ValueError(f"channels must be three widths in [1, {old_channels}], got {channels}")
    if not 1 <= out_dim <= old_units:
        raise ValueError(f"out_dim must be in [1, {old_units}], got {out_dim}")
    convs = _convs(net)
    kept = tuple(
        channel_l1(conv).topk(count).indices.sort().values
        for conv, count in zip(convs, channels, strict=True)
    )
    fc = net.fc[0]
    kept_units = fc.weight.detach().abs().sum(dim=1).topk(out_dim).indices.sort().values
    small = NatureCNN(
        net.in_shape,
        out_dim,
        channels=tuple(channels),
        geometry=net.geometry,
        channels_last=net.channels_last,
    )
    previous = torch.arange(net.in_shape[0])
    for old, new, idx in zip(convs, _convs(small), kept, strict=True):
        new.weight.copy_(old.weight[idx][:, previous])
        new.bias.copy_(old.bias[idx])
        previous = idx
    # Flatten orders features as (C, H, W): pick the surviving channels' blocks of H*W inputs.
    weight = fc.weight.reshape(old_units, old_channels[-1], -1)[kept_units][:, kept[-1]]  # (out', C', H*W)
    small.fc[0].weight.copy_(weight.reshape(out_dim, -1))
    small.fc[0].bias.copy_(fc.bias[kept_units])
    small.train(net.training)
    return ChannelPruning(small, tuple(channels), kept, kept_units)  # type: ignore[arg-type]


@torch.no_grad()
def slice_inputs(linear: nn.Linear, kept: torch.Tensor) -> nn.Linear:
    """A copy of ``linear`` that reads only the input features ``kept`` (indices, ascending)."""
    new = nn.Linear(len(kept), linear.out_features, bias=linear.bias is not None)
    new.weight.copy_(linear.weight[:, kept])
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    return new.to(linear.weight.device)
