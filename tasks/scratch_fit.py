"""The scratch engine under ``lab fit``: the fit loop of ``tasks.loop``, step for step, on numpy.

``lab fit xor|playground|digits --engine scratch`` trains the task's network with the autograd engine
of ``scratch/`` instead of torch. Everything except the engine is the torch run's:

- the network: the task builds its torch ``Classifier`` from the seed as usual, and the scratch model
  is its twin (``scratch.nn.MLP`` or ``scratch.nn.ConvNet``) holding a copy of its initial weights,
  moved over by the bridge ``scratch.nn.from_torch_state_dict``;
- the batches: the same shuffle generator, batch size and augmentation as ``tasks.loop.fit``;
- the optimiser: AdamW (``scratch.optim.AdamW`` follows torch's formulas) with the same warm-up and
  schedule of the learning rate.

So the two runs differ only in the engine and its precision (scratch computes in float64, torch in
float32). With ``compare`` (the default) the run also trains the torch engine, exactly as ``lab fit
TASK --engine torch`` would, into ``run_dir/torch``, and reports both accuracies side by side. At the
end the trained scratch weights are loaded into the torch net, which must give the same outputs
(``torch_outputs_match``); the task's own plots (decision boundary, confusion matrix) are drawn by
that torch net.

The run directory is a torch run's: ``config.json``, ``metrics.json``, TensorBoard events,
``learning_curve.png`` and ``checkpoints/epoch_<n>`` and ``final``. The checkpoints hold the weights
in the torch ``Classifier``'s state-dict layout (float64), so a torch module loads them as they are,
and the epoch checkpoints add AdamW's moments and the generators, so ``lab fit --resume`` continues
a scratch run as it does a torch one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import nets
from core.checkpoint import latest_checkpoint, prune_checkpoints, save_checkpoint
from core.files import jsonable, remove_stale_temps
from core.runs import tensorboard_writer, write_run_config
from scratch import nn as snn
from scratch import ops
from scratch.core import Variable, no_grad
from scratch.optim import AdamW
from tasks import distributed, loop
from tasks.loop import (
    CHECKPOINT_SECONDS,
    EPOCH_PREFIX,
    KEEP_EPOCH_CHECKPOINTS,
    FitResult,
    TaskError,
    Tensors,
    load_epoch_checkpoint,
    write_finished_run,
    write_metrics,
)
from tasks.models import Classifier

ENGINES = ("torch", "scratch")
SCRATCH_NETS = ("mlp", "nature")  # the task nets the scratch engine rebuilds layer for layer
SCRATCH_ACTIVATIONS = {torch.nn.Tanh: "tanh", torch.nn.ReLU: "relu"}
# Both engines compute the outputs in float64 for this check, so only the order of the additions
# differs; a wrong weight or layout gives differences of order 1.
OUTPUT_AGREEMENT = 1e-9
LAYOUT = "classifier"  # tasks.models.Classifier: encoder.* and head.linear

ScratchModel = snn.MLP | snn.ConvNet


def check_engine(task: str, engine: str, net: str) -> None:
    """Raises ValueError (one line, naming the nets the scratch engine has) unless ``engine`` runs ``net``."""
    if engine == "scratch" and net not in SCRATCH_NETS:
        raise ValueError(
            f"the scratch engine has no net {net!r} for task {task}; it builds: {', '.join(SCRATCH_NETS)}"
        )


# ---------------------------------------------------------------------------------------------
# The scratch twin of a torch Classifier
# ---------------------------------------------------------------------------------------------


def scratch_twin(model: Classifier) -> ScratchModel:
    """A scratch model with the architecture and the current weights of a task's torch ``Classifier``.

    Raises:
        TaskError: the encoder is neither a nets.MLP with tanh or ReLU nor a nets.NatureCNN with
            its ReLU Linear layer.
    """
    encoder, num_classes = model.encoder, model.head.out_dim
    if isinstance(encoder, nets.MLP):
        linears = [m for m in encoder.layers if isinstance(m, torch.nn.Linear)]
        activations = {type(m) for m in encoder.layers if not isinstance(m, torch.nn.Linear)}
        if not linears or len(activations) != 1 or next(iter(activations)) not in SCRATCH_ACTIVATIONS:
            raise TaskError(
                f"the scratch engine builds MLPs with {' or '.join(SCRATCH_ACTIVATIONS.values())}"
            )
        twin = snn.MLP(
            math.prod(encoder.in_shape),
            tuple(m.out_features for m in linears),
            num_classes,
            activation=SCRATCH_ACTIVATIONS[next(iter(activations))],
        )
    elif isinstance(encoder, nets.NatureCNN) and isinstance(encoder.fc, torch.nn.Sequential):
        convs = tuple(
            (m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0])
            for m in encoder.conv
            if isinstance(m, torch.nn.Conv2d)
        )
        twin = snn.ConvNet(encoder.in_shape, convs, encoder.out_dim, num_classes)
    else:
        raise TaskError(f"the scratch engine has no twin of {type(encoder).__name__}")
    return snn.from_torch_state_dict(twin, model.state_dict(), layout=LAYOUT)


def load_into_torch(twin: ScratchModel, model: torch.nn.Module) -> torch.nn.Module:
    """Copies the scratch weights into the torch ``model`` (cast to its dtype) and returns it."""
    model.load_state_dict(snn.to_torch_state_dict(twin, LAYOUT), strict=True)
    return model


def engine_input(twin: ScratchModel, x: torch.Tensor) -> np.ndarray:
    """A batch of torch inputs as the scratch engine takes them, float64, seen as the torch net sees them.

    nets' image encoders scale uint8 pixels to [0, 1]; nets.MLP casts integers to float unscaled.
    """
    array = x.numpy()
    if array.dtype == np.uint8 and isinstance(twin, snn.ConvNet):
        return array / 255.0
    return array.astype(np.float64)


def logits_of(twin: ScratchModel, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """``twin``'s logits on in-memory inputs ``(N, ...)``, in chunks and without a graph: (N, C)."""
    with no_grad():
        chunks = [twin(engine_input(twin, x[i : i + batch_size])).data for i in range(0, len(x), batch_size)]
    return np.concatenate(chunks)


