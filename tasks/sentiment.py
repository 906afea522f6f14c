"""Sentiment of movie reviews: positive or negative, with an RNN or a Transformer over word tokens.

Two sources:

- ``sample`` (default, offline): ``tasks/data/reviews.tsv``, 360 short English reviews written for
  this project (120 by hand, 240 from templates with contrast and negation: "the plot is dull, but
  the cast is superb, so I recommend it" is positive), balanced, split stratified into train/test.
- ``imdb``: the 50,000 IMDb reviews of Maas et al. (2011) through Hugging Face ``datasets``
  (``pip install datasets``; it downloads on first use), subsampled to ``max_examples`` per split.

Text becomes lower-case word tokens; the vocabulary is built on the training split only (words seen
fewer than ``min_count`` times there, and every word new in the test split, map to ``<unk>``).
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.compute import DEVICES, seed_everything
from core.config import option
from tasks.loop import TaskError, Tensors, fit
from tasks.models import SEQUENCE_NETS, SequenceClassifier, build_sequence_encoder

NAME = "sentiment"
DESCRIPTION = (
    "movie-review sentiment (shipped sample, or IMDb via Hugging Face datasets) with RNN or Transformer"
)
NETS = SEQUENCE_NETS
SAMPLE_PATH = Path(__file__).parent / "data" / "reviews.tsv"
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
TOKEN_PATTERN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")


@dataclass
class SentimentConfig:
    """Settings of ``lab fit sentiment``."""

    net: str = option("gru", "sequence encoder", choices=NETS)
    epochs: int = option(30, "passes over the training reviews", min=1, max=10_000)
    seed: int = option(0, "seed of the split, torch, numpy and random", min=0)
    lr: float = option(3e-3, "peak AdamW learning rate", min=1e-6, max=10.0)
    batch_size: int = option(32, "reviews per gradient step", min=1, max=100_000)
    source: str = option(
        "sample", "sample (shipped, offline) or imdb (Hugging Face datasets)", choices=("sample", "imdb")
    )
    test_fraction: float = option(
        0.25, "share of the sample held out (stratified); imdb has its own test split", min=0.05, max=0.9
    )
    max_examples: int = option(
        5000, "imdb only: reviews drawn from each of its train and test splits", min=10
    )
    max_tokens: int = option(200, "reviews are cut to this many tokens", min=4, max=4096)
    min_count: int = option(1, "words seen fewer times in training become <unk>", min=1)
    max_vocab: int = option(20_000, "keep at most this many most frequent training words", min=10)
    hidden: int = option(
        64, "RNN hidden size / Transformer d_model (also the embedding width)", min=4, max=4096
    )
    layers: int = option(1, "RNN layers / Transformer blocks", min=1, max=24)
    heads: int = option(4, "attention heads (transformer)", min=1, max=64)
    pool: str = option(
        "auto",
        "review summary: last, mean, or auto (RNN last, Transformer mean)",
        choices=("auto", "last", "mean"),
    )
    dropout: float = option(0.1, "Transformer dropout", min=0.0, max=0.9)
    weight_decay: float = option(0.01, "AdamW weight decay", min=0.0, max=1.0)
    warmup: float = option(0.05, "share of all steps spent warming up the learning rate", min=0.0, max=0.5)
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=("cosine", "constant"))
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)", min=0.0)
    device: str = option("auto", "auto (CUDA when available), cpu or cuda", choices=DEVICES)


def tokenize(text: str) -> list[str]:
    """Lower-case words (keeping inner apostrophes: "didn't") and ``!``/``?``; HTML breaks dropped."""
    return TOKEN_PATTERN.findall(text.lower().replace("<br />", " "))


def build_vocabulary(texts: list[str], min_count: int, max_size: int) -> list[str]:
    """Index -> word, ``<pad>`` and ``<unk>`` first, then training words by falling frequency."""
    counts = collections.Counter(token for text in texts for token in tokenize(text))
    # Ties broken alphabetically so that the vocabulary, and so the run, does not depend on dict order.
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return [PAD_TOKEN, UNK_TOKEN, *words[: max_size - 2]]


def encode(texts: list[str], labels: list[int], vocabulary: list[str], max_tokens: int) -> Tensors:
    """Token ids ``(N, T) long`` right-padded with ``<pad>``, padding mask ``(N, T)``, labels ``(N,)``.

    ``T`` is the longest review after cutting to ``max_tokens`` (an empty review keeps one ``<unk>``
    so that every row has a real position to pool).
    """
    index = {word: i for i, word in enumerate(vocabulary)}
    rows = [[index.get(t, UNK_ID) for t in tokenize(text)][:max_tokens] or [UNK_ID] for text in texts]
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens, tokens == PAD_ID, torch.tensor(labels, dtype=torch.long)


def load_sample(path: Path = SAMPLE_PATH) -> tuple[list[str], list[int]]:
    """Reads the shipped ``label<TAB>text`` file (with a header row)."""
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        if line.strip():
            label, text = line.split("\t", 1)
            labels.append(int(label))
            texts.append(text)
    return texts, labels


def load_imdb(
    max_examples: int, seed: int
) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """IMDb's train and test splits through Hugging Face ``datasets``, each subsampled to ``max_examples``.

    Raises:
        TaskError: ``datasets`` is not installed or the data set cannot be downloaded (one line).
    """
    try:
        import datasets  # optional dependency: pip install datasets
    except ImportError:
        raise TaskError(
            "source=imdb needs the Hugging Face `datasets` package (pip install datasets); "
            "source=sample works offline"
        ) from None
    try:
        imdb = datasets.load_dataset("imdb")
    except Exception as error:  # network, hub or cache errors come in many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TaskError(
            f"cannot load IMDb through Hugging Face datasets ({reason}); source=sample works offline"
        ) from None
    rng = np.random.default_rng(seed)
    splits = []
    for name in ("train", "test"):
        texts, labels = list(imdb[name]["text"]), [int(y) for y in imdb[name]["label"]]
        # IMDb's files are sorted by label, so subsample at random rather than taking the first rows.
        keep = rng.permutation(len(texts))[:max_examples]
        splits.append(([texts[i] for i in keep], [labels[i] for i in keep]))
    return splits[0], splits[1]


def load_texts(config: SentimentConfig) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """``(train_texts, train_labels), (test_texts, test_labels)`` from the configured source."""
    if config.source == "imdb":
        return load_imdb(config.max_examples, config.seed)
    from sklearn.model_selection import train_test_split

    texts, labels = load_sample()
    train_x, test_x, train_y, test_y = train_test_split(
        texts, labels, test_size=config.test_fraction, stratify=labels, random_state=config.seed
    )
    return (list(train_x), list(train_y)), (list(test_x), list(test_y))


def build_model(config: SentimentConfig, vocab_size: int) -> SequenceClassifier:
    """Token embedding + RNN/Transformer from nets, pooled over the review, and a two-class head."""
    encoder = build_sequence_encoder(
        config.net,
        vocab_size,
        hidden_size=config.hidden,
        num_layers=config.layers,
        heads=config.heads,
        max_len=config.max_tokens,
        dropout=config.dropout,
    )
    pool = config.pool if config.pool != "auto" else ("mean" if config.net == "transformer" else "last")
    return SequenceClassifier(encoder, num_classes=2, pool=pool)


def run(
    config: SentimentConfig, run_dir: Path, progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Loads reviews, builds the vocabulary on the training split, trains and reports test accuracy.

    Args:
        config: the task settings.
        run_dir: existing directory receiving the outputs.
        progress: show a progress bar.
        resume: continue the run in ``run_dir`` from its newest epoch checkpoint.

    Returns:
        The metrics dict written to ``run_dir/metrics.json``.

    Raises:
        TaskError: source=imdb cannot be loaded.
    """
    seed_everything(config.seed)
    (train_texts, train_labels), (test_texts, test_labels) = load_texts(config)
    vocabulary = build_vocabulary(train_texts, config.min_count, config.max_vocab)
    train = encode(train_texts, train_labels, vocabulary, config.max_tokens)
    test = encode(test_texts, test_labels, vocabulary, config.max_tokens)
    model = build_model(config, len(vocabulary))
    return fit(
        task=NAME,
        config=config,
        model=model,
        train=train,
        test=test,
        run_dir=run_dir,
        progress=progress,
        resume=resume,
        extra_metrics={"source": config.source, "vocab_size": len(vocabulary)},
        # The vocabulary makes the checkpoint usable on new text without the training data.
        checkpoint_meta={"vocabulary": vocabulary, "labels": ["negative", "positive"]},
    ).metrics
