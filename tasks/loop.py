"""The supervised loop every task shares: seed, train, evaluate, log, checkpoint, plot.

Data sets here are small, so they live in memory as tuples of tensors ``(*inputs, labels)`` with the
batch on dim 0; the loop shuffles indices itself instead of going through a DataLoader. A model takes
``*inputs`` and returns logits, either ``(B, C)`` (one label per example) or ``(B, T, C)`` (one label
per position, ``-100`` where a position carries no label). So one loss and one accuracy serve xor,
playground, digits, parity, copy/reverse and sentiment.

What a run leaves in ``run_dir``: ``config.json``, ``metrics.json`` (with a per-epoch ``history``),
TensorBoard events, ``checkpoints/final.safetensors`` + ``.json`` and ``learning_curve.png``; tasks
add their own plots.

Resume: at the end of an epoch the loop writes ``checkpoints/epoch_<n>`` (model, optimizer, schedule,
the shuffle and augmentation generators, the global RNG states, counters and history), atomically:
after every epoch, except that epochs shorter than ``CHECKPOINT_SECONDS`` share one checkpoint (XOR's
one-step epochs would otherwise spend most of their time in fsync), and always after the last one.
A run that was killed or interrupted continues with ``fit(..., resume=True)`` (``lab fit --resume
DIR``) from its newest good epoch checkpoint, and on the CPU ends with exactly the weights and
metrics of a run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from core.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from core.compute import resolve_device, seed_everything
from core.files import atomic_write_json, jsonable, remove_stale_temps
from core.plots import Panel, plot_history
from core.runs import write_run_config

Tensors = tuple[torch.Tensor, ...]
IGNORE_INDEX = -100  # label of positions that carry no target (padding, the prompt of copy/reverse)
EPOCH_PREFIX = "epoch_"  # checkpoints/epoch_000012.{safetensors,json}: the state after epoch 12
KEEP_EPOCH_CHECKPOINTS = 2  # the newest one, and one to fall back on should it be damaged
# An epoch checkpoint is written when the last one is at least this old: a crash loses at most this
# much training (plus the epoch in progress). 0: after every epoch.
CHECKPOINT_SECONDS = 5.0
RESUMABLE_CHANGES = ("epochs", "device")  # what a resumed run may change; the rest defines the run


class TaskError(ValueError):
    """Bad task input or unreachable data; the message is one line fit for the user."""


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for ``(B, C)`` logits with ``(B,)`` labels or ``(B, T, C)`` with ``(B, T)``."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensors, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on in-memory ``inputs``, in eval mode and in chunks (CPU tensor)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = inputs[0].shape[0]
    chunks = [
        model(*(x[i : i + batch_size].to(device) for x in inputs)).float().cpu()
        for i in range(0, n, batch_size)
    ]
    model.train(was_training)
    return torch.cat(chunks)


def accuracy_metrics(model: nn.Module, data: Tensors) -> dict[str, float]:
    """``accuracy`` (over labelled positions) and ``loss`` of ``model`` on ``data = (*inputs, labels)``.

    For per-position labels ``(B, T)`` it adds ``sequence_accuracy``: the share of examples whose
    every labelled position is right.
    """
    *inputs, labels = data
    logits = predict(model, tuple(inputs))
    labelled = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & labelled
    metrics = {
        "accuracy": correct.sum().item() / max(1, labelled.sum().item()),
        "loss": classification_loss(logits, labels).item(),
    }
    if labels.dim() == 2:
        # An example is right when no labelled position is wrong: (B, T) -> (B,).
        metrics["sequence_accuracy"] = (correct == labelled).all(dim=1).float().mean().item()
    return metrics


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` hands back to a task, besides the files it wrote."""

    model: nn.Module
    metrics: dict[str, Any]