def evaluate(twin: ScratchModel, data: Tensors) -> dict[str, float]:
    """``accuracy`` and ``loss`` (mean cross-entropy) on ``data = (inputs, labels)``, as the torch loop."""
    inputs, labels = data
    logits = logits_of(twin, inputs)
    labels_array = labels.numpy()
    with no_grad():
        loss = ops.cross_entropy(logits, labels_array).item()
    return {"accuracy": float(np.mean(logits.argmax(axis=1) == labels_array)), "loss": loss}


def output_difference(twin: ScratchModel, model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Largest |scratch - torch| logit on ``inputs``, the scratch weights in a float64 copy of ``model``."""
    twin_in_torch = load_into_torch(twin, copy.deepcopy(model).double().eval())
    x = engine_input(twin, inputs)
    with torch.no_grad():
        theirs = twin_in_torch(torch.from_numpy(x)).numpy()
    return float(np.abs(logits_of(twin, inputs) - theirs).max())


def one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """numpy's BLAS limited to one thread inside the ``with`` block.

    The engine's matrices are small: two BLAS threads gain little on them, and on a busy machine the
    threads spend most of each product waiting for each other.
    """
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def clip_grad_norm(params: list[snn.Parameter], max_norm: float) -> None:
    """Scales the gradients by max_norm / (norm + 1e-6) when their joint norm exceeds it, as torch does."""
    grads = [p.grad for p in params if p.grad is not None]
    total = math.sqrt(sum(float(np.sum(g.data * g.data)) for g in grads))
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.data = g.data * scale


# ---------------------------------------------------------------------------------------------
# The fit loop
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchReference:
    """The torch engine's run of the same task, seed and starting weights (``run_dir/torch``)."""

    test_accuracy: float
    test_loss: float
    train_loss: float
    seconds: float
    run_dir: str


def fit(
    *,
    task: str,
    config: Any,
    model: Classifier,
    train: Tensors,
    test: Tensors,
    run_dir: Path,
    progress: bool = True,
    augment: Callable[[Tensors, torch.Generator], Tensors] | None = None,
    on_epoch_end: Callable[[int, torch.nn.Module], None] | None = None,
    extra_metrics: dict[str, Any] | None = None,
    resume: bool = False,
) -> FitResult:
    """Trains the scratch twin of ``model`` as ``tasks.loop.fit`` trains ``model``, and writes the run.

    Args:
        task: the task name, recorded in metrics and checkpoints.
        config: the task's config; needs ``net, epochs, seed, lr, batch_size`` and may have
            ``weight_decay, warmup, schedule, grad_clip, compare``.
        model: the task's torch ``Classifier``, freshly built from the seed: the scratch model starts
            from its weights, and it holds the trained scratch weights when ``fit`` returns.
        train: ``(inputs, labels)`` tensors of the training split, batch on dim 0.
        test: the held-out split, same layout.
        run_dir: the run directory to write into.
        progress: show a tqdm bar (on stderr).
        augment: ``(batch, generator) -> batch`` on torch tensors, applied to training batches only.
        on_epoch_end: called as ``on_epoch_end(epoch, model)`` after each evaluation, with the torch
            ``model`` holding the scratch weights of that moment (for GIF frames).
        extra_metrics: more keys for metrics.json.
        resume: continue from the newest epoch checkpoint in ``run_dir`` (and the torch reference
            from its own, if it has one).

    Returns:
        The torch ``model`` holding the trained scratch weights (eval mode) and the metrics written to
        metrics.json: the torch loop's keys plus ``engine``, ``torch_outputs_match``,
        ``torch_output_difference``, and with ``compare`` ``torch_reference`` and ``accuracy_gap``.

    Raises:
        TaskError: a net the scratch engine does not build, inputs other than ``(inputs, labels)``,
            or a ``resume`` the loop's rules refuse (see ``tasks.loop.load_epoch_checkpoint``).
    """

    try:
        check_engine(task, "scratch", config.net)
    except ValueError as error:
        raise TaskError(str(error)) from None
    if len(train) != 2:
        raise TaskError(
            f"the scratch engine trains on (inputs, labels); task {task} gives {len(train)} tensors"
        )
    levers = loop.levers_of(config)
    changed = [f.name for f in dataclasses.fields(levers) if getattr(levers, f.name) != f.default]
    if changed or distributed.ranks().world > 1:
        what = ", ".join(changed) if changed else "--procs"
        raise TaskError(
            f"the scratch engine trains in one process without the fit loop's levers; drop {what}"
        )
    started = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    initial = copy.deepcopy(model)  # the torch reference starts from these weights too
    twin = scratch_twin(model)
    params = dict(twin.named_parameters())

    n_train = len(train[0])
    batch_size = min(config.batch_size, n_train)
    epoch_steps = getattr(config, "epoch_steps", 0)  # an epoch of that many batches, as in the torch loop
    batches = loop.epoch_batches(
        min(n_train, epoch_steps * batch_size) if epoch_steps else n_train, batch_size, 1
    )
    examples_per_epoch = sum(end - start for start, end in batches)
    total_steps = len(batches) * config.epochs
    optimizer = AdamW(twin.parameters(), lr=config.lr, weight_decay=getattr(config, "weight_decay", 0.0))
    lr_factor = loop._lr_lambda(
        total_steps, getattr(config, "warmup", 0.0), getattr(config, "schedule", "constant")
    )
    grad_clip = getattr(config, "grad_clip", 0.0)
    # The torch loop's generators, seeded the same way: the same batches in the same order.
    shuffle_generator = torch.Generator().manual_seed(config.seed)
    augment_generator = torch.Generator().manual_seed(config.seed + 1)

    meta = {
        "kind": "task",
        "task": task,
        "net": config.net,
        "engine": "scratch",
        "config": jsonable(dataclasses.asdict(config)),
    }
    history: list[dict[str, float]] = []
    start_epoch = step = 0
    if resume:
        state = load_epoch_checkpoint(run_dir, task, config)
        snn.from_torch_state_dict(twin, state["model"], layout=LAYOUT)
        for name, moments in state["optimizer"].items():
            optimizer.state[id(params[name])] = dict(moments)
        shuffle_generator.set_state(state["shuffle_generator"])
        augment_generator.set_state(state["augment_generator"])
        start_epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])

    def save_epoch(epoch: int) -> None:
        state = {
            "model": snn.to_torch_state_dict(twin, LAYOUT),
            # AdamW's step count and moments per parameter, under the scratch parameter names.
            "optimizer": {name: optimizer.state[id(p)] for name, p in params.items()},
            "shuffle_generator": shuffle_generator.get_state(),
            "augment_generator": augment_generator.get_state(),
            "epoch": epoch,
            "step": step,
            "history": history,
        }
        checkpoints = run_dir / "checkpoints"
        remove_stale_temps(checkpoints)
        save_checkpoint(checkpoints / f"{EPOCH_PREFIX}{epoch:06d}", state, meta)
        prune_checkpoints(checkpoints, KEEP_EPOCH_CHECKPOINTS, prefix=EPOCH_PREFIX)

    write_run_config(run_dir, "task", task, config)
    writer = tensorboard_writer(run_dir, purge_step=start_epoch + 1 if start_epoch else None)
    bar = tqdm(total=total_steps, initial=step, desc=f"{task}/{config.net} scratch", unit="step",
               disable=not progress, leave=False)  # fmt: skip
    last_checkpoint = time.monotonic()
    try:
        with one_blas_thread():
            for epoch in range(start_epoch + 1, config.epochs + 1):
                epoch_started = time.perf_counter()
                order = torch.randperm(n_train, generator=shuffle_generator)
                loss_sum = 0.0
                for start, end in batches:
                    index = order[start:end]
                    batch = tuple(x[index] for x in train)
                    if augment is not None:
                        batch = augment(batch, augment_generator)
                    inputs, labels = batch
                    optimizer.lr = config.lr * lr_factor(step)  # what torch's LambdaLR sets for this step
                    twin.zero_grad()
                    loss = ops.cross_entropy(twin(engine_input(twin, inputs)), labels.numpy())
                    loss.backward()
                    if grad_clip:
                        clip_grad_norm(twin.parameters(), grad_clip)
                    optimizer.step()
                    loss_sum += loss.item() * len(index)
                    step += 1
                    bar.update(1)
                train_loss = loss_sum / examples_per_epoch
                results = evaluate(twin, test)
                history.append(
                    {"epoch": epoch, "train_loss": train_loss, **{f"test_{k}": v for k, v in results.items()}}
                )
                writer.add_scalar("loss/train", train_loss, epoch)
                for key, value in results.items():
                    writer.add_scalar(f"{key}/test", value, epoch)
                writer.add_scalar("charts/learning_rate", config.lr * lr_factor(step), epoch)
                writer.add_scalar("charts/epoch_seconds", time.perf_counter() - epoch_started, epoch)
                bar.set_postfix(epoch=epoch, loss=f"{train_loss:.4f}", accuracy=f"{results['accuracy']:.4f}")
                if on_epoch_end is not None:
                    on_epoch_end(epoch, load_into_torch(twin, model))
                if epoch == config.epochs or time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS:
                    writer.flush()  # events first: a kill after the checkpoint keeps the curves it holds
                    save_epoch(epoch)
                    last_checkpoint = time.monotonic()
    finally:
        bar.close()
        writer.close()

    final = history[-1]
    with one_blas_thread():
        difference = output_difference(twin, model, test[0])
    metrics: dict[str, Any] = {
        "task": task,
        "net": config.net,
        "engine": "scratch",
        "epochs": config.epochs,
        "train_loss": final["train_loss"],
        "metric": "accuracy",
        "test_metric": final["test_accuracy"],
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "seconds": round(time.perf_counter() - started, 3),
        "run_dir": str(run_dir),
        "device": "cpu",  # numpy
        "parameters": sum(p.size for p in twin.parameters()),
        "train_size": n_train,
        "test_size": len(test[0]),
        "torch_outputs_match": difference <= OUTPUT_AGREEMENT,
        "torch_output_difference": difference,
        **(extra_metrics or {}),
    }
    same = "the same" if metrics["torch_outputs_match"] else "DIFFERENT"
    report = [
        f"scratch engine: test accuracy {final['test_accuracy']:.4f}, train loss {final['train_loss']:.4f}, "
        f"{metrics['seconds']:.1f} s",
        f"the trained scratch weights in the torch net give {same} outputs "
        f"(largest logit difference {difference:.1e})",
    ]
    if getattr(config, "compare", False):
        reference = train_torch_reference(
            task, config, initial, train, test, run_dir / "torch", progress, augment, extra_metrics, resume
        )
        metrics["torch_reference"] = dataclasses.asdict(reference)
        metrics["accuracy_gap"] = final["test_accuracy"] - reference.test_accuracy
        report.append(
            f"torch engine, same seed, batches and starting weights: test accuracy "
            f"{reference.test_accuracy:.4f}, train loss {reference.train_loss:.4f}, "
            f"{reference.seconds:.1f} s -> {reference.run_dir}"
        )
    metrics["report"] = report
    metrics["history"] = history

    write_finished_run(
        run_dir,
        {"model": snn.to_torch_state_dict(twin, LAYOUT), "epoch": config.epochs, "step": step},
        meta,
        metrics,
        title=f"{task} / {config.net}, scratch engine",
    )
    return FitResult(model=load_into_torch(twin, model).eval(), metrics=metrics)


