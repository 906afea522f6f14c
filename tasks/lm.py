"""A byte-level GPT on real text; by default the Python standard library's own source ("write Python").

Data: the corpus is read as bytes (a vocabulary of 256, so any text file works and nothing is ever
unknown), files joined by a NUL byte that marks where one ends. The default corpus is the ``.py``
files of the standard library of the Python that runs the lab, there on every machine without a
download. The split is fixed by file: a file is held out for validation when the CRC-32 of its path
(relative to the corpus folder) falls in the lowest ``val_percent`` percent, so it does not depend on
the order of a directory listing, and a file never straddles the split. A single file, or a folder
whose files all land on one side, is split at ``100 - val_percent`` percent of its bytes instead.

Training draws windows of ``context + 1`` bytes at random offsets (a shuffled grid of starts every
``context // 2`` bytes, moved by a random shift below that stride: every offset can be drawn); the
model predicts bytes 1..context from bytes 0..context-1. An epoch is ``epoch_steps`` batches, so
checkpoints come every few minutes however large the corpus. Validation scores ``eval_tokens``
bytes in non-overlapping windows spread evenly over the held-out files.

Reported: the validation loss (nats per byte), bits per character (bits per UTF-8 character; for
ASCII source a character is a byte), perplexity per character, and the same bits per character for
the unigram baseline (byte frequencies of the training split, add-one smoothed), which knows nothing
of context. At the end a few samples continue ``prompt``; they are printed and written to
``samples.txt``.
"""

from __future__ import annotations

import math
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import nets
from core.compute import DEVICES, seed_everything, set_learner_threads
from core.config import option
from core.files import atomic_write_bytes
from tasks.loop import Levers, TaskError, Tensors, fit, write_metrics

NAME = "lm"
DESCRIPTION = "a byte-level GPT on text: the Python standard library's own source by default (writes Python)"
NETS = ("gpt",)
STDLIB = "stdlib"
VOCAB_SIZE = 256  # bytes
END_OF_FILE = 0  # the NUL byte joins files; files that contain one are not text and are skipped


@dataclass
class LMConfig(Levers):
    """Settings of ``lab fit lm`` (the levers of :class:`tasks.loop.Levers` come first)."""

    net: str = option("gpt", "decoder-only Transformer", choices=NETS)
    epochs: int = option(20, "epochs of epoch_steps batches each", min=1, max=100_000)
    epoch_steps: int = option(100, "gradient steps per epoch (each epoch draws fresh windows)", min=1)
    seed: int = option(0, "seed of the windows, the weights, dropout and the samples", min=0)
    lr: float = option(3e-3, "peak AdamW learning rate", min=1e-6, max=10.0)
    batch_size: int = option(16, "windows per gradient step (over all processes)", min=1, max=100_000)
    context: int = option(128, "bytes the model reads to predict the next one", min=2, max=8192)
    width: int = option(128, "Transformer d_model (also the byte embedding width)", min=8, max=8192)
    layers: int = option(4, "Transformer blocks", min=1, max=96)
    heads: int = option(4, "attention heads (must divide width)", min=1, max=128)
    dropout: float = option(0.0, "dropout on embeddings, attention and residual branches", min=0.0, max=0.9)
    weight_decay: float = option(0.1, "AdamW weight decay", min=0.0, max=1.0)
    warmup: float = option(0.05, "share of all steps spent warming up the learning rate", min=0.0, max=0.5)
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=("cosine", "constant"))
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)", min=0.0)
    corpus: str = option(STDLIB, "stdlib (this Python's standard library source), or a text file or folder")
    glob: str = option("*.py", "the files of a corpus folder to read, recursively")
    val_percent: float = option(
        5.0, "percent of the files (of a lone file's bytes) held out", min=0.1, max=50.0
    )
    eval_tokens: int = option(65_536, "held-out bytes scored after each epoch", min=2, max=1_000_000_000)
    prompt: str = option("def ", "the start of every sample (\\n and \\t are a newline and a tab)")
    samples: int = option(2, "samples printed at the end", min=0, max=100)
    sample_tokens: int = option(400, "bytes per sample", min=1, max=100_000)
    temperature: float = option(0.8, "sampling temperature (lower: likelier bytes)", min=0.01, max=10.0)
    top_k: int = option(0, "sample among the k likeliest bytes only (0 = all)", min=0, max=VOCAB_SIZE)
    threads: int = option(
        1, "CPU threads of each process (0: one per core); --procs N uses the other cores", min=0, max=1024
    )
    device: str = option("auto", "auto (CUDA when available), cpu or cuda", choices=DEVICES)

    def check(self) -> None:
        """Fields that must agree (``core.config.validate`` calls it)."""
        if self.width % self.heads:
            raise ValueError(f"heads={self.heads} must divide width={self.width}")


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A corpus as two byte streams; files joined by ``END_OF_FILE``."""

    train: torch.Tensor  # (N_train,) uint8
    val: torch.Tensor  # (N_val,) uint8
    source: Path  # the file or folder read
    train_files: int
    val_files: int  # 0 when a lone file (or a one-sided folder) was split by bytes


def stdlib_folder() -> Path:
    """The standard library source folder of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def held_out(relative_path: str, val_percent: float) -> bool:
    """Whether a file belongs to the validation split: the CRC-32 of its path, in hundredths of a percent."""
    return zlib.crc32(relative_path.encode("utf-8", "surrogateescape")) % 10_000 < val_percent * 100


