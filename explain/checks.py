"""One method on one model over many frames: its maps, their cost, and the three faithfulness checks.

This is the layer between the computational core (``methods``, ``faithfulness``) and the things a
person reads (the JSON of ``lab explain``, the video caption, the table in RESULTS.md). It works on
any module that maps (N, *obs_shape) float observations to outputs: an agent seen at fixed memory
(``explain.agents.AgentNet``) or a plain classifier. The three checks, and what they mean:

- **deletion** (Petsiuk et al. 2018): remove the most salient 5%, 10%, ... of the pixels and watch the
  chosen action's probability (or Q gap, or class probability) fall; compare the area under that curve
  with removing pixels in random order. ``ratio`` = AUC(salient) / AUC(random): below 1 the map points
  at evidence the model uses; the lab asks for at most ``DELETION_THRESHOLD``.
- **randomisation** (Adebayo et al. 2018): re-initialise the layers from the output down and recompute
  the map; once the convolutions are random the map must look different (Spearman rank correlation
  with the trained map below ``RANDOMIZATION_THRESHOLD``), or it was explaining the picture, not the
  model.
- **completeness** (integrated gradients only): the attributions must add up to F(x) - F(baseline);
  the relative error says whether the path integral had enough steps.

A module that keeps per-frame context (a recurrent agent's memory) exposes ``select_frames(indices)``;
every call here selects the frames it is about to pass, so a memory state always meets its own frame.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from core.files import jsonable
from explain import faithfulness
from explain.methods import (
    DEFAULT_IG_STEPS,
    completeness_error,
    get_method,
    integrated_gradients_with_delta,
    make_score_fn,
)

DELETION_THRESHOLD = 0.7
"""A map passes the deletion check when AUC(salient order) <= 0.7 * AUC(random order)."""

RANDOMIZATION_THRESHOLD = 0.5
"""A map passes the sanity check when its rank correlation with the trained map falls below 0.5."""

COMPLETENESS_THRESHOLD = 0.01
"""Integrated gradients pass when their mean relative completeness error is below 1%."""

DEFAULT_CHUNK = 25
"""Frames per call of a method: IG then evaluates 25 x steps rows, in pieces of ``batch_rows``."""


# ---------------------------------------------------------------------------------------------
# What is explained
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Which number of the model a map explains, and which number the deletion check watches.

    Attributes:
        name: Shown to people: "policy", "value", "q", "class".
        kind: Score kind of the maps (``methods.SCORE_KINDS``), e.g. "log_prob".
        deletion_kind: Score kind of the deletion curve; it should be positive and fall as evidence
            goes, e.g. "prob" for a policy.
        output: Which output of the module to read (0 for PPO's logits, 1 for its value), None if one.
    """

    name: str
    kind: str
    deletion_kind: str
    output: int | None = None


@dataclass
class Subject:
    """A model, the frames it is explained on and the index each frame's score is read at.

    Attributes:
        module: (N, *obs_shape) float -> outputs; in eval mode. Randomisation works on copies of it.
        obs: (B, *obs_shape) the frames (uint8 pixels or floats).
        index: (B,) int64 action or class per frame (ignored for the value target).
        target: What is explained.
        cam_module: Where Grad-CAM looks for the last convolution, given the module (or a copy of it).
        deletion_mode: "blur" for images, "zero" for vectors and small images.
        frame_ids: For a subset of frames: the index, in the module's per-frame context, of each of
            them; None when frame i is context frame i.
    """

    module: nn.Module
    obs: torch.Tensor
    index: torch.Tensor
    target: Target
    cam_module: Callable[[nn.Module], nn.Module] = field(default=lambda module: module)
    deletion_mode: str = "blur"
    frame_ids: torch.Tensor | None = None

    @property
    def frames(self) -> int:
        return int(self.obs.shape[0])

    def ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Context indices of the subject's frames ``indices``."""
        return indices if self.frame_ids is None else self.frame_ids[indices]

    def select(self, module: nn.Module, indices: torch.Tensor) -> None:
        """Tells a module with per-frame context (memory) which of the subject's frames come next."""
        if hasattr(module, "select_frames"):
            module.select_frames(self.ids(indices))


# ---------------------------------------------------------------------------------------------
# Typed records of the outcome
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeletionSummary:
    """The deletion check over all frames.

    Attributes:
        score: The score kind watched ("prob", "q_gap", "value").
        mode: What replaces a removed pixel ("blur", "zero") or token ("baseline").
        ratio: ``auc_salient / auc_random``.
        auc_salient: Mean over frames of the area under the salient-order curve, each curve divided by
            its frame's initial score (so every frame weighs the same).
        auc_random: The same for the random order.
        frame_ratio: Mean over frames of each frame's own AUC ratio (frames with a positive random AUC);
            a frame whose random curve falls to almost nothing weighs a lot here.
        frames: Frames the check ran on.
        passed: ``ratio <= threshold``.
        threshold: ``DELETION_THRESHOLD``.
    """

    score: str
    mode: str
    ratio: float
    auc_salient: float
    auc_random: float
    frame_ratio: float
    frames: int
    passed: bool
    threshold: float = DELETION_THRESHOLD