def train_torch_reference(
    task: str,
    config: Any,
    model: Classifier,
    train: Tensors,
    test: Tensors,
    run_dir: Path,
    progress: bool,
    augment: Callable[[Tensors, torch.Generator], Tensors] | None,
    extra_metrics: dict[str, Any] | None,
    resume: bool,
) -> TorchReference:
    """Trains ``model`` with ``tasks.loop.fit`` as ``lab fit TASK --engine torch`` would, into ``run_dir``.

    A resumed scratch run resumes its reference too when the reference has an epoch checkpoint, and
    otherwise trains it anew.
    """
    has_checkpoint = latest_checkpoint(run_dir / "checkpoints", prefix=EPOCH_PREFIX) is not None
    result = loop.fit(
        task=task,
        config=dataclasses.replace(config, engine="torch"),
        model=model,
        train=train,
        test=test,
        run_dir=run_dir,
        progress=progress,
        augment=augment,
        extra_metrics=extra_metrics,
        resume=resume and has_checkpoint,
    )
    m = result.metrics
    return TorchReference(m["test_accuracy"], m["test_loss"], m["train_loss"], m["seconds"], str(run_dir))


# ---------------------------------------------------------------------------------------------
# The slide's hand-built XOR network, on both engines
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideTable:
    """The truth table of ``scratch.nn.xor_slide_network`` on both engines (one entry per input row)."""

    inputs: list[list[float]]
    scratch: list[float]
    torch: list[float]
    xor: list[int]

    @property
    def correct(self) -> bool:
        """Both engines output exactly the XOR of every row."""
        return self.scratch == self.torch == [float(v) for v in self.xor]