def read_text_files(folder: Path, glob: str) -> dict[str, bytes]:
    """``{relative path: bytes}`` of the text files under ``folder`` matching ``glob``, sorted by path.

    Files holding a NUL byte (binary data) and anything under ``site-packages`` (installed packages,
    not the standard library) are skipped.
    """
    texts: dict[str, bytes] = {}
    for path in sorted(folder.rglob(glob)):
        relative = path.relative_to(folder)
        if "site-packages" in relative.parts or not path.is_file():
            continue
        data = path.read_bytes()
        if data and bytes([END_OF_FILE]) not in data:
            texts[relative.as_posix()] = data
    return texts


def load_corpus(corpus: str, glob: str, val_percent: float) -> Corpus:
    """Reads ``corpus`` (``stdlib``, a file or a folder) and splits it into training and validation bytes.

    Raises:
        TaskError: a missing path, a folder without text files matching ``glob``.
    """
    source = stdlib_folder() if corpus == STDLIB else Path(corpus).expanduser()
    if source.is_file():
        texts = {source.name: source.read_bytes()}
    elif source.is_dir():
        texts = read_text_files(source, glob)
        if not texts:
            raise TaskError(
                f"corpus {source} has no text files matching glob={glob!r}; set --set glob=PATTERN"
            )
    else:
        raise TaskError(f"corpus {corpus!r} is not a file or folder; give corpus=stdlib or a path to text")
    separator = bytes([END_OF_FILE])
    val_names = [name for name in texts if held_out(name, val_percent)]
    if 0 < len(val_names) < len(texts):
        train = separator.join(data for name, data in texts.items() if name not in val_names)
        val = separator.join(texts[name] for name in val_names)
        counts = (len(texts) - len(val_names), len(val_names))
    else:  # one file, or every file on one side: split the bytes
        joined = separator.join(texts.values())
        cut = int(len(joined) * (1 - val_percent / 100))
        train, val, counts = joined[:cut], joined[cut:], (len(texts), 0)
    as_tensor = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(val), source, *counts)


# ---------------------------------------------------------------------------------------------
# Windows, loss and metrics
# ---------------------------------------------------------------------------------------------