@dataclass(frozen=True)
class LayerCorrelation:
    """Rank correlation with the trained map after randomising ``layer`` and every layer above it."""

    layer: str
    kind: str
    correlation: float


@dataclass(frozen=True)
class RandomizationSummary:
    """The cascading-randomisation sanity check.

    Attributes:
        correlation: Mean rank correlation after the decisive layer (the last convolution randomised,
            or the last layer for models without convolutions).
        decisive_layer: That layer's dotted name.
        passed: ``correlation < threshold``: the maps depend on the trained weights.
        threshold: ``RANDOMIZATION_THRESHOLD``.
        frames: Frames the check ran on (a subset: it recomputes the maps once per layer).
        layers: One record per randomised layer, output first.
    """

    correlation: float
    decisive_layer: str
    passed: bool
    threshold: float
    frames: int
    layers: tuple[LayerCorrelation, ...]


@dataclass(frozen=True)
class CompletenessSummary:
    """How well integrated gradients add up: |sum(map) - (F(x) - F(baseline))| / |F(x) - F(baseline)|.

    Attributes:
        steps: Points of the path integral.
        baseline: The baseline ("zero", "blur").
        mean, median, max: Of the relative error over frames.
        pooled: sum |error| / sum |F(x) - F(baseline)| over frames: the error relative to the total
            score gap (a frame whose score hardly changes between baseline and input has a large
            relative error of its own however exact the integral).
        passed: ``mean < threshold``.
        threshold: ``COMPLETENESS_THRESHOLD``.
        frames: Frames it was measured on.
    """

    steps: int
    baseline: str
    mean: float
    median: float
    max: float
    pooled: float
    passed: bool
    threshold: float
    frames: int


@dataclass
class MethodReport:
    """One method on one subject: the cost of its maps and its checks (None where not run).

    Attributes:
        method: Registry name.
        label: How tables name it: the method and, for IG, its baseline ("integrated_gradients (blur)").
        frames: Frames explained.
        seconds: Wall time of the maps alone.
        cpu_seconds: CPU time of the maps (all threads of the process): the wall time of an idle
            machine with one core, roughly, where the wall time says more about other work running.
        deletion, randomization, completeness: The checks.
        check_seconds: Wall time of the checks.
    """

    method: str
    label: str
    frames: int
    seconds: float
    cpu_seconds: float
    deletion: DeletionSummary | None = None
    randomization: RandomizationSummary | None = None
    completeness: CompletenessSummary | None = None
    check_seconds: float = 0.0

    @property
    def passed(self) -> bool | None:
        """True when every check that ran passed; None when none ran."""
        verdicts = [
            check.passed
            for check in (self.deletion, self.randomization, self.completeness)
            if check is not None
        ]
        return all(verdicts) if verdicts else None

    def to_json(self) -> dict[str, Any]:
        return jsonable({**asdict(self), "passed": self.passed})

    def caption(self) -> str:
        """One line for a video: the checks and their verdicts."""
        parts = []
        if self.deletion is not None:
            parts.append(f"deletion {self.deletion.ratio:.2f} {_mark(self.deletion.passed)}")
        if self.randomization is not None:
            parts.append(
                f"sanity rho {self.randomization.correlation:.2f} {_mark(self.randomization.passed)}"
            )
        if self.completeness is not None:
            parts.append(f"IG error {self.completeness.mean:.2%} {_mark(self.completeness.passed)}")
        return "  ".join(parts)


def _mark(passed: bool) -> str:
    return "pass" if passed else "FAIL"


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------


@dataclass
class MapResult:
    """Maps of all frames, with integrated gradients' completeness data when the method is IG.

    Attributes:
        maps: (B, *obs_shape) float32.
        seconds: Wall time.
        cpu_seconds: CPU time of the process.
        completeness: (B,) relative completeness errors (IG only).
        score_gap: (B,) F(x) - F(baseline) (IG only).
    """

    maps: torch.Tensor
    seconds: float
    cpu_seconds: float
    completeness: np.ndarray | None = None
    score_gap: np.ndarray | None = None


def chunks(count: int, size: int) -> list[torch.Tensor]:
    """Index tensors [0, size), [size, 2 size), ... covering ``count`` items."""
    return [torch.arange(start, min(start + size, count)) for start in range(0, count, size)]


