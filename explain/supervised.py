"""``lab fit`` runs: rebuild the trained model and its held-out data, so that they can be explained.

Each task module rebuilds its own model (``build_model``) and split; the weights come from the run's
``checkpoints/final`` and the settings (and, for sentiment, the vocabulary) from that checkpoint's
sidecar, so the explanation sees exactly the model and test examples ``lab fit`` reported on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import tasks
from core.checkpoint import CheckpointError, load_checkpoint
from core.config import config_from_dict
from core.runs import locate_checkpoint, run_dir_of
from explain.checks import Subject, Target
from explain.text import TokenBatch

EXPLAINABLE_TASKS = ("digits", "sentiment", "sequence")


@dataclass
class FitRun:
    """A trained ``lab fit`` model, ready to explain.

    Attributes:
        task: The task's name.
        config: Its config dataclass.
        model: The model with the run's final weights, on CPU, in eval mode.
        meta: The checkpoint's sidecar meta.
        sidecar: The checkpoint loaded.
        run_dir: The run directory.
    """

    task: str
    config: Any
    model: nn.Module
    meta: dict[str, Any]
    sidecar: Path
    run_dir: Path


def is_fit_run(path: str | Path) -> bool:
    """True when ``path`` (a run, its checkpoints folder or a checkpoint) holds a ``lab fit`` checkpoint."""
    _, meta = locate_checkpoint(path)
    return meta.get("kind") == "task"


def load_fit_run(path: str | Path) -> FitRun:
    """Loads the final model of a ``lab fit`` run (or the checkpoint file given).

    Raises:
        CheckpointError: Not a ``lab fit`` checkpoint.
        ValueError: A task ``lab explain`` cannot explain (one line naming the ones it can).
    """
    path = Path(path)
    try:
        sidecar, meta = locate_checkpoint(path, prefix="final") if path.is_dir() else locate_checkpoint(path)
    except CheckpointError:
        sidecar, meta = locate_checkpoint(path)  # a run stopped before its final checkpoint
    if meta.get("kind") != "task":
        raise CheckpointError(f"{sidecar} is not a `lab fit` checkpoint")
    task = str(meta.get("task"))
    if task not in EXPLAINABLE_TASKS:
        raise ValueError(
            f"lab explain cannot explain task '{task}'; valid tasks: {', '.join(EXPLAINABLE_TASKS)}"
        )
    config = config_from_dict(tasks.get(task).config_class, meta["config"], source=str(sidecar))
    model = _build(task, config, meta)
    state, _ = load_checkpoint(sidecar)
    model.load_state_dict(state["model"])
    return FitRun(task, config, model.eval(), meta, sidecar, run_dir_of(sidecar))


def _build(task: str, config: Any, meta: dict[str, Any]) -> nn.Module:
    if task == "digits":
        return tasks.digits.build_model(config)
    if task == "sentiment":
        return tasks.sentiment.build_model(config, len(meta["vocabulary"]))
    from tasks.sequence import FIRST_SYMBOL

    symbols = 2 if config.problem == "parity" else config.num_symbols
    return tasks.sequence.build_model(config, FIRST_SYMBOL + symbols)


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


def digits_subject(run: FitRun) -> tuple[Subject, torch.Tensor]:
    """The held-out digits as a ``Subject`` explained at the predicted class (its logit; the deletion
    check watches the class probability, removing ink to black).

    Returns:
        ``(subject, true labels (N,))``.
    """
    _, (images, labels) = tasks.digits.load_split(run.config.test_fraction, run.config.seed)
    with torch.no_grad():
        predicted = run.model(images.float() / 255.0).argmax(dim=-1)
    subject = Subject(
        module=run.model,
        obs=images,
        index=predicted,
        target=Target("class", "logit", "prob", None),
        cam_module=lambda model: model.encoder,
        deletion_mode="zero",
    )
    return subject, labels


# ---------------------------------------------------------------------------------------------
# Text: sentiment reviews and algorithmic sequences
# ---------------------------------------------------------------------------------------------


@dataclass
class TextExamples:
    """Held-out sequences with their readable tokens and true labels.

    Attributes:
        batch: Token ids, padding mask, answer positions.
        words: Per sequence, the token strings of its real positions.
        labels: (B,) true class at the answer position.
        class_names: Names of the classes.
    """

    batch: TokenBatch
    words: list[list[str]]
    labels: torch.Tensor
    class_names: list[str]


def text_examples(run: FitRun) -> TextExamples:
    """The test split of a sentiment or sequence run, encoded as the run encoded it.

    Raises:
        ValueError: For a task without text.
    """
    if run.task == "sentiment":
        from tasks.sentiment import PAD_ID, encode, load_texts

        _, (texts, labels) = load_texts(run.config)
        vocabulary = list(run.meta["vocabulary"])
        tokens, padding_mask, targets = encode(texts, labels, vocabulary, run.config.max_tokens)
        names = list(run.meta.get("labels", ["negative", "positive"]))
        baseline_id = PAD_ID

        def spell(token: int) -> str:
            return vocabulary[token]

    elif run.task == "sequence":
        from tasks.sequence import BLANK, FIRST_SYMBOL, PAD, SEP, make_data

        _, (tokens, padding_mask, position_labels), _ = make_data(
            run.config, np.random.default_rng(run.config.seed)
        )
        symbols = 2 if run.config.problem == "parity" else run.config.num_symbols
        names = [str(s) for s in range(symbols)]
        baseline_id = PAD
        special = {PAD: "<pad>", SEP: "|", BLANK: "_"}

        def spell(token: int) -> str:
            return special.get(token, str(token - FIRST_SYMBOL))

        targets = None
    else:
        raise ValueError(f"task '{run.task}' has no text; valid: sentiment, sequence")
    lengths = (~padding_mask).sum(dim=1)
    positions = lengths - 1  # the last real token: where a per-position model gives its answer
    if targets is None:
        targets = position_labels[torch.arange(len(positions)), positions]
    words = [[spell(int(t)) for t in row[:length]] for row, length in zip(tokens, lengths, strict=True)]
    return TextExamples(TokenBatch(tokens, padding_mask, positions, baseline_id), words, targets, names)


def select_examples(examples: TextExamples, indices: torch.Tensor) -> TextExamples:
    """A subset of the examples (trimmed to its longest sequence)."""
    batch = examples.batch
    width = int((~batch.padding_mask[indices]).sum(dim=1).max())
    return TextExamples(
        TokenBatch(
            batch.tokens[indices, :width],
            batch.padding_mask[indices, :width],
            batch.positions[indices],
            batch.baseline_id,
        ),
        [examples.words[int(i)] for i in indices],
        examples.labels[indices],
        examples.class_names,
    )
