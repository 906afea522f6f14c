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

Levers: a task config that inherits :class:`Levers` has them as fields, and with their defaults the
loop is the plain fp32 one, step for step. ``precision`` (bf16 or fp16 autocast, a gradient scaler
for fp16), ``checkpointing`` (activation checkpointing per Transformer block), ``accumulate`` (each
batch as K micro-batches), ``compile`` (torch.compile), and across processes (``lab fit --procs N``,
:mod:`tasks.distributed`) data parallelism with DDP or, with ``shard``, FSDP2. ``batch_size`` is
always the examples of one optimizer step, summed over processes and micro-batches: a lever changes
how a step is computed, not which step it is. A config may also bound an epoch with ``epoch_steps``
(an epoch is then a random sample of that many batches, for data sets too large for one pass).
"""

from __future__ import annotations

import contextlib
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
from core.compute import native_bf16, resolve_device, seed_everything
from core.config import option
from core.files import atomic_write_json, jsonable, remove_stale_temps, signals_deferred
from core.plots import Panel, plot_history
from core.runs import tensorboard_writer, write_run_config
from tasks import distributed

Tensors = tuple[torch.Tensor, ...]
IGNORE_INDEX = -100  # label of positions that carry no target (padding, the prompt of copy/reverse)
EPOCH_PREFIX = "epoch_"  # checkpoints/epoch_000012.{safetensors,json}: the state after epoch 12
KEEP_EPOCH_CHECKPOINTS = 2  # the newest one, and one to fall back on should it be damaged
# An epoch checkpoint is written when the last one is at least this old: a crash loses at most this
# much training (plus the epoch in progress). 0: after every epoch.
CHECKPOINT_SECONDS = 5.0
RESUMABLE_CHANGES = ("epochs", "device")  # what a resumed run may change; the rest defines the run
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TaskError(ValueError):
    """Bad task input or unreachable data; the message is one line fit for the user."""


@dataclasses.dataclass
class Levers:
    """The memory and speed levers of the fit loop, as config fields a task config inherits."""

    precision: str = option(
        "fp32",
        "fp32, or bf16/fp16 autocast of the forward pass (fp16 with a gradient scaler); weights stay fp32",
        choices=PRECISIONS,
    )
    checkpointing: bool = option(
        False, "activation checkpointing: recompute each Transformer block in backward instead of storing it"
    )
    accumulate: int = option(
        1, "gradient accumulation: each batch as this many micro-batches, one backward each", min=1, max=4096
    )
    compile: bool = option(False, "torch.compile the model (the first steps compile it)")
    shard: bool = option(
        False, "with --procs N: shard parameters, gradients and optimizer state across processes (FSDP2)"
    )


def levers_of(config: Any) -> Levers:
    """The levers of ``config``; a config without a lever field gets its default (off)."""
    return Levers(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(Levers) if hasattr(config, f.name)}
    )


def native_fp16(device: torch.device) -> bool:
    """Whether ``device`` computes fp16 natively: CUDA, or a CPU with AVX512-FP16/AMX-FP16."""
    return device.type == "cuda" or (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    )


def check_levers(levers: Levers, procs: int, device: torch.device) -> None:
    """Refuses levers that cannot run here, before anything starts.

    Args:
        levers: the config's levers.
        procs: the number of processes of the run.
        device: where it trains.

    Raises:
        TaskError: ``shard`` with one process, or a precision the device does not compute natively.
    """
    if levers.shard and procs < 2:
        raise TaskError("shard=true splits the model across processes; run with --procs 2 or more")
    if levers.precision == "fp32":
        return
    if device.type == "cuda" and levers.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TaskError("precision=bf16: this GPU has no bf16; use precision=fp16 or fp32")
    native = native_bf16(device) if levers.precision == "bf16" else native_fp16(device)
    if device.type == "cpu" and not native:
        others = [p for p in PRECISIONS if p == "fp32" or (p == "bf16" and native_bf16(device))]
        raise TaskError(
            f"precision={levers.precision}: this CPU does not compute {levers.precision} natively "
            f"(it needs AVX512-{levers.precision.upper()} or AMX); use precision={' or '.join(others)}"
        )


def enable_checkpointing(model: nn.Module, net: str) -> None:
    """Turns on activation checkpointing in every Transformer of ``model``.

    Raises:
        TaskError: ``model`` has no Transformer blocks to recompute.
    """
    switches = [m for m in model.modules() if hasattr(m, "checkpoint_blocks")]
    if not switches:
        raise TaskError(
            f"checkpointing=true recomputes Transformer blocks and net {net!r} has none; "
            "use a Transformer net or checkpointing=false"
        )
    for module in switches:
        module.checkpoint_blocks = True


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


def epoch_batches(examples: int, batch_size: int, pieces: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each batch of an epoch over ``examples`` shuffled examples.

    A last batch too small to give every process and micro-batch an example (fewer than ``pieces``)
    is left out; its examples are in another epoch's shuffle. With one piece no batch is left out.
    """
    spans = [(start, min(start + batch_size, examples)) for start in range(0, examples, batch_size)]
    return [(start, end) for start, end in spans if end - start >= pieces]