class TrainingWindows:
    """Training windows of the byte stream: a grid of starts, a random shift, and the loss on them.

    ``starts`` (N,) are the grid's window starts, every ``stride`` bytes; the loop shuffles and batches
    them, ``shift`` moves each by a random ``0 .. stride-1`` bytes (the loop's augmentation hook,
    whose generator is checkpointed), and ``loss`` gathers the ``(B, context + 1)`` windows.
    """

    def __init__(self, stream: torch.Tensor, context: int) -> None:
        self.stream, self.context = stream, context
        self.stride = max(1, context // 2)
        last_start = stream.numel() - (context + 1)  # the latest start whose window fits
        self.starts = torch.arange(0, last_start - self.stride + 2, self.stride)  # (N,), shifts fit too
        self._offsets = torch.arange(context + 1)  # (context + 1,)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def shift(self, batch: Tensors, generator: torch.Generator) -> Tensors:
        (starts,) = batch
        return (starts + torch.randint(0, self.stride, starts.shape, generator=generator),)

    def loss(self, model: torch.nn.Module, batch: Tensors) -> torch.Tensor:
        """Mean next-byte cross-entropy (nats) of ``model`` on the windows starting at ``batch[0]`` (B,)."""
        (starts,) = batch
        device = starts.device
        if device not in self._on_device:  # the stream is copied to each device once
            self._on_device[device] = self.stream.to(device)
        windows = self._on_device[device][starts[:, None] + self._offsets.to(device)].long()  # (B, T+1)
        logits = model(windows[:, :-1])  # (B, T, 256)
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), windows[:, 1:].reshape(-1))


def validation_windows(stream: torch.Tensor, context: int, tokens: int) -> Tensors:
    """``(inputs, targets)``, both (N, context) long: N = tokens // context non-overlapping windows, or
    fewer when the stream is short, spread evenly over the stream."""
    available = (stream.numel() - 1) // context
    count = max(1, min(available, tokens // context))
    starts = torch.linspace(0, stream.numel() - context - 1, count).long()  # (N,)
    windows = stream[starts[:, None] + torch.arange(context + 1)].long()  # (N, context + 1)
    return windows[:, :-1], windows[:, 1:]


def characters(targets: torch.Tensor) -> int:
    """UTF-8 characters among ``targets`` bytes: all bytes but continuation bytes (0b10xxxxxx)."""
    return int(((targets & 0xC0) != 0x80).sum())


def bits_metrics(nats: float, targets: torch.Tensor) -> dict[str, float]:
    """``loss`` (nats per byte), ``bpc`` (bits per character) and ``perplexity`` (per character)."""
    bpc = nats / math.log(2) / max(1, characters(targets))
    return {"loss": nats / targets.numel(), "bpc": bpc, "perplexity": 2.0**bpc}


@torch.no_grad()
def lm_metrics(model: torch.nn.Module, data: Tensors, batch_size: int = 64) -> dict[str, float]:
    """Validation metrics of ``model`` on ``data = (inputs, targets)``, (N, T) bytes each, in fp32."""
    inputs, targets = data
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats = 0.0
    for i in range(0, inputs.shape[0], batch_size):
        logits = model(inputs[i : i + batch_size].to(device)).float()  # (b, T, 256)
        chunk = targets[i : i + batch_size].to(device)
        nats += F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), chunk.reshape(-1), reduction="sum").item()
    model.train(was_training)
    return bits_metrics(nats, targets)


def unigram_bpc(train: torch.Tensor, targets: torch.Tensor) -> float:
    """Bits per character of the add-one smoothed byte frequencies of ``train`` on ``targets``."""
    counts = torch.bincount(train.long(), minlength=VOCAB_SIZE).double() + 1.0
    log_probs = (counts / counts.sum()).log()  # (256,)
    return bits_metrics(-log_probs[targets.reshape(-1)].sum().item(), targets)["bpc"]


# ---------------------------------------------------------------------------------------------
# Model, samples, run
# ---------------------------------------------------------------------------------------------


def build_model(config: LMConfig) -> torch.nn.Module:
    return nets.build(
        config.net,
        vocab_size=VOCAB_SIZE,
        d_model=config.width,
        depth=config.layers,
        heads=config.heads,
        context=config.context,
        dropout=config.dropout,
    )


