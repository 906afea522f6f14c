"""Attribution methods on a plain module and a score function: which input pixels move the score.

Everything here works on a **score function** ``score_fn: (N, *obs_shape) float -> (N,)``: the chosen
action's log-probability or probability (PPO policy), its Q-value (DQN), the value V(s) (PPO critic)
or a class logit (supervised). ``make_score_fn`` builds one from a module (or any callable) returning
logits, Q-values or values; the action or class index is chosen once, on the unperturbed frames, and
held fixed while a method perturbs or interpolates them.

Batch layout: a method hands the score function either the B frames it explains or N = k * B rows
made of k perturbed copies of those frames, copy-major (rows ``[c * B, (c + 1) * B)`` are copy c),
which is the layout captum uses for the steps of integrated gradients. ``TargetScore`` repeats its
per-frame index to match (``tile_rows``); a recurrent wrapper repeats its memory state the same way.

Observations: uint8 frames are turned into floats in [0, 1] (``to_float_obs``, the same scaling
``nets.layers.image_to_float`` applies inside the lab's CNNs, which pass float input through
unchanged), so the network sees exactly what it sees when acting, and attributions are per unit of
[0, 1] intensity. Float observations (vectors, digits) are used as given.

The module should be in eval mode (dropout and batch-norm statistics would otherwise change the score
between the copies a method compares). Gradients are taken with respect to the input only: parameter
``.grad`` fields are left alone.

Every method returns a float32 CPU tensor with exactly the observations' shape (B, *obs_shape);
``to_heatmap`` reduces a map to (H, W) in [0, 1] for display. Methods: ``saliency``,
``gradient_x_input``, ``integrated_gradients``, ``grad_cam``, ``perturbation`` (registry: ``METHODS``,
``get_method``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, IntegratedGradients, LayerAttribution, LayerGradCam, Saliency
from torch import nn

from nets.layers import image_to_float

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""(N, *obs_shape) float observations -> (N,) scores, differentiable with respect to the input."""

Forward = Callable[[torch.Tensor], Any]
"""(N, *obs_shape) -> a tensor (N, K) or (N,), or a tuple of them (e.g. PPO's logits and value)."""

SCORE_KINDS: dict[str, str] = {
    "log_prob": "log softmax of the logits at the chosen action (PPO policy)",
    "prob": "softmax probability of the chosen action (policy; positive, for deletion curves)",
    "logit": "raw output at the chosen index (supervised class logit)",
    "q_value": "Q-value of the chosen action (DQN)",
    "q_gap": "Q(s, a) - mean_b Q(s, b): how much the chosen action beats the average one (DQN)",
    "value": "the scalar output itself, no index (PPO value head V(s))",
}

DEFAULT_IG_STEPS = 48
"""Gauss-Legendre points of integrated gradients: completeness error mostly under 1% on a trained Mario CNN."""

DEFAULT_BATCH_ROWS = 256
"""Rows per forward pass when a method evaluates many perturbed copies (bounds memory)."""


# ---------------------------------------------------------------------------------------------
# Observations and score functions
# ---------------------------------------------------------------------------------------------