def fit(
    *,
    task: str,
    config: Any,
    model: nn.Module,
    train: Tensors,
    test: Tensors,
    run_dir: Path,
    progress: bool = True,
    metric: str = "accuracy",
    evaluate: Callable[[nn.Module, Tensors], dict[str, float]] = accuracy_metrics,
    loss_fn: Callable[[nn.Module, Tensors], torch.Tensor] | None = None,
    augment: Callable[[Tensors, torch.Generator], Tensors] | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    extra_metrics: dict[str, Any] | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
    resume: bool = False,
) -> FitResult:
    """Trains ``model`` on ``train``, evaluates on ``test`` after every epoch and writes the run.

    The optimizer is AdamW; the learning rate warms up linearly over ``config.warmup`` (a fraction of
    all steps, 0 if the config has no such field) and then follows ``config.schedule`` (``cosine``
    decay to zero, or ``constant``). Gradients are clipped to norm ``config.grad_clip`` when set.

    Args:
        task: the task name, recorded in metrics and checkpoint.
        config: the task's config dataclass; needs ``net, epochs, seed, lr, batch_size, device`` and may
            have ``weight_decay, warmup, schedule, grad_clip``.
        model: maps ``*inputs`` to logits ``(B, C)`` or ``(B, T, C)``; it is moved to the device.
        train: ``(*inputs, labels)`` tensors of the training split, batch on dim 0.
        test: the held-out split, same layout.
        run_dir: the existing run directory to write into.
        progress: show a tqdm bar (on stderr, so ``--json`` output on stdout stays clean).
        metric: the key of ``evaluate``'s result reported as ``test_metric`` (``accuracy`` is also
            reported as ``test_accuracy``).
        evaluate: ``(model, split) -> {metric: value, ...}``; every key is logged as ``<key>/test``.
        loss_fn: ``(model, batch) -> scalar loss``; default cross-entropy on the model's logits.
        augment: ``(batch, generator) -> batch``, applied to training batches only.
        on_epoch_end: called as ``on_epoch_end(epoch, model)`` after each evaluation (for GIF frames).
        extra_metrics: more keys for metrics.json (data sizes, per-length results are added by tasks
            afterwards through the returned dict).
        checkpoint_meta: more JSON-able keys for the checkpoint sidecar (a vocabulary, class names).
        resume: continue from the newest epoch checkpoint in ``run_dir`` (the model's weights are
            replaced by the checkpoint's). ``config`` must match the run's except for
            ``RESUMABLE_CHANGES``; raising ``epochs`` trains longer (the learning-rate schedule is
            then stretched to the new total from where it stands).

    Returns:
        The trained model (in eval mode) and the metrics dict that was written to metrics.json.

    Raises:
        TaskError: ``resume`` without a loadable epoch checkpoint, or with a config that differs from
            the run's in more than ``RESUMABLE_CHANGES`` or asks for fewer epochs than were trained.
    """
    from torch.utils.tensorboard import SummaryWriter  # slow import, only when a task runs

    started = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        raise TaskError(f"device={config.device} cannot be used ({error}); use device=cpu or auto") from None
    model.to(device)
    loss_fn = loss_fn or (lambda m, batch: classification_loss(m(*batch[:-1]), batch[-1]))

    n_train = train[0].shape[0]
    batch_size = min(config.batch_size, n_train)
    steps_per_epoch = math.ceil(n_train / batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=getattr(config, "weight_decay", 0.0)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _lr_lambda(total_steps, getattr(config, "warmup", 0.0), getattr(config, "schedule", "constant")),
    )
    grad_clip = getattr(config, "grad_clip", 0.0)
    # Shuffling has its own generator so that augmentation or dropout draws never change the order.
    shuffle_generator = torch.Generator().manual_seed(config.seed)
    augment_generator = torch.Generator().manual_seed(config.seed + 1)

    meta = {
        "kind": "task",
        "task": task,
        "net": config.net,
        "config": jsonable(dataclasses.asdict(config)),
        **(checkpoint_meta or {}),
    }
    history: list[dict[str, float]] = []
    start_epoch = step = 0
    if resume:
        state = load_epoch_checkpoint(run_dir, task, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        shuffle_generator.set_state(state["shuffle_generator"])
        augment_generator.set_state(state["augment_generator"])
        set_rng_state(state["rng"])  # dropout and anything else drawing from the global generators
        start_epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])

    def save_epoch(epoch: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "shuffle_generator": shuffle_generator.get_state(),
            "augment_generator": augment_generator.get_state(),
            "rng": rng_state(),
            "epoch": epoch,
            "step": step,
            "history": history,
        }
        checkpoints = run_dir / "checkpoints"
        remove_stale_temps(checkpoints)  # a run has one writer: these were left by a killed process
        save_checkpoint(checkpoints / f"{EPOCH_PREFIX}{epoch:06d}", state, meta)
        prune_checkpoints(checkpoints, KEEP_EPOCH_CHECKPOINTS, prefix=EPOCH_PREFIX)

    write_run_config(run_dir, "task", task, config)
    # purge_step drops the events of epochs after the checkpoint, so a resumed curve does not fold back.
    writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch + 1 if start_epoch else None)
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"{task}/{config.net}",
        unit="step",
        disable=not progress,
        leave=False,
    )
    last_checkpoint = time.monotonic()
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            epoch_started = time.perf_counter()
            model.train()
            order = torch.randperm(n_train, generator=shuffle_generator)
            loss_sum = torch.zeros((), device=device)
            for start in range(0, n_train, batch_size):
                index = order[start : start + batch_size]
                batch = tuple(x[index] for x in train)
                if augment is not None:
                    batch = augment(batch, augment_generator)
                batch = tuple(x.to(device, non_blocking=True) for x in batch)
                loss = loss_fn(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                scheduler.step()
                # Summing on the device avoids a GPU->CPU sync per step; weighted by the batch's share.
                loss_sum += loss.detach() * index.numel()
                step += 1
                bar.update(1)
            train_loss = loss_sum.item() / n_train
            results = evaluate(model, test)
            row = {"epoch": epoch, "train_loss": train_loss, **{f"test_{k}": v for k, v in results.items()}}
            history.append(row)
            writer.add_scalar("loss/train", train_loss, epoch)
            for key, value in results.items():
                writer.add_scalar(f"{key}/test", value, epoch)
            writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], epoch)
            writer.add_scalar("charts/epoch_seconds", time.perf_counter() - epoch_started, epoch)
            bar.set_postfix(epoch=epoch, loss=f"{train_loss:.4f}", **{metric: f"{results[metric]:.4f}"})
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
            if epoch == config.epochs or time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS:
                # Events first: a kill after the checkpoint must not lose the curves of the epochs it holds.
                writer.flush()
                save_epoch(epoch)
                last_checkpoint = time.monotonic()
    finally:
        bar.close()
        writer.close()

    model.eval()
    final = history[-1]
    metrics: dict[str, Any] = {
        "task": task,
        "net": config.net,
        "epochs": config.epochs,
        "train_loss": final["train_loss"],
        "metric": metric,
        "test_metric": final[f"test_{metric}"],
    }
    if metric == "accuracy":
        metrics["test_accuracy"] = final["test_accuracy"]
    metrics.update({k: v for k, v in final.items() if k.startswith("test_") and k not in metrics})
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    metrics["run_dir"] = str(run_dir)
    metrics["device"] = str(device)
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    metrics["train_size"] = n_train
    metrics["test_size"] = int(test[0].shape[0])
    metrics.update(extra_metrics or {})
    metrics["history"] = history

    save_checkpoint(
        run_dir / "checkpoints" / "final",
        {"model": model.state_dict(), "epoch": config.epochs, "step": step},
        meta=meta,
    )
    plot_learning_curve(history, metric, run_dir / "learning_curve.png", title=f"{task} / {config.net}")
    write_metrics(run_dir, metrics)
    return FitResult(model=model, metrics=metrics)