class Stepper:
    """One optimizer step on a global batch, under the levers, computed by this process's share.

    It owns what a step goes through: ``model`` itself (sharded in place with ``shard``), DDP around
    it across processes, ``torch.compile`` around that (``module``), the AdamW optimizer, the
    learning-rate schedule, the fp16 gradient scaler and the autocast context. :func:`fit` drives it;
    ``benchmarks/fit_levers.py`` times it.

    Args:
        model: the model, already on ``device``.
        config: the task config (``lr``, and optionally ``weight_decay, warmup, schedule, grad_clip``).
        levers: the levers (checked by :func:`check_levers`).
        where: this process's ranks.
        device: where it computes.
        loss_fn: ``(module, batch) -> mean loss`` over the batch's examples.
        total_steps: steps of the whole run, for the schedule.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Any,
        levers: Levers,
        where: distributed.Ranks,
        device: torch.device,
        loss_fn: Callable[[nn.Module, Tensors], torch.Tensor],
        total_steps: int,
    ) -> None:
        self.levers, self.where, self.device, self.loss_fn = levers, where, device, loss_fn
        self.pieces = where.world * levers.accumulate  # a batch goes to this many forward passes
        self.sharded = levers.shard
        # An unsharded twin, weightless until it receives the trained weights at the end.
        self.plain = distributed.meta_twin(model) if self.sharded else None
        self.model = distributed.shard(model) if self.sharded else model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=getattr(config, "weight_decay", 0.0)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            _lr_lambda(total_steps, getattr(config, "warmup", 0.0), getattr(config, "schedule", "constant")),
        )
        self.scaler = torch.amp.GradScaler(device.type) if levers.precision == "fp16" else None
        self.grad_clip = getattr(config, "grad_clip", 0.0)
        self.wrapped = (
            distributed.data_parallel(self.model, device) if where.world > 1 and not self.sharded else None
        )
        self.module: nn.Module = self.wrapped or self.model
        if levers.compile:
            self.module = torch.compile(self.module)
        self.autocast = (
            torch.autocast(device.type, dtype=AUTOCAST_DTYPES[levers.precision])
            if levers.precision in AUTOCAST_DTYPES
            else contextlib.nullcontext()
        )

    def step(self, batch: Tensors) -> torch.Tensor:
        """One optimizer step on the global ``batch``; returns this rank's summed loss (mean x examples)."""
        n = batch[0].shape[0]
        accumulate, world = self.levers.accumulate, self.where.world
        loss_sum = torch.zeros((), device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        # The batch is cut into `pieces` near-equal consecutive pieces; this rank takes `accumulate` of
        # them in a row. Each piece's mean loss is weighted by its share of the batch (times the world
        # size, which the gradient averaging divides out): the step's gradient is the batch mean's.
        for k in range(accumulate):
            index = self.where.rank * accumulate + k
            lo, hi = index * n // self.pieces, (index + 1) * n // self.pieces
            piece = batch if self.pieces == 1 else tuple(x[lo:hi] for x in batch)
            piece = tuple(x.to(self.device, non_blocking=True) for x in piece)
            sync = distributed.gradient_sync(
                self.wrapped, self.model if self.sharded else None, enabled=k == accumulate - 1
            )
            with sync, self.autocast:
                loss = self.loss_fn(self.module, piece)
            weighted = loss if self.pieces == 1 else loss * (world * (hi - lo) / n)
            (weighted if self.scaler is None else self.scaler.scale(weighted)).backward()
            # Summing on the device avoids a GPU->CPU sync per step; weighted by the piece's size.
            loss_sum += loss.detach() * (hi - lo)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return loss_sum

    def full_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Full model and optimizer state dicts, on rank 0 (collective when sharded; the others get {})."""
        return distributed.full_state(self.model, self.optimizer, self.sharded)

    def load_state(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        """Loads full state dicts (each rank keeps its shard when sharded)."""
        distributed.load_full_state(self.model, self.optimizer, model_state, optimizer_state, self.sharded)

    def trained_model(self) -> nn.Module | None:
        """The model with its trained weights, unsharded, on the device; collective when sharded, and
        then only rank 0 gets it (the others None)."""
        if self.plain is None:
            return self.model
        weights, _ = self.full_state()
        if not self.where.main:
            return None
        self.plain.load_state_dict(weights, assign=True)
        return self.plain.to(self.device)


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

    In a data-parallel run (launched by ``lab fit --procs N`` or ``torchrun``) every rank calls
    ``fit`` with the same data; each computes its share of every batch, all of them evaluate, and
    only rank 0 writes. When training is over, ranks other than 0 leave their process (status 0), so
    that what a task does after ``fit`` (its plots, samples and metrics) happens once.

    Args:
        task: the task name, recorded in metrics and checkpoint.
        config: the task's config dataclass; needs ``net, epochs, seed, lr, batch_size, device`` and may
            have ``weight_decay, warmup, schedule, grad_clip, epoch_steps`` and the :class:`Levers`.
        model: maps ``*inputs`` to logits ``(B, C)`` or ``(B, T, C)``; it is moved to the device.
        train: ``(*inputs, labels)`` tensors of the training split, batch on dim 0.
        test: the held-out split, same layout.
        run_dir: the existing run directory to write into.
        progress: show a tqdm bar (on stderr, so ``--json`` output on stdout stays clean).
        metric: the key of ``evaluate``'s result reported as ``test_metric`` (``accuracy`` is also
            reported as ``test_accuracy``).
        evaluate: ``(model, split) -> {metric: value, ...}``; every key is logged as ``<key>/test``.
        loss_fn: ``(model, batch) -> scalar loss``, the mean over the batch's examples; default
            cross-entropy on the model's logits.
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
            the run's in more than ``RESUMABLE_CHANGES`` or asks for fewer epochs than were trained;
            a lever that cannot run here (:func:`check_levers`).
        distributed.RankStopped: another rank of a data-parallel run went away.
    """

    started = time.perf_counter()
    run_dir = Path(run_dir)
    where = distributed.ranks()
    if where.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed + where.rank)  # rank 0 draws as a single process does
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        raise TaskError(f"device={config.device} cannot be used ({error}); use device=cpu or auto") from None
    levers = levers_of(config)
    check_levers(levers, where.world, device)
    if where.world > 1:
        device = distributed.start(device, where)
    model.to(device)
    if levers.checkpointing:
        enable_checkpointing(model, config.net)
    loss_fn = loss_fn or (lambda m, batch: classification_loss(m(*batch[:-1]), batch[-1]))

    n_train = train[0].shape[0]
    batch_size = min(config.batch_size, n_train)
    pieces = where.world * levers.accumulate  # examples of a batch go to this many forward passes
    if batch_size < pieces:
        raise TaskError(
            f"batch_size={batch_size} cannot give {levers.accumulate} micro-batches to each of "
            f"{where.world} processes; raise batch_size or lower accumulate"
        )
    epoch_steps = getattr(config, "epoch_steps", 0)
    epoch_examples = min(n_train, epoch_steps * batch_size) if epoch_steps else n_train
    batches = epoch_batches(epoch_examples, batch_size, pieces)
    steps_per_epoch = len(batches)
    examples_per_epoch = sum(end - start for start, end in batches)
    total_steps = steps_per_epoch * config.epochs

    stepper = Stepper(model, config, levers, where, device, loss_fn, total_steps)
    scheduler, scaler = stepper.scheduler, stepper.scaler
    # Shuffling has its own generator so that augmentation or dropout draws never change the order.
    # Every rank holds the same two generators: they draw the same global batches.
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
        stepper.load_state(state["model"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        shuffle_generator.set_state(state["shuffle_generator"])
        augment_generator.set_state(state["augment_generator"])
        # Dropout and anything else drawing from the global generators; each rank has its own.
        rank_rngs = [state["rng"], *state.get("rank_rngs", [])]
        if where.rank < len(rank_rngs):
            set_rng_state(rank_rngs[where.rank])
        start_epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        distributed.barrier()  # nobody writes a checkpoint before every rank has read one

    def save_epoch(epoch: int) -> None:
        """Collective across processes; rank 0 writes."""
        model_state, optimizer_state = stepper.full_state()
        rngs = distributed.gather_objects(rng_state()) if where.world > 1 else [rng_state()]
        if not where.main:
            return
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "shuffle_generator": shuffle_generator.get_state(),
            "augment_generator": augment_generator.get_state(),
            "rng": rngs[0],
            "epoch": epoch,
            "step": step,
            "history": history,
        }
        if len(rngs) > 1:
            state["rank_rngs"] = rngs[1:]
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        checkpoints = run_dir / "checkpoints"
        remove_stale_temps(checkpoints)  # a run has one writer: these were left by a killed process
        save_checkpoint(checkpoints / f"{EPOCH_PREFIX}{epoch:06d}", state, meta)
        prune_checkpoints(checkpoints, KEEP_EPOCH_CHECKPOINTS, prefix=EPOCH_PREFIX)

    if where.main:
        write_run_config(run_dir, "task", task, config)
    writer = (
        tensorboard_writer(run_dir, purge_step=start_epoch + 1 if start_epoch else None)
        if where.main
        else None
    )
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"{task}/{config.net}",
        unit="step",
        disable=not progress or not where.main,
        leave=False,
    )
    last_checkpoint = time.monotonic()
    # Across processes a Ctrl-C or SIGTERM is a request the ranks agree on at a step boundary.
    stops = distributed.stop_requests() if where.world > 1 else contextlib.nullcontext()
    together = False  # every rank reached this end with the others: a finish, or a stop they agreed on
    try:
        with stops as stop:
            for epoch in range(start_epoch + 1, config.epochs + 1):
                epoch_started = time.perf_counter()
                stepper.module.train()
                order = torch.randperm(n_train, generator=shuffle_generator)
                loss_sum = torch.zeros((), device=device)
                for start, end in batches:
                    index = order[start:end]
                    batch = tuple(x[index] for x in train)
                    if augment is not None:
                        batch = augment(batch, augment_generator)
                    loss_sum += stepper.step(batch)
                    step += 1
                    bar.update(1)
                    if stop is not None and distributed.any_rank(stop.requested):
                        together = True
                        raise KeyboardInterrupt
                if where.world > 1:
                    loss_sum = distributed.sum_over_ranks(loss_sum)
                train_loss = loss_sum.item() / examples_per_epoch
                results = evaluate(model, test)
                row = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    **{f"test_{k}": v for k, v in results.items()},
                }
                history.append(row)
                if writer is not None:
                    writer.add_scalar("loss/train", train_loss, epoch)
                    for key, value in results.items():
                        writer.add_scalar(f"{key}/test", value, epoch)
                    writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], epoch)
                    writer.add_scalar("charts/epoch_seconds", time.perf_counter() - epoch_started, epoch)
                bar.set_postfix(epoch=epoch, loss=f"{train_loss:.4f}", **{metric: f"{results[metric]:.4f}"})
                if on_epoch_end is not None:
                    on_epoch_end(epoch, model)
                due = epoch == config.epochs or time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS
                if where.world > 1:
                    due = distributed.from_rank0(due)  # the ranks save together
                if due:
                    # Events first: a kill after the checkpoint must not lose the curves of the epochs it holds.
                    if writer is not None:
                        writer.flush()
                    save_epoch(epoch)
                    last_checkpoint = time.monotonic()
            model = stepper.trained_model()
            together = True
    except RuntimeError as error:
        if where.world > 1 and distributed.is_collective_failure(error):
            raise distributed.RankStopped(
                f"rank {where.rank} lost the other ranks of this {where.world}-process run "
                f"({distributed.failure_in_words(error)}); it stops too"
            ) from error
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if where.world > 1:
            distributed.close(together)
    if not where.main:
        raise SystemExit(0)  # what a task does after fit (plots, samples, metrics) is rank 0's

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
    if where.world > 1:
        metrics["procs"] = where.world
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    metrics["train_size"] = n_train
    metrics["test_size"] = int(test[0].shape[0])
    metrics.update(extra_metrics or {})
    metrics["history"] = history

    write_finished_run(
        run_dir,
        {"model": model.state_dict(), "epoch": config.epochs, "step": step},
        meta,
        metrics,
        title=f"{task} / {config.net}",
    )
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
    # A field added to the task since the run was saved had its default then: fill it in, so that
    # runs written by an older lab resume.
    defaults = jsonable(dataclasses.asdict(type(config)()))
    saved = {
        **{k: v for k, v in defaults.items() if k not in meta.get("config", {})},
        **meta.get("config", {}),
    }
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


def write_finished_run(
    run_dir: Path, state: dict[str, Any], meta: dict[str, Any], metrics: dict[str, Any], title: str
) -> None:
    """The files of a finished fit: the final checkpoint, ``learning_curve.png`` and ``metrics.json``.

    A Ctrl-C or SIGTERM meanwhile (after the last epoch) waits until all three are written: raised
    inside matplotlib's first import it would surface as an ImportError rather than as a stop.
    """
    with signals_deferred():
        save_checkpoint(Path(run_dir) / "checkpoints" / "final", state, meta=meta)
        plot_learning_curve(
            metrics["history"], metrics["metric"], Path(run_dir) / "learning_curve.png", title
        )
        write_metrics(run_dir, metrics)


def plot_learning_curve(history: list[dict[str, float]], metric: str, path: Path, title: str = "") -> Path:
    """Training loss (log scale when positive) and the test metric per epoch, on twin axes."""
    panel = Panel(
        ("train_loss",), "train loss", twin_key=f"test_{metric}", twin_label=f"test {metric}", log=True
    )
    return plot_history(history, "epoch", [panel], path, title=title, xlabel="epoch")