def to_float_obs(obs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Observations as float32: uint8 pixels -> [0, 1] (as the lab's CNNs scale them); floats unchanged.

    Args:
        obs: (B, *obs_shape) uint8 or float, numpy or torch.

    Returns:
        (B, *obs_shape) float32 tensor on ``obs``'s device (CPU for numpy), detached.
    """
    tensor = torch.as_tensor(obs).detach()
    return image_to_float(tensor).float()


def tile_rows(values: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeats per-frame ``values`` (B, ...) to ``rows`` = k * B rows, copy-major, as methods lay them out.

    Raises:
        ValueError: If ``rows`` is not a multiple of B.
    """
    frames = values.shape[0]
    if rows == frames:
        return values
    if frames == 0 or rows % frames:
        raise ValueError(f"a batch of {rows} rows is not a whole number of copies of the {frames} frames")
    return values.repeat(rows // frames, *([1] * (values.dim() - 1)))


def select_output(outputs: Any, output: int | str | None) -> torch.Tensor:
    """Picks one output of a module: ``outputs[output]`` for tuples/dicts, the tensor itself when None."""
    if output is None:
        if not isinstance(outputs, torch.Tensor):
            raise ValueError("the module returns several outputs; pass output=<index or key> to pick one")
        return outputs
    return outputs[output]


def choose_index(forward: Forward, obs: torch.Tensor, output: int | str | None = None) -> torch.Tensor:
    """The greedy action or predicted class per frame: argmax of the chosen output on unperturbed frames.

    Args:
        forward: A module or callable; see ``Forward``.
        obs: (B, *obs_shape) observations (uint8 or float).
        output: Which output to read when ``forward`` returns several.

    Returns:
        (B,) int64 indices.
    """
    with torch.no_grad():
        values = select_output(forward(to_float_obs(obs)), output)
    return values.argmax(dim=-1)


@dataclass(frozen=True)
class TargetScore:
    """A score function: one scalar per row from a module's output, at a held-fixed index per frame.

    Attributes:
        forward: The module or callable producing the outputs.
        kind: One of ``SCORE_KINDS``.
        index: (B,) int64 action or class per frame; None for ``kind="value"``.
        output: Which output to read when ``forward`` returns several (e.g. 0 for PPO logits).
    """

    forward: Forward
    kind: str
    index: torch.Tensor | None = None
    output: int | str | None = None

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """(N, *obs_shape) float -> (N,) scores; N is B or k * B (copy-major)."""
        values = select_output(self.forward(obs), self.output)
        if self.kind == "value":
            if values.dim() > 1 and values[0].numel() != 1:
                raise ValueError(
                    f"kind 'value' needs one number per row, got outputs of shape {tuple(values.shape)}"
                )
            return values.reshape(values.shape[0])  # (N,) from (N,) or (N, 1)
        if self.index is None:
            raise ValueError(f"kind '{self.kind}' needs an index per frame")
        if self.kind == "log_prob":
            values = torch.log_softmax(values, dim=-1)
        elif self.kind == "prob":
            values = torch.softmax(values, dim=-1)
        elif self.kind == "q_gap":
            values = values - values.mean(dim=-1, keepdim=True)
        index = tile_rows(self.index.to(values.device), values.shape[0])
        return values.gather(-1, index[:, None]).squeeze(-1)


def make_score_fn(
    forward: Forward,
    obs: torch.Tensor | np.ndarray,
    kind: str,
    index: torch.Tensor | np.ndarray | list[int] | None = None,
    output: int | str | None = None,
) -> TargetScore:
    """Builds the score function for a policy, Q-network, value head or classifier.

    Args:
        forward: A module or callable mapping (N, *obs_shape) float to (N, K) or (N,) outputs, or a
            tuple/dict of them (``output`` picks one). Recurrent agents pass a closure over their memory
            state (repeated to N rows with ``tile_rows``).
        obs: (B, *obs_shape) the unperturbed observations the index is chosen on.
        kind: "log_prob", "prob", "logit", "q_value", "q_gap" or "value" (see ``SCORE_KINDS``).
        index: (B,) the action taken or class to explain per frame; None takes the argmax on ``obs``
            (the greedy action, the predicted class). Ignored for "value".
        output: Which output of ``forward`` to read: e.g. 0 for PPO's logits, 1 for its value.

    Returns:
        A ``TargetScore``: (N, *obs_shape) -> (N,).

    Raises:
        ValueError: For an unknown kind or an index of the wrong length.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind '{kind}'; valid: {', '.join(SCORE_KINDS)}")
    frames = to_float_obs(obs)
    if kind == "value":
        return TargetScore(forward, kind, None, output)
    if index is None:
        chosen = choose_index(forward, frames, output)
    else:
        chosen = torch.as_tensor(np.asarray(index) if isinstance(index, list) else index).long().reshape(-1)
    if chosen.shape[0] != frames.shape[0]:
        raise ValueError(f"index has {chosen.shape[0]} entries for {frames.shape[0]} frames")
    return TargetScore(forward, kind, chosen.detach(), output)


# ---------------------------------------------------------------------------------------------
# Image helpers
# ---------------------------------------------------------------------------------------------


def _check_images(
    obs: torch.Tensor, what: str, hint: str = "use saliency, gradient_x_input or integrated_gradients"
) -> None:
    if obs.dim() < 3:
        raise ValueError(
            f"{what} needs image observations (B, [C,] H, W), got shape {tuple(obs.shape)}; {hint}"
        )


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blurs the last two dims with a Gaussian of standard deviation ``sigma`` pixels (edges replicated).

    Args:
        images: (*, H, W) float.
        sigma: Standard deviation in pixels; the kernel spans 3 sigma each side.

    Returns:
        (*, H, W) blurred, same dtype and device.
    """
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    height, width = images.shape[-2:]
    flat = images.reshape(-1, 1, height, width)
    # Separable: a row pass then a column pass, each with replicated edges (any image size works).
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(images.shape)


def make_baseline(obs: torch.Tensor, baseline: str | torch.Tensor, blur_sigma: float = 5.0) -> torch.Tensor:
    """The reference input of integrated gradients.

    Args:
        obs: (B, *obs_shape) float.
        baseline: "zero" (black frames / zero vector), "blur" (each frame blurred by ``blur_sigma``,
            images only), or a tensor broadcastable to ``obs``.

    Returns:
        (B, *obs_shape) float baseline.
    """
    if isinstance(baseline, torch.Tensor):
        return baseline.to(obs).expand_as(obs).contiguous()
    if baseline == "zero":
        return torch.zeros_like(obs)
    if baseline == "blur":
        _check_images(obs, "a blurred baseline", "use baseline='zero'")
        return gaussian_blur(obs, blur_sigma)
    raise ValueError(f"unknown baseline '{baseline}'; valid: zero, blur, or a tensor")


# ---------------------------------------------------------------------------------------------
# Gradient methods (captum)
# ---------------------------------------------------------------------------------------------


def _finish(maps: torch.Tensor) -> torch.Tensor:
    return maps.detach().float().cpu().contiguous()


def _spread(spatial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> ``like``'s shape (B, [C,] H, W), the same map on every channel."""
    frames, height, width = spatial.shape
    return spatial.reshape(frames, *([1] * (like.dim() - 3)), height, width).expand_as(like)


def saliency(score_fn: ScoreFn, obs: torch.Tensor | np.ndarray, **_: Any) -> torch.Tensor:
    """Gradient magnitude |dF/dx| (Simonyan et al. 2014; captum ``Saliency``).

    Args:
        score_fn: (N, *obs_shape) -> (N,).
        obs: (B, *obs_shape) uint8 or float observations.

    Returns:
        (B, *obs_shape) float32 CPU map, non-negative.
    """
    inputs = to_float_obs(obs).requires_grad_()  # a leaf that asks for gradients: captum need not warn
    return _finish(Saliency(score_fn).attribute(inputs, abs=True))


def gradient_x_input(score_fn: ScoreFn, obs: torch.Tensor | np.ndarray, **_: Any) -> torch.Tensor:
    """Gradient times input x * dF/dx (Shrikumar et al. 2016; captum ``InputXGradient``).

    Returns:
        (B, *obs_shape) float32 CPU map, signed.
    """
    inputs = to_float_obs(obs).requires_grad_()
    return _finish(InputXGradient(score_fn).attribute(inputs))


class IntegratedGradientsResult(NamedTuple):
    """Integrated gradients with their completeness check.

    Attributes:
        maps: (B, *obs_shape) attributions; they sum to about F(x) - F(baseline) per frame.
        delta: (B,) captum's convergence delta: sum(maps) - (F(x) - F(baseline)).
        score_gap: (B,) F(x) - F(baseline).
    """

    maps: torch.Tensor
    delta: torch.Tensor
    score_gap: torch.Tensor


def integrated_gradients_with_delta(
    score_fn: ScoreFn,
    obs: torch.Tensor | np.ndarray,
    steps: int = DEFAULT_IG_STEPS,
    baseline: str | torch.Tensor = "zero",
    blur_sigma: float = 5.0,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> IntegratedGradientsResult:
    """Integrated gradients (Sundararajan et al. 2017; captum ``IntegratedGradients``, Gauss-Legendre).

    Args:
        score_fn: (N, *obs_shape) -> (N,).
        obs: (B, *obs_shape) uint8 or float observations.
        steps: Points on the path from the baseline to the input.
        baseline: "zero", "blur" or a tensor; see ``make_baseline``.
        blur_sigma: Blur of the "blur" baseline, in pixels.
        batch_rows: Rows per forward/backward pass (at least one step of all B frames).

    Returns:
        ``IntegratedGradientsResult`` with maps (B, *obs_shape), delta (B,), score_gap (B,).
    """
    inputs = to_float_obs(obs)
    baselines = make_baseline(inputs, baseline, blur_sigma)
    frames = inputs.shape[0]
    # captum splits the steps into chunks of whole copies of the batch, which TargetScore expects.
    maps, delta = IntegratedGradients(score_fn).attribute(
        inputs,
        baselines=baselines,
        n_steps=steps,
        internal_batch_size=max(batch_rows, frames),
        return_convergence_delta=True,
    )
    with torch.no_grad():
        ends = score_fn(torch.cat([inputs, baselines]))  # (2B,): F(x) then F(baseline)
    gap = ends[:frames] - ends[frames:]
    return IntegratedGradientsResult(_finish(maps), _finish(delta), _finish(gap))


def completeness_error(result: IntegratedGradientsResult, eps: float = 1e-8) -> torch.Tensor:
    """|sum(maps) - (F(x) - F(baseline))| / |F(x) - F(baseline)| per frame: 0 is a perfect integral.

    Returns:
        (B,) relative errors; a frame whose score equals its baseline's divides by ``eps``.
    """
    return result.delta.abs() / result.score_gap.abs().clamp_min(eps)


def integrated_gradients(
    score_fn: ScoreFn,
    obs: torch.Tensor | np.ndarray,
    steps: int = DEFAULT_IG_STEPS,
    baseline: str | torch.Tensor = "zero",
    blur_sigma: float = 5.0,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    **_: Any,
) -> torch.Tensor:
    """The maps of ``integrated_gradients_with_delta`` alone: (B, *obs_shape) float32 CPU, signed."""
    return integrated_gradients_with_delta(score_fn, obs, steps, baseline, blur_sigma, batch_rows).maps


# ---------------------------------------------------------------------------------------------
# Grad-CAM
# ---------------------------------------------------------------------------------------------


def last_conv_layer(module: nn.Module) -> nn.Conv2d:
    """The last ``nn.Conv2d`` registered in ``module`` (for the lab's CNNs, the one nearest the output).

    For an agent with separate actor and critic encoders, pass the encoder whose output the score
    depends on (``agent.encoder`` for the policy), since registration order puts the critic's last.

    Raises:
        ValueError: If ``module`` has no convolution.
    """
    convs = [layer for layer in module.modules() if isinstance(layer, nn.Conv2d)]
    if not convs:
        raise ValueError(
            f"{type(module).__name__} has no convolutional layer; Grad-CAM needs one; "
            "use saliency or integrated_gradients"
        )
    return convs[-1]


def grad_cam(
    score_fn: ScoreFn,
    obs: torch.Tensor | np.ndarray,
    module: nn.Module | None = None,
    layer: nn.Module | None = None,
    **_: Any,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) at a convolution, upsampled bilinearly to the input's H, W.

    The channel-weighted layer activation goes through a ReLU, as in the paper, and is repeated over
    the input channels: one spatial map per frame, in the observation's shape.

    Args:
        score_fn: (N, *obs_shape) -> (N,); it must run ``layer`` (captum hooks it).
        obs: (B, C, H, W) or (B, H, W) observations.
        module: Where to look for the last convolution when ``layer`` is None.
        layer: The convolution to explain at; default ``last_conv_layer(module)``.

    Returns:
        (B, *obs_shape) float32 CPU map, non-negative.

    Raises:
        ValueError: If there is no convolution, the observations are not images, or ``score_fn``
            never runs ``layer``.
    """
    if layer is None:
        if module is None:
            raise ValueError("grad_cam needs module= (to find its last convolution) or layer=")
        layer = last_conv_layer(module)
    inputs = to_float_obs(obs)
    _check_images(inputs, "grad_cam")
    calls: list[int] = []
    hook = layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        cam = LayerGradCam(score_fn, layer).attribute(inputs, relu_attributions=True)  # (B, 1, h, w)
    except Exception as error:
        if not calls:
            raise ValueError(
                f"the score function never runs the layer {layer}; pass the right layer="
            ) from error
        raise
    finally:
        hook.remove()
    cam = LayerAttribution.interpolate(cam, tuple(inputs.shape[-2:]), interpolate_mode="bilinear")
    return _finish(_spread(cam[:, 0], inputs))


# ---------------------------------------------------------------------------------------------
# Perturbation saliency (Greydanus et al. 2018)
# ---------------------------------------------------------------------------------------------
# Written here rather than taken from captum: captum's ``Occlusion`` replaces hard-edged windows by a
# fixed baseline, while Greydanus et al. blend a soft Gaussian patch of the blurred frame into it.


def perturbation_masks(height: int, width: int, stride: int = 5, sigma: float = 5.0) -> torch.Tensor:
    """Gaussian masks centred on a grid of points every ``stride`` pixels, peak 1.

    Returns:
        (gh, gw, H, W) masks with gh = ceil(H / stride), gw = ceil(W / stride).
    """
    ys = torch.arange(height, dtype=torch.float32)
    xs = torch.arange(width, dtype=torch.float32)
    centres_y, centres_x = ys[::stride], xs[::stride]
    gauss_y = torch.exp(-0.5 * ((ys[None, :] - centres_y[:, None]) / sigma) ** 2)  # (gh, H)
    gauss_x = torch.exp(-0.5 * ((xs[None, :] - centres_x[:, None]) / sigma) ** 2)  # (gw, W)
    return gauss_y[:, None, :, None] * gauss_x[None, :, None, :]


def upsample_grid(coarse: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """Bilinear map from grid points (every ``stride`` px from 0) to every pixel.

    Args:
        coarse: (B, gh, gw) values at pixels (i * stride, j * stride).

    Returns:
        (B, H, W): exact at the grid points, bilinear between them, edge values past the last one.
    """
    grid_h, grid_w = coarse.shape[-2:]
    span = ((grid_h - 1) * stride + 1, (grid_w - 1) * stride + 1)
    fine = F.interpolate(coarse[:, None], size=span, mode="bilinear", align_corners=True)
    fine = F.pad(fine, (0, width - span[1], 0, height - span[0]), mode="replicate")
    return fine[:, 0]


def perturbation(
    score_fn: ScoreFn,
    obs: torch.Tensor | np.ndarray,
    stride: int = 5,
    sigma: float = 5.0,
    blur_sigma: float = 3.0,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    **_: Any,
) -> torch.Tensor:
    """Perturbation saliency (Greydanus et al. 2018) of an action-specific score (Huber et al. 2022).

    Each grid point (i, j) blends a Gaussian patch of the blurred frame into the frame,
    phi = x * (1 - M_ij) + blur(x) * M_ij on every channel, and scores S(i, j) = (F(x) - F(phi))^2 / 2.
    The coarse (H / stride, W / stride) map is upsampled bilinearly to (H, W) and repeated over
    channels. With F the chosen action's log-probability or Q-value, the map shows what the choice of
    that action depends on, not every change of the policy.

    Args:
        score_fn: (N, *obs_shape) -> (N,).
        obs: (B, C, H, W) or (B, H, W) observations.
        stride: Pixels between patch centres.
        sigma: Standard deviation of the patch, in pixels.
        blur_sigma: Blur of the image that fills the patch, in pixels.
        batch_rows: Rows per forward pass; each pass evaluates max(1, batch_rows // B) masks on all frames.

    Returns:
        (B, *obs_shape) float32 CPU map, non-negative.
    """
    inputs = to_float_obs(obs)
    _check_images(inputs, "perturbation")
    frames = inputs.shape[0]
    height, width = inputs.shape[-2:]
    masks = perturbation_masks(height, width, stride, sigma).to(inputs.device)  # (gh, gw, H, W)
    grid = masks.shape[:2]
    masks = masks.reshape(-1, *([1] * (inputs.dim() - 2)), height, width)  # (P, 1, [1,] H, W)
    blurred = gaussian_blur(inputs, blur_sigma)
    per_pass = max(1, batch_rows // frames)
    changes = []
    with torch.no_grad():
        base = score_fn(inputs)  # (B,)
        for start in range(0, masks.shape[0], per_pass):
            mask = masks[start : start + per_pass]  # (k, 1, ..., H, W)
            perturbed = inputs * (1 - mask) + blurred * mask  # (k, B, *obs_shape)
            scores = score_fn(perturbed.reshape(-1, *inputs.shape[1:])).reshape(mask.shape[0], frames)
            changes.append(0.5 * (scores - base) ** 2)
    coarse = torch.cat(changes).T.reshape(frames, *grid)  # (B, gh, gw)
    fine = upsample_grid(coarse, stride, height, width)  # (B, H, W)
    return _finish(_spread(fine, inputs))


# ---------------------------------------------------------------------------------------------
# Registry and display
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One attribution method: ``fn(score_fn, obs, module=None, **options) -> (B, *obs_shape)``.

    Attributes:
        name: Registry name.
        fn: The function; unknown keyword options are ignored, so one call fits every method.
        description: One line for ``lab explain --help``.
        needs_conv: True when the module must have a convolution (Grad-CAM).
        defaults: The options it reads and their defaults.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    description: str
    needs_conv: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)

    def __call__(
        self,
        score_fn: ScoreFn,
        obs: torch.Tensor | np.ndarray,
        module: nn.Module | None = None,
        **options: Any,
    ) -> torch.Tensor:
        return self.fn(score_fn, obs, module=module, **options)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("saliency", saliency, "gradient magnitude |dF/dx| (captum Saliency)"),
        Method("gradient_x_input", gradient_x_input, "x * dF/dx (captum InputXGradient)"),
        Method(
            "integrated_gradients",
            integrated_gradients,
            "path integral of gradients from a zero or blurred baseline (captum IntegratedGradients)",
            defaults={"steps": DEFAULT_IG_STEPS, "baseline": "zero", "blur_sigma": 5.0},
        ),
        Method(
            "grad_cam",
            grad_cam,
            "Grad-CAM at the last convolution, upsampled to the frame (captum LayerGradCam)",
            needs_conv=True,
        ),
        Method(
            "perturbation",
            perturbation,
            "score change when a Gaussian patch is blurred (Greydanus et al. 2018)",
            defaults={"stride": 5, "sigma": 5.0, "blur_sigma": 3.0},
        ),
    )
}


def get_method(name: str) -> Method:
    """The registered method called ``name``.

    Raises:
        ValueError: One line naming the valid methods.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; valid: {', '.join(METHODS)}")
    return METHODS[name]


def module_method(
    name: str, kind: str, index: torch.Tensor | None = None, output: int | str | None = None, **options: Any
) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``(module, obs) -> map`` for a feed-forward module called as ``module(obs)``; for randomisation tests.

    Args:
        name: A registered method.
        kind: Score kind (see ``make_score_fn``).
        index: (B,) fixed action/class; None re-chooses the argmax with each module it is given.
        output: Which output of the module to read.
        options: Options of the method (steps, stride, ...).
    """
    method = get_method(name)

    def explain(module: nn.Module, obs: torch.Tensor) -> torch.Tensor:
        return method(make_score_fn(module, obs, kind, index, output), obs, module=module, **options)

    return explain


def to_heatmap(attribution: torch.Tensor | np.ndarray, clip_percentile: float | None = None) -> np.ndarray:
    """Display map of one or more attributions: |map| summed over channels, scaled to [0, 1] by its max.

    Args:
        attribution: (*, C, H, W) maps (channel at dim -3, e.g. a frame stack), or (H, W) for one
            single-channel map.
        clip_percentile: Values above this percentile of each map (e.g. 99) saturate at 1, so that a
            few extreme pixels do not leave the rest dark; None scales by the max.

    Returns:
        (*, H, W) float32 in [0, 1]; an all-zero map stays zero.
    """
    heat = np.abs(np.asarray(torch.as_tensor(attribution).detach().float().cpu()))
    if heat.ndim >= 3:
        heat = heat.sum(axis=-3)
    flat = heat.reshape(-1, heat.shape[-2] * heat.shape[-1])
    if clip_percentile is None:
        top = flat.max(axis=1, keepdims=True)
    else:
        top = np.percentile(flat, clip_percentile, axis=1, keepdims=True)
    scaled = np.where(top > 0, flat / np.where(top > 0, top, 1.0), 0.0)
    return np.clip(scaled, 0.0, 1.0).reshape(heat.shape).astype(np.float32)