def slide_table() -> SlideTable:
    """Runs the slide's XOR network in the scratch engine and, with the same weights, in nets.MLP."""
    inputs = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    model = snn.xor_slide_network()
    torch_net = nets.MLP(2, (2,), out_dim=1, activation="relu").double()
    torch_net.load_state_dict(snn.to_torch_state_dict(model, layout="mlp"), strict=True)
    with torch.no_grad():
        theirs = torch_net(torch.from_numpy(inputs))[:, 0].tolist()
    with no_grad():
        ours = model(inputs).data[:, 0].tolist()
    return SlideTable(inputs.tolist(), ours, theirs, [0, 1, 1, 0])


def with_slide_network(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Adds the slide network's truth table to ``metrics`` (key ``slide_network`` and report lines),
    draws its computational graph into ``run_dir/slide_graph.png`` and rewrites metrics.json."""
    from scratch.graph import draw_graph

    table = slide_table()
    x = Variable(np.array(table.inputs), name="x")
    y = snn.xor_slide_network()(x)
    y.name = "y"
    draw_graph(y, Path(run_dir) / "slide_graph.png")
    lines = [
        "the slide's XOR network, y = relu(x W + b) W': W = [[1, 1], [1, 1]], b = [0, -1], W' = [1, -2]",
        "  x1 x2 | scratch  torch | xor",
    ]
    for (x1, x2), ours, theirs, want in zip(table.inputs, table.scratch, table.torch, table.xor, strict=True):
        lines.append(f"  {x1:2.0f} {x2:2.0f} | {ours:7.1f} {theirs:6.1f} | {want:3d}")
    metrics = {**metrics, "slide_network": {**dataclasses.asdict(table), "correct": table.correct}}
    metrics["report"] = lines + list(metrics.get("report", []))
    write_metrics(run_dir, metrics)
    return metrics