def method_maps(
    subject: Subject,
    method: str,
    module: nn.Module | None = None,
    frames: torch.Tensor | None = None,
    options: dict[str, Any] | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> MapResult:
    """The maps of ``method`` on the subject's frames (all of them, or ``frames``), chunk by chunk.

    Args:
        subject: What is explained.
        method: A registered method name.
        module: The module to explain; default ``subject.module`` (randomisation passes copies).
        frames: (K,) indices of the frames to explain; default all.
        options: Method options (``steps`` of IG, ``stride`` of perturbation, ...).
        chunk: Frames per call.

    Returns:
        ``MapResult`` with maps (K, *obs_shape).
    """
    spec = get_method(method)
    module = subject.module if module is None else module
    frames = torch.arange(subject.frames) if frames is None else frames
    options = dict(options or {})
    maps, errors, gaps = [], [], []
    started, cpu_started = time.perf_counter(), time.process_time()
    for part in chunks(len(frames), chunk):
        indices = frames[part]
        subject.select(module, indices)
        obs = subject.obs[indices]
        score_fn = make_score_fn(
            module, obs, subject.target.kind, subject.index[indices], subject.target.output
        )
        if method == "integrated_gradients":
            result = integrated_gradients_with_delta(
                score_fn,
                obs,
                steps=int(options.get("steps", DEFAULT_IG_STEPS)),
                baseline=options.get("baseline", "zero"),
                blur_sigma=float(options.get("blur_sigma", 5.0)),
            )
            maps.append(result.maps)
            errors.append(completeness_error(result).numpy())
            gaps.append(result.score_gap.numpy())
        else:
            maps.append(spec(score_fn, obs, module=subject.cam_module(module), **options))
    return MapResult(
        torch.cat(maps),
        time.perf_counter() - started,
        time.process_time() - cpu_started,
        np.concatenate(errors) if errors else None,
        np.concatenate(gaps) if gaps else None,
    )


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def deletion_check(
    subject: Subject, maps: torch.Tensor, chunk: int = DEFAULT_CHUNK, seed: int = 0
) -> DeletionSummary:
    """Deletion curves of every frame (salient order against one random order), summarised.

    Args:
        subject: What is explained; its ``deletion_kind`` is the score watched.
        maps: (B, *obs_shape) the maps of all frames.
        chunk: Frames per call.
        seed: Seeds the random order (and the tie breaking) of each chunk.
    """
    ratios, salient, random = [], [], []
    for part in chunks(subject.frames, chunk):
        subject.select(subject.module, part)
        obs = subject.obs[part]
        score_fn = make_score_fn(
            subject.module, obs, subject.target.deletion_kind, subject.index[part], subject.target.output
        )
        result = faithfulness.deletion_ratio(
            score_fn,
            obs,
            maps[part],
            mode=subject.deletion_mode,
            rng=np.random.default_rng(seed + int(part[0])),
        )
        ratios.append(result.per_frame)
        salient.append(result.salient.normalized_auc)
        random.append(result.random.normalized_auc)
    return deletion_summary(
        subject.target.deletion_kind,
        subject.deletion_mode,
        np.concatenate(salient),
        np.concatenate(random),
        np.concatenate(ratios),
    )


def deletion_summary(
    score: str, mode: str, salient: np.ndarray, random: np.ndarray, frame_ratios: np.ndarray
) -> DeletionSummary:
    """The summary from per-frame normalised AUCs (B,) in salient and random order and their ratios (B,)."""
    auc_salient, auc_random = _nanmean(salient), _nanmean(random)
    ratio = auc_salient / auc_random if auc_random > 0 else math.nan
    return DeletionSummary(
        score=score,
        mode=mode,
        ratio=ratio,
        auc_salient=auc_salient,
        auc_random=auc_random,
        frame_ratio=_nanmean(frame_ratios),
        frames=len(salient),
        passed=bool(ratio <= DELETION_THRESHOLD),
    )


def randomization_check(
    subject: Subject,
    method: str,
    frames: int = 16,
    options: dict[str, Any] | None = None,
    threshold: float = RANDOMIZATION_THRESHOLD,
    seed: int = 0,
) -> RandomizationSummary:
    """Cascading randomisation on ``frames`` frames spread evenly over the subject's frames.

    The action or class of each frame stays the trained model's, so every map explains the same
    choice; only the weights change.
    """
    picked = evenly_spaced(subject.frames, frames)
    subject.select(subject.module, picked)

    def explain(model: nn.Module, obs: torch.Tensor) -> torch.Tensor:
        return method_maps(subject, method, module=model, frames=picked, options=options).maps

    report = faithfulness.cascading_randomization(
        subject.module, explain, subject.obs[picked], threshold=threshold, seed=seed
    )
    decisive = next(record for record in report.layers if record.layer == report.decisive_layer)
    return RandomizationSummary(
        correlation=decisive.correlation,
        decisive_layer=report.decisive_layer,
        passed=bool(report.passed),
        threshold=threshold,
        frames=len(picked),
        layers=tuple(LayerCorrelation(r.layer, r.kind, r.correlation) for r in report.layers),
    )


def completeness_summary(
    errors: np.ndarray, gaps: np.ndarray, steps: int, baseline: str
) -> CompletenessSummary:
    """Summary of IG's per-frame relative completeness errors (B,) and score gaps (B,); the verdict
    reads the mean of the per-frame errors, the strictest of the summaries."""
    mean = float(np.mean(errors))
    absolute = errors * np.maximum(np.abs(gaps), 1e-8)  # |sum(map) - gap| per frame
    return CompletenessSummary(
        steps=steps,
        baseline=baseline,
        mean=mean,
        median=float(np.median(errors)),
        max=float(np.max(errors)),
        pooled=float(absolute.sum() / max(float(np.abs(gaps).sum()), 1e-8)),
        passed=bool(mean < COMPLETENESS_THRESHOLD),
        threshold=COMPLETENESS_THRESHOLD,
        frames=len(errors),
    )


def method_label(method: str, options: dict[str, Any]) -> str:
    """The name of a method in tables: IG names its baseline, perturbation a stride that is not the default."""
    if method == "integrated_gradients":
        return f"{method} ({options.get('baseline', 'zero')})"
    if method == "perturbation" and "stride" in options:
        return f"{method} (stride {options['stride']})"
    return method


def evenly_spaced(count: int, wanted: int) -> torch.Tensor:
    """``min(wanted, count)`` indices spread evenly over ``range(count)``, first and last included."""
    if count <= wanted:
        return torch.arange(count)
    return torch.from_numpy(np.unique(np.linspace(0, count - 1, wanted).round().astype(np.int64)))


def explain_and_check(
    subject: Subject,
    method: str,
    options: dict[str, Any] | None = None,
    checks: bool = True,
    sanity_frames: int = 16,
    check_frames: int | None = None,
) -> tuple[MapResult, MethodReport]:
    """The maps of ``method`` on every frame and, with ``checks``, the three checks.

    Args:
        subject: What is explained.
        method: Registry name.
        options: Method options.
        checks: Run deletion, randomisation and (IG) completeness.
        sanity_frames: Frames of the randomisation check.
        check_frames: Frames of the deletion check, spread evenly; None: all.

    Returns:
        ``(maps, report)``.
    """
    options = dict(options or {})
    result = method_maps(subject, method, options=options)
    report = MethodReport(
        method, method_label(method, options), subject.frames, result.seconds, result.cpu_seconds
    )
    if result.completeness is not None:
        steps = int(options.get("steps", DEFAULT_IG_STEPS))
        report.completeness = completeness_summary(
            result.completeness, result.score_gap, steps, str(options.get("baseline", "zero"))
        )
    if not checks:
        return result, report
    started = time.perf_counter()
    picked = evenly_spaced(subject.frames, check_frames or subject.frames)
    report.deletion = deletion_check(subset(subject, picked), result.maps[picked])
    report.randomization = randomization_check(subject, method, sanity_frames, options)
    report.check_seconds = time.perf_counter() - started
    return result, report


def subset(subject: Subject, frames: torch.Tensor) -> Subject:
    """The subject restricted to ``frames`` (indices into its frames), context selection included."""
    if len(frames) == subject.frames:
        return subject
    return replace(
        subject, obs=subject.obs[frames], index=subject.index[frames], frame_ids=subject.ids(frames)
    )


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def format_table(reports: Sequence[MethodReport]) -> str:
    """A Markdown table of the checks of several methods, failures included."""
    lines = [
        "| method | frames | maps: wall s (CPU s) | deletion AUC ratio | rank corr. once the convs are random "
        "| IG completeness error | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        deletion = report.deletion
        sanity = report.randomization
        complete = report.completeness
        verdict = {True: "pass", False: "FAIL", None: "-"}[report.passed]
        lines.append(
            f"| {report.label} | {report.frames} | {report.seconds:.1f} ({report.cpu_seconds:.1f}) | "
            + (f"{deletion.ratio:.2f} {_mark(deletion.passed)}" if deletion else "-")
            + " | "
            + (f"{sanity.correlation:.2f} {_mark(sanity.passed)}" if sanity else "-")
            + " | "
            + (
                f"{complete.mean:.2%} {_mark(complete.passed)} ({complete.steps} steps, median {complete.median:.2%})"
                if complete
                else "-"
            )
            + f" | {verdict} |"
        )
    return "\n".join(lines)


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan
