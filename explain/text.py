"""Token attributions and attention weights for the lab's sequence models (sentiment, sequence tasks).

Token ids are not a continuous input, so integrated gradients run on the **embedding layer** (captum's
``LayerIntegratedGradients``): the path goes from the embedding of a baseline sequence (every real
token replaced by the padding id, the padding mask unchanged) to the review's embedding, and a token's
attribution is the sum of its embedding vector's attributions. They add up to
F(review) - F(baseline) (completeness), which is checked like IG on images.

The checks have token versions: deletion replaces the most attributed tokens by the baseline id first
(against a random order), and cascading randomisation compares attributions on the real tokens only
(padding always gets zero, which would otherwise count as agreement).

Attention (Transformers only): the self-attention weights of the last block, averaged over heads,
recomputed from each block's input by a forward hook (the model itself uses a fused kernel that never
forms them). The weight a token gets is read at the position the model's answer comes from: averaged
over all real positions for mean pooling, the row of the answer's position otherwise.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerIntegratedGradients
from scipy import stats
from torch import nn

from explain.checks import (
    RANDOMIZATION_THRESHOLD,
    DeletionSummary,
    LayerCorrelation,
    MethodReport,
    RandomizationSummary,
    completeness_summary,
    deletion_summary,
    evenly_spaced,
)
from explain.faithfulness import deletion_fractions, deletion_ranks, parameter_layers, reinitialize
from explain.methods import DEFAULT_IG_STEPS, tile_rows

TEXT_METHODS = ("integrated_gradients",)


@dataclass
class TokenBatch:
    """Sequences to explain and where each one's answer is read.

    Attributes:
        tokens: (B, T) int64 token ids, right-padded.
        padding_mask: (B, T) bool, True at padding.
        positions: (B,) the position whose output is explained (the last real token for a per-position
            model; ignored by pooled classifiers, which answer once per sequence).
        baseline_id: The id that replaces a token in the baseline and in deletion (the padding id).
    """

    tokens: torch.Tensor
    padding_mask: torch.Tensor
    positions: torch.Tensor
    baseline_id: int = 0

    @property
    def valid(self) -> torch.Tensor:
        """(B, T) bool, True at real tokens."""
        return ~self.padding_mask

    def baseline(self) -> torch.Tensor:
        """(B, T) the baseline sequence: every real token replaced by ``baseline_id``."""
        return torch.where(self.valid, torch.full_like(self.tokens, self.baseline_id), self.tokens)


class PositionScores(nn.Module):
    """A sequence model's logits at each sequence's answer position: (N, T) ids -> (N, C).

    The model is called as ``model(tokens, padding_mask)`` and returns (N, C) (one answer per sequence)
    or (N, T, C) (an answer per position; the row at ``positions`` is taken). ``padding_mask`` and
    ``positions`` are given for B sequences and repeated to N = k * B rows (copy-major).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(
        self, tokens: torch.Tensor, padding_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        rows = tokens.shape[0]
        padding_mask, positions = tile_rows(padding_mask, rows), tile_rows(positions, rows)
        out = self.model(tokens, padding_mask)
        if out.dim() == 3:
            out = out[torch.arange(rows, device=out.device), positions]  # (N, C)
        return out


def embedding_of(model: nn.Module) -> nn.Embedding:
    """The token embedding of a sequence model (the first ``nn.Embedding`` registered in it).

    Raises:
        ValueError: If there is none.
    """
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module
    raise ValueError(f"{type(model).__name__} has no token embedding; token attributions need one")


@torch.no_grad()
def predict(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """(B, C) class probabilities at each sequence's answer position."""
    return torch.softmax(PositionScores(model)(batch.tokens, batch.padding_mask, batch.positions), dim=-1)


@dataclass
class TokenAttributions:
    """Integrated gradients of B sequences.

    Attributes:
        scores: (B, T) attribution of each token (0 at padding).
        completeness: (B,) relative completeness error |sum - (F(x) - F(baseline))| / |F(x) - F(baseline)|.
        score_gap: (B,) F(x) - F(baseline).
        seconds: Wall time.
        cpu_seconds: CPU time of the process.
    """

    scores: torch.Tensor
    completeness: np.ndarray
    score_gap: np.ndarray
    seconds: float
    cpu_seconds: float


def token_integrated_gradients(
    model: nn.Module, batch: TokenBatch, classes: torch.Tensor, steps: int = DEFAULT_IG_STEPS
) -> TokenAttributions:
    """Integrated gradients of the class logit on the embedding layer, summed per token.

    Args:
        model: A sequence model (see ``PositionScores``).
        batch: The sequences.
        classes: (B,) the class whose logit is explained (usually the predicted one).
        steps: Points of the path integral.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    scorer = PositionScores(model)
    # cuDNN refuses backward through an RNN in eval mode; the lab's models run without dropout in
    # eval mode anyway, so train mode changes nothing else for them.
    rnn_modes = [(m, m.training) for m in model.modules() if isinstance(m, nn.RNNBase)]
    for module, _ in rnn_modes:
        module.train()
    try:
        attributions, delta = LayerIntegratedGradients(scorer, embedding_of(model)).attribute(
            batch.tokens,
            baselines=batch.baseline(),
            additional_forward_args=(batch.padding_mask, batch.positions),
            target=classes,
            n_steps=steps,
            method="gausslegendre",
            return_convergence_delta=True,
        )
    finally:
        for module, mode in rnn_modes:
            module.train(mode)
    scores = attributions.sum(dim=-1).detach().float() * batch.valid  # (B, T)
    with torch.no_grad():
        ends = scorer(torch.cat([batch.tokens, batch.baseline()]), batch.padding_mask, batch.positions)
        picked = ends.gather(1, torch.cat([classes, classes])[:, None]).squeeze(1)
        gap = picked[: len(classes)] - picked[len(classes) :]
    error = (delta.detach().abs() / gap.abs().clamp_min(1e-8)).numpy()
    return TokenAttributions(
        scores, error, gap.numpy(), time.perf_counter() - started, time.process_time() - cpu_started
    )


# ---------------------------------------------------------------------------------------------
# Attention weights
# ---------------------------------------------------------------------------------------------


def _attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a model (those with a ``qkv`` projection and ``heads``)."""
    return [m for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "heads")]


def self_attention_weights(
    module: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """The weights ``nets.transformer.SelfAttention`` applies, which its fused kernel never forms.

    Args:
        module: The attention module (``qkv`` projection, ``heads``).
        x: (B, T, C) its input.
        attn_mask: Bool, broadcastable to (B, heads, T, T), True where a query may attend; or None.
        is_causal: Whether the module was called causal.

    Returns:
        (B, heads, T, T) softmax weights, each query's row summing to 1.
    """
    batch, steps, width = x.shape
    head_width = width // module.heads
    q, k, _ = module.qkv(x).split(width, dim=2)
    q, k = (z.view(batch, steps, module.heads, head_width).transpose(1, 2) for z in (q, k))
    logits = q @ k.transpose(-1, -2) / math.sqrt(head_width)  # (B, heads, T, T)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf"))
    if is_causal:
        causal = torch.ones(steps, steps, dtype=torch.bool, device=x.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def attention_weights(model: nn.Module, batch: TokenBatch) -> torch.Tensor | None:
    """Last-block self-attention weights averaged over heads, read at each answer position.

    Returns:
        (B, T) weights on the tokens (0 at padding), or None for a model without attention.
    """
    blocks = _attention_blocks(model)
    if not blocks:
        return None
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        attn_mask = args[1] if len(args) > 1 else None
        is_causal = bool(args[2]) if len(args) > 2 else False
        captured.append(
            self_attention_weights(module, args[0], attn_mask, is_causal).mean(dim=1)
        )  # (B, T, T)

    handle = blocks[-1].register_forward_hook(hook)
    try:
        PositionScores(model)(batch.tokens, batch.padding_mask, batch.positions)
    finally:
        handle.remove()
    weights = captured[-1]  # (B, query, key)
    valid = batch.valid.float()
    pooled = _is_pooled(model)
    if pooled:
        received = (weights * valid[:, :, None]).sum(dim=1) / valid.sum(dim=1, keepdim=True)
    else:
        received = weights[torch.arange(len(weights)), batch.positions]
    return received * valid


def _is_pooled(model: nn.Module) -> bool:
    """True for a model answering once per sequence from the mean of its positions."""
    pools = [getattr(m, "pool", None) for m in model.modules()]
    return "mean" in pools


# ---------------------------------------------------------------------------------------------
# Checks on tokens
# ---------------------------------------------------------------------------------------------


def _class_probability(
    model: nn.Module, batch: TokenBatch, classes: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """(N,) probability of each row's class; ``tokens`` holds k * B rows, copy-major."""
    with torch.no_grad():
        logits = PositionScores(model)(tokens, batch.padding_mask, batch.positions)
    return torch.softmax(logits, dim=-1).gather(1, tile_rows(classes, len(tokens))[:, None]).squeeze(1)


def token_deletion(
    model: nn.Module,
    batch: TokenBatch,
    classes: torch.Tensor,
    scores: torch.Tensor,
    fraction_step: float = 0.05,
    seed: int = 0,
) -> DeletionSummary:
    """Replaces the most attributed real tokens by the baseline id first, 5% of them per step, and
    compares the area under the class probability's curve with a random order."""
    rng = np.random.default_rng(seed)
    fractions = deletion_fractions(fraction_step)
    valid = batch.valid
    lengths = valid.sum(dim=1).numpy()
    # Padding ranks last: its heat is below every real token's, in salient and in random order.
    heat = np.where(valid.numpy(), np.abs(scores.numpy()), -1.0)
    orders = {"salient": heat, "random": np.where(valid.numpy(), rng.random(heat.shape), -1.0)}
    areas = {}
    for name, order in orders.items():
        ranks = torch.from_numpy(deletion_ranks(order, False, rng))  # (B, T)
        counts = torch.from_numpy(np.rint(fractions[:, None] * lengths[None]).astype(np.int64))  # (K, B)
        removed = ranks[None] < counts[:, :, None]  # (K, B, T)
        deleted = torch.where(removed, batch.baseline_id, batch.tokens[None])  # (K, B, T)
        curve = _class_probability(model, batch, classes, deleted.reshape(-1, deleted.shape[-1]))
        curve = curve.reshape(len(fractions), -1).T.double().numpy()  # (B, K)
        areas[name] = (np.trapezoid(curve, fractions, axis=1), curve[:, 0])
    salient_auc, initial = areas["salient"]
    random_auc, _ = areas["random"]
    with np.errstate(divide="ignore", invalid="ignore"):
        per_example = np.where(random_auc > 0, salient_auc / random_auc, np.nan)
    return deletion_summary("prob", "baseline", salient_auc / initial, random_auc / initial, per_example)


def token_randomization(
    model: nn.Module,
    batch: TokenBatch,
    classes: torch.Tensor,
    steps: int = DEFAULT_IG_STEPS,
    threshold: float = RANDOMIZATION_THRESHOLD,
    seed: int = 0,
) -> RandomizationSummary:
    """Cascading randomisation (output layer first) of token attributions, compared on real tokens."""
    copied = copy.deepcopy(model)
    layers = list(reversed(parameter_layers(copied)))
    trained = token_integrated_gradients(copied, batch, classes, steps).scores
    records = []
    for step, (name, layer) in enumerate(layers):
        reinitialize(layer, seed + step)
        scores = token_integrated_gradients(copied, batch, classes, steps).scores
        records.append(
            LayerCorrelation(name, type(layer).__name__, _valid_correlation(trained, scores, batch.valid))
        )
    return RandomizationSummary(
        correlation=records[-1].correlation,
        decisive_layer=records[-1].layer,
        passed=bool(records[-1].correlation < threshold),
        threshold=threshold,
        frames=len(classes),
        layers=tuple(records),
    )


def _valid_correlation(first: torch.Tensor, second: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean over sequences of Spearman's rho between |first| and |second| on the real tokens."""
    rhos = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        for row in range(len(first)):
            keep = valid[row]
            rho = stats.spearmanr(first[row][keep].abs().numpy(), second[row][keep].abs().numpy()).statistic
            rhos.append(0.0 if np.isnan(rho) else float(rho))
    return float(np.mean(rhos))


def explain_tokens(
    model: nn.Module,
    batch: TokenBatch,
    steps: int = DEFAULT_IG_STEPS,
    checks: bool = True,
    sanity_examples: int = 16,
) -> tuple[TokenAttributions, torch.Tensor, MethodReport]:
    """Token IG of the predicted classes, with the three checks.

    Returns:
        ``(attributions, predicted classes (B,), report)``.
    """
    classes = predict(model, batch).argmax(dim=-1)
    result = token_integrated_gradients(model, batch, classes, steps)
    report = MethodReport(
        "integrated_gradients",
        "integrated_gradients (pad tokens)",
        len(classes),
        result.seconds,
        result.cpu_seconds,
    )
    report.completeness = completeness_summary(result.completeness, result.score_gap, steps, "pad tokens")
    if checks:
        started = time.perf_counter()
        report.deletion = token_deletion(model, batch, classes, result.scores)
        picked = evenly_spaced(len(classes), sanity_examples)
        sub = TokenBatch(
            batch.tokens[picked], batch.padding_mask[picked], batch.positions[picked], batch.baseline_id
        )
        report.randomization = token_randomization(model, sub, classes[picked], steps)
        report.check_seconds = time.perf_counter() - started
    return result, classes, report
