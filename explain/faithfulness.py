"""Checks that an attribution map says something about the model: deletion curves and model randomisation.

- ``deletion_curve`` / ``deletion_ratio`` (Petsiuk et al. 2018): remove the most salient pixels first and
  watch the score fall; a faithful map makes it fall faster than removing pixels in random order
  (ratio of areas under the curves below 1).
- ``cascading_randomization`` (Adebayo et al. 2018): re-initialise the layers from the output down; a map
  that stays the same while the weights become random explains the input, not the model.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from scipy import stats
from torch import nn

from explain.methods import DEFAULT_BATCH_ROWS, ScoreFn, gaussian_blur, to_float_obs

MethodFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""(module, obs (B, *obs_shape)) -> attribution maps (B, *obs_shape), e.g. ``methods.module_method``."""

DELETION_MODES = ("blur", "zero")


# ---------------------------------------------------------------------------------------------
# Deletion curves
# ---------------------------------------------------------------------------------------------


class DeletionCurve(NamedTuple):
    """Score of each frame as more and more of its pixels are removed.

    Attributes:
        fractions: (K,) removed fraction of the pixels, 0 to 1.
        scores: (B, K) score of each frame after removing that fraction.
        auc: (B,) area under the curve (trapezoid over the fraction in [0, 1]), in score units.
        normalized_auc: (B,) ``auc`` divided by the frame's initial score ``scores[:, 0]``: 1 is a
            score that never falls; NaN where the initial score is not positive.
    """

    fractions: np.ndarray
    scores: np.ndarray
    auc: np.ndarray
    normalized_auc: np.ndarray


class DeletionRatio(NamedTuple):
    """Salient-order against random-order deletion.

    Attributes:
        ratio: Mean over frames of AUC(salient order) / AUC(random order); below 1 is faithful.
        per_frame: (B,) the ratio of each frame (NaN where the random AUC is not positive).
        salient: The curves in salient order.
        random: The curves in random order (scores averaged over the random orders).
    """

    ratio: float
    per_frame: np.ndarray
    salient: DeletionCurve
    random: DeletionCurve


def pixel_heat(attribution: torch.Tensor | np.ndarray) -> np.ndarray:
    """Importance of each removable unit: |map| summed over channels for (B, C, H, W), |map| otherwise.

    Returns:
        (B, n) with n = H * W for (B, C, H, W) maps, the number of entries per frame otherwise.
    """
    heat = np.abs(np.asarray(torch.as_tensor(attribution).detach().float().cpu()))
    if heat.ndim == 4:
        heat = heat.sum(axis=1)
    return heat.reshape(heat.shape[0], -1)


def deletion_ranks(heat: np.ndarray, random_order: bool, rng: np.random.Generator) -> np.ndarray:
    """Removal order of each unit: rank 0 goes first.

    Args:
        heat: (B, n) importance.
        random_order: Ignore ``heat`` and use a random order per frame.
        rng: Draws the random order, and breaks ties between equal heat (so that the flat parts of a
            map are not removed in raster order).

    Returns:
        (B, n) int64 ranks.
    """
    frames, units = heat.shape
    order = rng.permuted(np.tile(np.arange(units), (frames, 1)), axis=1)  # random order per frame
    if not random_order:
        by_heat = np.argsort(-np.take_along_axis(heat, order, axis=1), axis=1, kind="stable")
        order = np.take_along_axis(order, by_heat, axis=1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(units), order.shape), axis=1)
    return ranks


def deletion_fractions(fraction_step: float) -> np.ndarray:
    """0, step, 2 step, ..., 1: (K,) with the last point exactly 1."""
    if not 0 < fraction_step <= 1:
        raise ValueError(f"fraction_step must be in (0, 1], got {fraction_step}")
    steps = math.ceil(1 / fraction_step - 1e-9)
    return np.minimum(np.arange(steps + 1) * fraction_step, 1.0)