def load_epoch_checkpoint(run_dir: Path, task: str, config: Any) -> dict[str, Any]:
    """The state of the newest good epoch checkpoint of ``run_dir``, checked against ``config``.

    Raises:
        TaskError: no loadable epoch checkpoint, another task, different settings, or fewer
            ``config.epochs`` than the checkpoint has trained.
    """
    sidecar = latest_checkpoint(Path(run_dir) / "checkpoints", prefix=EPOCH_PREFIX)
    if sidecar is None:
        raise TaskError(f"{run_dir} holds no epoch checkpoint to resume from")
    try:
        state, meta = load_checkpoint(sidecar)
    except CheckpointError as error:  # damaged between the two reads
        raise TaskError(str(error)) from None
    if meta.get("task") != task:
        raise TaskError(f"{sidecar} is a checkpoint of task {meta.get('task')!r}, not {task!r}")
    now = jsonable(dataclasses.asdict(config))
    saved = meta.get("config", {})
    changed = sorted(
        k for k in now.keys() | saved.keys() if k not in RESUMABLE_CHANGES and now.get(k) != saved.get(k)
    )
    if changed:
        was = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
        raise TaskError(
            f"{run_dir} was trained with {was}; a resumed run keeps its settings "
            f"(only {' and '.join(RESUMABLE_CHANGES)} may change)"
        )
    if int(state["epoch"]) > config.epochs:
        raise TaskError(
            f"{run_dir} has trained {state['epoch']} epochs already; epochs must be at least {state['epoch']}"
        )
    return state


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """(Re)writes ``run_dir/metrics.json`` atomically; tasks call it again after adding keys."""
    atomic_write_json(Path(run_dir) / "metrics.json", jsonable(metrics))


def _lr_lambda(total_steps: int, warmup: float, schedule: str) -> Callable[[int], float]:
    warmup_steps = int(warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def plot_learning_curve(history: list[dict[str, float]], metric: str, path: Path, title: str = "") -> Path:
    """Training loss (log scale when positive) and the test metric per epoch, on twin axes."""
    panel = Panel(
        ("train_loss",), "train loss", twin_key=f"test_{metric}", twin_label=f"test {metric}", log=True
    )
    return plot_history(history, "epoch", [panel], path, title=title, xlabel="epoch")
