"""Algorithmic sequence tasks on variable-length strings: parity, copy and reverse.

- ``parity``: is the number of ones in a bit string odd? Every bit matters, so a model must carry one
  bit of state across the whole string: easy for an RNN, notoriously hard for a Transformer (Hahn,
  2020). Two tricks make a small Transformer learn 16-bit parity on CPU in a couple of minutes:

  * prefix targets (``targets=prefix``, the default): the model is trained to output the parity of
    every prefix, with causal attention, so each string is also a lesson on all its shorter prefixes
    (a length curriculum for free) and the lesson is 16 labels long instead of one. Reported accuracy
    is always on the whole string's parity, read at its last position.
  * uniform bit density (``density=uniform``): each training string draws its share of ones from
    U(0, 1) instead of fair coins, so strings with 13 or 14 ones out of 16 are common in training.
    With fair coins the Transformer tended to get one whole rare count class wrong (all 16-bit
    strings with 13 ones, say: 1% of the test set). Test strings are always fair coin flips.

  ``targets=final`` trains on one label per string (pooled with ``pool``) for comparison.
- ``copy`` / ``reverse``: the model reads ``x_1 .. x_n SEP`` followed by ``n`` blanks and must write
  ``x`` (or ``x`` reversed) at the blanks; scored per token (``token_accuracy``) and per string.

The test set reported as ``test_metric`` holds unseen strings of the full ``length`` (the hardest
case); a second held-out set with lengths uniform in ``[1, length]`` is reported as ``test_*_mixed``.
Held out means: no test string is a training string, nor (with prefix targets) a prefix of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.compute import DEVICES, seed_everything
from core.config import option
from tasks.loop import IGNORE_INDEX, TaskError, Tensors, accuracy_metrics, fit
from tasks.models import SEQUENCE_NETS, SequenceClassifier, SequenceTagger, build_sequence_encoder

NAME = "sequence"
DESCRIPTION = "parity, copy and reversal of variable-length strings with LSTM/GRU or a Transformer"
NETS = SEQUENCE_NETS
PROBLEMS = ("parity", "copy", "reverse")

# Token ids. Parity strings use PAD and the two bits; copy/reverse add SEP, BLANK and the symbols.
PAD, SEP, BLANK = 0, 1, 2
FIRST_SYMBOL = 3  # bit b / symbol s has token id FIRST_SYMBOL + s


@dataclass
class SequenceConfig:
    """Settings of ``lab fit sequence``."""

    net: str = option("gru", "sequence encoder", choices=NETS)
    epochs: int = option(6, "passes over the training strings", min=1, max=10_000)
    seed: int = option(0, "seed of the data, torch, numpy and random", min=0)
    lr: float = option(1e-3, "peak AdamW learning rate", min=1e-6, max=10.0)
    batch_size: int = option(32, "strings per gradient step", min=1, max=100_000)
    problem: str = option("parity", "parity (one label per string), copy or reverse", choices=PROBLEMS)
    length: int = option(16, "longest string; the reported test set uses exactly this length", min=1, max=256)
    min_length: int = option(
        0,
        "shortest training string; 0 = auto: length for parity with prefix targets (prefixes cover the "
        "shorter lengths), else 1",
        min=0,
        max=256,
    )
    targets: str = option(
        "prefix",
        "parity: learn the parity of every prefix (causal) or only the final one",
        choices=("prefix", "final"),
    )
    density: str = option(
        "uniform",
        "parity training bits: each string's share of ones ~ U(0, 1) (uniform) or fair coins (fair)",
        choices=("uniform", "fair"),
    )
    num_symbols: int = option(8, "alphabet size for copy/reverse (parity always uses 2)", min=2, max=256)
    train_size: int = option(20_000, "training strings", min=16, max=10_000_000)
    test_size: int = option(2_000, "held-out strings in each test set", min=16, max=1_000_000)
    hidden: int = option(
        64, "RNN hidden size / Transformer d_model (also the embedding width)", min=4, max=4096
    )
    layers: int = option(2, "RNN layers / Transformer blocks", min=1, max=24)
    heads: int = option(8, "attention heads (transformer; must divide hidden)", min=1, max=64)
    pool: str = option(
        "auto",
        "string summary for targets=final: last, mean, or auto (RNN last, Transformer mean)",
        choices=("auto", "last", "mean"),
    )
    dropout: float = option(0.0, "Transformer dropout", min=0.0, max=0.9)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0, max=1.0)
    warmup: float = option(0.05, "share of all steps spent warming up the learning rate", min=0.0, max=0.5)
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=("cosine", "constant"))
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)", min=0.0)
    device: str = option("auto", "auto (CUDA when available), cpu or cuda", choices=DEVICES)


def prefix_targets(config: SequenceConfig) -> bool:
    """Whether this config trains parity on every prefix (and so uses a causal model)."""
    return config.problem == "parity" and config.targets == "prefix"


def training_min_length(config: SequenceConfig) -> int:
    """``min_length``, with 0 resolved: full length for prefix-target parity, else 1."""
    if config.min_length:
        return config.min_length
    return config.length if prefix_targets(config) else 1


def sample_strings(
    count: int,
    min_length: int,
    max_length: int,
    num_symbols: int,
    rng: np.random.Generator,
    exclude: set[bytes] | None = None,
    density: str = "fair",
) -> list[np.ndarray]:
    """Draws ``count`` strings (int8 arrays of symbols) with lengths uniform in ``[min_length, max_length]``.

    Args:
        count: how many strings.
        min_length: shortest length.
        max_length: longest length.
        num_symbols: alphabet size; symbols are 0 .. num_symbols - 1.
        rng: the random generator.
        exclude: when given, the draw is held out: strings in ``exclude`` are redrawn and the result
            has no duplicates. Short lengths whose few strings are all excluded (there are only 8 bit
            strings of length 3) thus drop out of the draw. None draws i.i.d., duplicates allowed.
        density: ``fair``: symbols uniform; ``uniform`` (bits only): each string first draws its share
            of ones p ~ U(0, 1), then its bits are ones with probability p.

    Raises:
        TaskError: too few unseen strings exist to fill a held-out draw.
    """
    strings: list[np.ndarray] = []
    seen = None if exclude is None else set(exclude)
    attempts = 0
    while len(strings) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise TaskError(
                f"cannot draw {count} unseen strings of length {min_length}..{max_length} over {num_symbols} "
                "symbols; lower train_size/test_size or raise length"
            )
        length = int(rng.integers(min_length, max_length + 1))
        if density == "uniform" and num_symbols == 2:
            string = (rng.random(length) < rng.random()).astype(np.int8)
        else:
            string = rng.integers(0, num_symbols, length).astype(np.int8)
        if seen is not None:
            key = string.tobytes()
            if key in seen:
                continue
            seen.add(key)
        strings.append(string)
    return strings


def encode(strings: list[np.ndarray], problem: str, max_length: int, all_prefixes: bool = False) -> Tensors:
    """Turns strings into padded model inputs and labels.

    Args:
        strings: int8 symbol arrays.
        problem: ``parity``, ``copy`` or ``reverse``.
        max_length: the longest string the model will see.
        all_prefixes: parity only: label every position with the parity of the prefix ending there
            (training with prefix targets). False labels the final parity only.

    Returns:
        parity: ``tokens (N, L) long``, ``padding_mask (N, L) bool`` and labels, ``(N, L)`` with the
        prefix parities (or, without ``all_prefixes`` and for the pooled ``targets=final`` model, the
        final parity at the last real position and IGNORE_INDEX elsewhere); ``L = max_length``.
        copy/reverse: ``tokens (N, 2L + 1)`` = ``x SEP BLANK*n PAD*``, the mask, and ``labels (N, 2L + 1)``
        holding the expected symbol at the blanks and IGNORE_INDEX everywhere else.
    """
    count = len(strings)
    if problem == "parity":
        tokens = torch.full((count, max_length), PAD, dtype=torch.long)
        labels = torch.full((count, max_length), IGNORE_INDEX, dtype=torch.long)
        for i, string in enumerate(strings):
            n = len(string)
            tokens[i, :n] = torch.from_numpy(string.astype(np.int64)) + FIRST_SYMBOL
            parities = torch.from_numpy(np.cumsum(string, dtype=np.int64) % 2)  # (n,) parity of each prefix
            if all_prefixes:
                labels[i, :n] = parities
            else:
                labels[i, n - 1] = parities[-1]
        return tokens, tokens == PAD, labels
    width = 2 * max_length + 1
    tokens = torch.full((count, width), PAD, dtype=torch.long)
    labels = torch.full((count, width), IGNORE_INDEX, dtype=torch.long)
    for i, string in enumerate(strings):
        n = len(string)
        symbols = torch.from_numpy(string.astype(np.int64))
        tokens[i, :n] = symbols + FIRST_SYMBOL
        tokens[i, n] = SEP
        tokens[i, n + 1 : 2 * n + 1] = BLANK
        labels[i, n + 1 : 2 * n + 1] = symbols if problem == "copy" else symbols.flip(0)
    return tokens, tokens == PAD, labels


def make_data(config: SequenceConfig, rng: np.random.Generator) -> tuple[Tensors, Tensors, Tensors]:
    """Training strings, the full-length test set and the mixed-length test set (both held out)."""
    min_length = training_min_length(config)
    if min_length > config.length:
        raise TaskError(f"min_length={config.min_length} exceeds length={config.length}")
    num_symbols = 2 if config.problem == "parity" else config.num_symbols
    prefixes = prefix_targets(config)
    train = sample_strings(
        config.train_size, min_length, config.length, num_symbols, rng, density=config.density
    )
    # With prefix targets every prefix of a training string was trained on: hold those out as well.
    seen = {s[:n].tobytes() for s in train for n in (range(1, len(s) + 1) if prefixes else [len(s)])}
    test_full = sample_strings(config.test_size, config.length, config.length, num_symbols, rng, exclude=seen)
    seen |= {s.tobytes() for s in test_full}
    test_mixed = sample_strings(config.test_size, 1, config.length, num_symbols, rng, exclude=seen)
    return (
        encode(train, config.problem, config.length, all_prefixes=prefixes),
        encode(test_full, config.problem, config.length),
        encode(test_mixed, config.problem, config.length),
    )


class FinalPositionClassifier(torch.nn.Module):
    """Adapts a pooled classifier ``(B, C)`` to labels that sit at the last real position ``(B, L)``.

    Lets ``targets=final`` parity share the data layout of prefix targets: the logits are placed at
    each string's last position and the other positions get a constant that the labels ignore.
    """

    def __init__(self, classifier: SequenceClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(tokens, padding_mask)  # (B, C)
        batch, steps = tokens.shape
        last = (~padding_mask).sum(dim=1) - 1  # (B,) index of the last real position
        out = logits.new_zeros(batch, steps, logits.shape[-1])  # (B, L, C)
        out[torch.arange(batch, device=tokens.device), last] = logits
        return out


def build_model(config: SequenceConfig, vocab_size: int) -> torch.nn.Module:
    """A sequence encoder from nets with a head at every position, or a pooled head (targets=final)."""
    pooled = config.problem == "parity" and not prefix_targets(config)
    encoder = build_sequence_encoder(
        config.net,
        vocab_size,
        hidden_size=config.hidden,
        num_layers=config.layers,
        heads=config.heads,
        max_len=2 * config.length + 1,
        # A per-position parity must not see the future; copy/reverse may look anywhere.
        causal=prefix_targets(config),
        dropout=config.dropout,
    )
    if pooled:
        pool = config.pool if config.pool != "auto" else ("mean" if config.net == "transformer" else "last")
        return FinalPositionClassifier(SequenceClassifier(encoder, num_classes=2, pool=pool))
    return SequenceTagger(encoder, num_classes=2 if config.problem == "parity" else config.num_symbols)


def run(config: SequenceConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Generates the strings, trains the model and reports held-out accuracy.

    Args:
        config: the task settings.
        run_dir: existing directory receiving the outputs.
        progress: show a progress bar.
        resume: continue the run in ``run_dir`` from its newest epoch checkpoint.

    Returns:
        The metrics dict written to ``run_dir/metrics.json``; ``metric`` is ``accuracy`` (whole-string
        parity) for parity and ``token_accuracy`` for copy/reverse (``test_sequence_accuracy`` counts
        whole strings).
    """
    if config.net == "transformer" and config.hidden % config.heads:
        raise TaskError(f"hidden={config.hidden} must be divisible by heads={config.heads}")
    seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)
    train, test_full, test_mixed = make_data(config, rng)
    vocab_size = FIRST_SYMBOL + (2 if config.problem == "parity" else config.num_symbols)
    model = build_model(config, vocab_size)
    per_token = config.problem != "parity"

    def evaluate(model: torch.nn.Module, test: Tensors) -> dict[str, float]:
        results = {}
        for suffix, split in (("", test), ("_mixed", test_mixed)):
            metrics = accuracy_metrics(model, split)
            if per_token:
                metrics["token_accuracy"] = metrics.pop("accuracy")
            else:
                del metrics["sequence_accuracy"]  # one labelled position per string: same as accuracy
            results.update({f"{key}{suffix}": value for key, value in metrics.items()})
        return results

    return fit(
        task=NAME,
        config=config,
        model=model,
        train=train,
        test=test_full,
        run_dir=run_dir,
        progress=progress,
        resume=resume,
        metric="token_accuracy" if per_token else "accuracy",
        evaluate=evaluate,
        extra_metrics={"problem": config.problem, "length": config.length},
    ).metrics