def prompt_bytes(prompt: str) -> bytes:
    """The prompt as UTF-8 bytes, with ``\\n`` and ``\\t`` written out as a newline and a tab."""
    return prompt.replace("\\n", "\n").replace("\\t", "\t").encode("utf-8")


def sample(model: torch.nn.Module, config: LMConfig) -> list[str]:
    """``config.samples`` continuations of ``config.prompt``, each cut at the first end of file."""
    prompt = prompt_bytes(config.prompt) or b"\n"
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    tokens = torch.tensor([list(prompt)] * config.samples, device=device)  # (S, len(prompt))
    out = model.generate(tokens, config.sample_tokens, config.temperature, config.top_k, generator)
    texts = []
    for row in out.cpu().tolist():
        data = bytes(row)
        end = data.find(bytes([END_OF_FILE]), len(prompt))
        texts.append((data if end < 0 else data[:end]).decode("utf-8", errors="replace"))
    return texts


def run(config: LMConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Trains the GPT on the corpus, reports validation bits per character, prints samples.

    Args:
        config: the task settings.
        run_dir: existing directory receiving metrics, events, checkpoints, plot and samples.txt.
        progress: show a progress bar.
        resume: continue the run in ``run_dir`` from its newest epoch checkpoint.

    Returns:
        The metrics dict written to ``run_dir/metrics.json``.

    Raises:
        TaskError: an unreadable or too small corpus, or what the fit loop refuses.
    """
    # One thread by default: these matrices are small, and a second OpenMP thread that spin-waits for
    # a busy core makes a step several times slower; a second process (--procs 2) uses that core.
    set_learner_threads(config.threads)
    seed_everything(config.seed)  # before the model exists, so its initial weights repeat
    corpus = load_corpus(config.corpus, config.glob, config.val_percent)
    for split, stream in (("training", corpus.train), ("validation", corpus.val)):
        if stream.numel() < 2 * (config.context + 1):
            raise TaskError(
                f"the {split} split of {corpus.source} has {stream.numel()} bytes, too few for "
                f"context={config.context}; give a larger corpus or a smaller context"
            )
    windows = TrainingWindows(corpus.train, config.context)
    test = validation_windows(corpus.val, config.context, config.eval_tokens)
    baseline = unigram_bpc(corpus.train, test[1])
    result = fit(
        task=NAME,
        config=config,
        model=build_model(config),
        train=(windows.starts,),
        test=test,
        run_dir=run_dir,
        progress=progress,
        metric="bpc",
        evaluate=lm_metrics,
        loss_fn=windows.loss,
        augment=windows.shift,
        extra_metrics={
            "corpus": str(corpus.source),
            "train_bytes": corpus.train.numel(),
            "val_bytes": corpus.val.numel(),
            "train_files": corpus.train_files,
            "val_files": corpus.val_files,
            "eval_bytes": test[1].numel(),
            "unigram_bpc": baseline,
            "train_tokens": config.epochs * config.epoch_steps * config.batch_size * config.context,
        },
        resume=resume,
    )
    metrics = result.metrics
    texts = sample(result.model, config) if config.samples else []
    metrics["samples"] = texts
    metrics["report"] = [
        f"validation: {metrics['test_bpc']:.3f} bits per character (unigram baseline {baseline:.3f}), "
        f"loss {metrics['test_loss']:.4f} nats per byte, perplexity {metrics['test_perplexity']:.2f}",
        *(line for i, text in enumerate(texts, 1) for line in (f"--- sample {i} ---", *text.splitlines())),
    ]
    if texts:
        separator = "\n\n" + "-" * 40 + "\n\n"
        atomic_write_bytes(Path(run_dir) / "samples.txt", (separator.join(texts) + "\n").encode("utf-8"))
    write_metrics(run_dir, metrics)
    return metrics