def deletion_curve(
    score_fn: ScoreFn,
    obs: torch.Tensor | np.ndarray,
    attribution: torch.Tensor | np.ndarray,
    fraction_step: float = 0.05,
    mode: str = "blur",
    random_order: bool = False,
    rng: np.random.Generator | None = None,
    blur_sigma: float = 5.0,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> DeletionCurve:
    """Removes the top-k% most salient pixels, k = 0, 5, ..., 100, and records the score after each step.

    A pixel is a position (h, w) ranked by the channel-summed |map| and removed on all channels of the
    frame stack; for vector observations each entry is one unit. The score should be positive and
    fall as evidence is removed: pass the chosen action's probability (``kind="prob"``) for a policy,
    the class probability for a classifier.

    Args:
        score_fn: (N, *obs_shape) -> (N,), called with k * B rows (copy-major).
        obs: (B, *obs_shape) observations (uint8 or float).
        attribution: (B, *obs_shape) maps (or (B, H, W) heat maps for (B, C, H, W) observations).
        fraction_step: Fraction of the pixels removed per step.
        mode: "blur" replaces removed pixels by the frame blurred by ``blur_sigma`` (images only),
            "zero" by zeros.
        random_order: Remove in random order instead (the reference curve).
        rng: Random order and tie breaking; default ``np.random.default_rng(0)``.
        blur_sigma: Blur of the "blur" fill, in pixels.
        batch_rows: Rows per forward pass.

    Returns:
        ``DeletionCurve`` with fractions (K,), scores (B, K), auc (B,), normalized_auc (B,).
    """
    if mode not in DELETION_MODES:
        raise ValueError(f"unknown deletion mode '{mode}'; valid: {', '.join(DELETION_MODES)}")
    inputs = to_float_obs(obs)
    frames, sample_shape = inputs.shape[0], inputs.shape[1:]
    if mode == "blur" and len(sample_shape) < 2:
        raise ValueError("blur deletion needs image observations; use mode='zero' for vectors")
    heat = pixel_heat(attribution)
    # One mask entry per unit; a (C, H, W) frame stack shares it over channels.
    mask_shape = (1, *sample_shape[-2:]) if len(sample_shape) == 3 else tuple(sample_shape)
    if heat.shape != (frames, math.prod(mask_shape)):
        raise ValueError(
            f"attribution of shape {tuple(np.shape(attribution))} does not fit obs {tuple(inputs.shape)}"
        )
    ranks = torch.from_numpy(deletion_ranks(heat, random_order, rng or np.random.default_rng(0)))
    ranks = ranks.to(inputs.device)
    fractions = deletion_fractions(fraction_step)
    counts = torch.from_numpy(np.rint(fractions * heat.shape[1]).astype(np.int64)).to(inputs.device)
    fill = gaussian_blur(inputs, blur_sigma) if mode == "blur" else torch.zeros_like(inputs)
    per_pass = max(1, batch_rows // frames)
    scores = []
    with torch.no_grad():
        for start in range(0, len(fractions), per_pass):
            removed = ranks[None] < counts[start : start + per_pass, None, None]  # (k, B, n)
            removed = removed.reshape(-1, frames, *mask_shape)
            deleted = torch.where(removed, fill, inputs)  # (k, B, *obs_shape)
            rows = score_fn(deleted.reshape(-1, *sample_shape)).reshape(-1, frames)
            scores.append(rows.float().cpu())
    return _curve(fractions, torch.cat(scores).T.numpy().astype(np.float64))


def _curve(fractions: np.ndarray, scores: np.ndarray) -> DeletionCurve:
    auc = np.trapezoid(scores, fractions, axis=1)
    initial = scores[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = np.where(initial > 0, auc / initial, np.nan)
    return DeletionCurve(fractions, scores, auc, normalized)


def deletion_ratio(
    score_fn: ScoreFn,
    obs: torch.Tensor | np.ndarray,
    attribution: torch.Tensor | np.ndarray,
    fraction_step: float = 0.05,
    mode: str = "blur",
    rng: np.random.Generator | None = None,
    random_repeats: int = 1,
    blur_sigma: float = 5.0,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> DeletionRatio:
    """AUC(salient order) / AUC(random order) per frame, and its mean over the batch of frames.

    Args:
        random_repeats: Random orders averaged into the reference curve (less noise, more passes).
        The others: as in ``deletion_curve``.

    Returns:
        ``DeletionRatio``; ``ratio`` ignores frames whose random AUC is not positive (NaN if all are).
    """
    rng = rng or np.random.default_rng(0)
    options = {
        "fraction_step": fraction_step,
        "mode": mode,
        "blur_sigma": blur_sigma,
        "batch_rows": batch_rows,
    }
    salient = deletion_curve(score_fn, obs, attribution, rng=rng, **options)
    randoms = [
        deletion_curve(score_fn, obs, attribution, random_order=True, rng=rng, **options)
        for _ in range(random_repeats)
    ]
    random = _curve(salient.fractions, np.mean([curve.scores for curve in randoms], axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        per_frame = np.where(random.auc > 0, salient.auc / random.auc, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN mean: NaN is the answer
        ratio = float(np.nanmean(per_frame))
    return DeletionRatio(ratio, per_frame, salient, random)


# ---------------------------------------------------------------------------------------------
# Cascading model randomisation
# ---------------------------------------------------------------------------------------------


class LayerRandomization(NamedTuple):
    """The map after randomising one more layer (this one and every layer above it).

    Attributes:
        layer: Dotted name of the layer in the module, e.g. "encoder.conv.4".
        kind: Its class name, e.g. "Conv2d".
        correlation: Mean over frames of Spearman's rank correlation between |trained map| and
            |map now|, flattened per frame; a constant map counts as 0 (it ranks nothing).
        per_frame: (B,) the correlation of each frame.
    """

    layer: str
    kind: str
    correlation: float
    per_frame: np.ndarray


class RandomizationReport(NamedTuple):
    """Outcome of ``cascading_randomization``.

    Attributes:
        layers: One record per randomised layer, from the output down (cumulative).
        passed: True when the correlation is below ``threshold`` once every convolution is random
            (for a module without convolutions: once every layer is).
        threshold: The correlation the verdict compares with.
        decisive_layer: The layer whose record decides the verdict.
    """

    layers: tuple[LayerRandomization, ...]
    passed: bool
    threshold: float
    decisive_layer: str


def parameter_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules holding parameters of their own, in registration order (input to output, usually)."""
    return [
        (name, layer)
        for name, layer in module.named_modules()
        if any(True for _ in layer.parameters(recurse=False))
    ]


def reinitialize(layer: nn.Module, seed: int) -> None:
    """Fresh random parameters for ``layer``: its ``reset_parameters`` (PyTorch's default init) when it
    has one, else Gaussian noise of each parameter's trained standard deviation. The global RNG is
    left as it was."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
            return
        for param in layer.parameters(recurse=False):
            std = float(param.std()) if param.numel() > 1 else 0.0
            param.normal_(0.0, std if std > 0 else 1.0)


def rank_correlations(reference: torch.Tensor | np.ndarray, maps: torch.Tensor | np.ndarray) -> np.ndarray:
    """Spearman's rho between |reference| and |maps| per frame, flattened; NaN (constant map) -> 0.

    Args:
        reference, maps: (B, ...) attribution maps.

    Returns:
        (B,) correlations.
    """
    first = np.abs(np.asarray(torch.as_tensor(reference).detach().float().cpu()))
    second = np.abs(np.asarray(torch.as_tensor(maps).detach().float().cpu()))
    first, second = first.reshape(first.shape[0], -1), second.reshape(second.shape[0], -1)
    rhos = np.zeros(first.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        for frame in range(first.shape[0]):
            rho = stats.spearmanr(first[frame], second[frame]).statistic
            rhos[frame] = 0.0 if np.isnan(rho) else rho
    return rhos


def cascading_randomization(
    module: nn.Module,
    method_fn: MethodFn,
    obs: torch.Tensor | np.ndarray,
    layers: list[str] | None = None,
    threshold: float = 0.5,
    seed: int = 0,
) -> RandomizationReport:
    """Model-parameter randomisation test (Adebayo et al. 2018), cascading from the output down.

    Works on a deep copy: ``module`` itself is never changed. The trained map is computed on the
    copy; then, one layer at a time and cumulatively, the copy's layers are re-initialised from the
    top (output) down and the map is recomputed and compared with the trained one.

    Args:
        module: The trained model.
        method_fn: (module, obs) -> maps (B, *obs_shape); it builds its score function from the module
            it is given (``methods.module_method``), so it sees the randomised copy.
        obs: (B, *obs_shape) observations.
        layers: Dotted names of the layers to randomise, in the order to randomise them; default every
            layer with parameters, last registered first (``parameter_layers`` reversed).
        threshold: The verdict passes when the correlation falls below it.
        seed: Seed of the re-initialisations (layer i uses seed + i).

    Returns:
        ``RandomizationReport`` with one ``LayerRandomization`` per layer.
    """
    model = copy.deepcopy(module)
    by_name = dict(parameter_layers(model))
    if layers is None:
        layers = list(reversed(by_name))
    unknown = [name for name in layers if name not in by_name]
    if unknown:
        raise ValueError(f"no layer with parameters named {', '.join(unknown)}; valid: {', '.join(by_name)}")
    if not layers:
        raise ValueError(f"{type(module).__name__} has no parameters to randomise")
    trained = method_fn(model, obs)
    records = []
    for step, name in enumerate(layers):
        reinitialize(by_name[name], seed + step)
        rhos = rank_correlations(trained, method_fn(model, obs))
        records.append(LayerRandomization(name, type(by_name[name]).__name__, float(rhos.mean()), rhos))
    convs = [i for i, name in enumerate(layers) if isinstance(by_name[name], nn.modules.conv._ConvNd)]
    decisive = convs[-1] if convs else len(records) - 1
    passed = records[decisive].correlation < threshold
    return RandomizationReport(tuple(records), passed, threshold, records[decisive].layer)
