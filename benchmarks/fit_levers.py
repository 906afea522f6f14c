"""The memory and speed levers of the fit loop, measured on the GPT of ``lab fit lm``: tokens per second
and memory of each lever against the plain fp32 step, same model and same batch.

    python -m benchmarks.fit_levers [--sizes small,large] [--levers fp32,bf16,...] [--json PATH]
    (or: lab bench fit)

Each (size, lever) runs in its own child process, one after another, so that its peak resident memory
is its own; the data-parallel levers run two processes through torchrun's launcher
(``tasks.distributed.launch``). Every process computes with ``--threads`` CPU threads (default 1: on a
busy 2-core machine two OpenMP threads spin-wait for each other and a step gets several times slower),
so the two-process rows use twice the cores of the others. A child builds the model with seed 0 and one fixed batch of
random byte windows, and steps it with the loop's own ``tasks.loop.Stepper`` (the code ``lab fit``
runs): ``--warmup`` steps (compile compiles in them), then ``--steps`` timed steps.

What each number means:

* **tokens/s**: tokens of the global batch (batch x context) over the median step time (wall clock).
* **tokens/CPU-s**: the same tokens over the median CPU time of a step (``time.process_time``; the
  largest rank's): the rate with every process on a core of its own. On a shared machine the wall
  clock says more about the neighbours than about the lever, so the ratios use this one.
* **saved for backward**: bytes of the distinct tensor storages that the forward pass hands to
  autograd (torch's saved-tensor hooks), parameters excluded: the activation memory a step holds
  between forward and backward. Per process for the data-parallel rows; the largest micro-batch
  for accumulation. Not measured under compile (its graphs save their tensors past the hooks).
* **peak RSS**: the largest resident set of the child (the largest rank's), everything included:
  torch itself, weights, optimizer state, activations, compiled code.
* on CUDA, **max allocated**: ``torch.cuda.max_memory_allocated`` over the timed steps.

The sizes: ``small`` is the ``lab fit lm`` default (width 128, 4 layers, context 128, batch 32);
``large`` is 8 layers of width 512 with context 512 (batch 4), where activations outweigh the weights
and checkpointing matters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.compute import resolve_device
from core.files import atomic_write_json
from tasks import distributed
from tasks.lm import LMConfig, TrainingWindows, build_model
from tasks.loop import Levers, Stepper, TaskError, Tensors, check_levers, enable_checkpointing


@dataclasses.dataclass(frozen=True)
class Size:
    """A model and batch to measure."""

    width: int
    layers: int
    heads: int
    context: int
    batch_size: int


SIZES = {
    "small": Size(width=128, layers=4, heads=4, context=128, batch_size=32),
    "large": Size(width=512, layers=8, heads=8, context=512, batch_size=4),
}


@dataclasses.dataclass(frozen=True)
class Lever:
    """A row of the table: config fields of :class:`tasks.loop.Levers` and a number of processes."""

    fields: dict[str, Any]
    procs: int = 1


LEVERS = {
    "fp32": Lever({}),
    "bf16": Lever({"precision": "bf16"}),
    "fp16": Lever({"precision": "fp16"}),
    "checkpointing": Lever({"checkpointing": True}),
    "accumulate2": Lever({"accumulate": 2}),
    "compile": Lever({"compile": True}),
    "ddp2": Lever({}, procs=2),
    "fsdp2": Lever({"shard": True}, procs=2),
    "bf16+checkpointing": Lever({"precision": "bf16", "checkpointing": True}),
}


# ---------------------------------------------------------------------------------------------
# Memory held for backward
# ---------------------------------------------------------------------------------------------


class SavedBytes:
    """Counts the bytes autograd keeps for backward in each forward pass run through :meth:`wrap`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.per_forward: list[int] = []

    def wrap(self, loss_fn: Callable[[nn.Module, Tensors], torch.Tensor]) -> Callable:
        """``loss_fn`` whose forward pass is counted (``(module, batch) -> loss``, as the loop calls it)."""

        def counted(module: nn.Module, batch: Tensors) -> torch.Tensor:
            storages: dict[int, int] = {}

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                storage = tensor.untyped_storage()
                # Parameters (FSDP2's gathered ones included: they are the registered ones during
                # forward) are memory the model holds anyway, not activations.
                if storage.data_ptr() not in self._parameter_storages():
                    storages[storage.data_ptr()] = storage.nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = loss_fn(module, batch)
            self.per_forward.append(sum(storages.values()))
            return loss

        return counted

    def _parameter_storages(self) -> set[int]:
        return {p.untyped_storage().data_ptr() for p in self.model.parameters() if not hasattr(p, "to_local")}


# ---------------------------------------------------------------------------------------------
# A child: one (size, lever), in this process (one rank of it)
# ---------------------------------------------------------------------------------------------


def measure(
    size: Size, lever: Lever, steps: int, warmup: int, device_name: str, threads: int
) -> dict[str, Any]:
    """Times ``steps`` steps of ``size`` under ``lever`` in this process; returns this rank's numbers."""
    where = distributed.ranks()
    torch.set_num_threads(threads)
    device = resolve_device(device_name)
    if where.world > 1:
        device = distributed.start(device, where)
    config = LMConfig(
        width=size.width,
        layers=size.layers,
        heads=size.heads,
        context=size.context,
        batch_size=size.batch_size,
        device=device_name,
        **lever.fields,
    )
    levers = Levers(**{f.name: getattr(config, f.name) for f in dataclasses.fields(Levers)})
    torch.manual_seed(0)
    model = build_model(config).to(device)
    if levers.checkpointing:
        enable_checkpointing(model, config.net)
    data = torch.Generator().manual_seed(1)
    stream = torch.randint(
        0, 256, (4 * size.batch_size * (size.context + 1),), generator=data, dtype=torch.uint8
    )
    windows = TrainingWindows(stream, size.context)
    batch = (windows.starts[: size.batch_size],)
    counter = SavedBytes(model)
    loss_fn = windows.loss if levers.compile else counter.wrap(windows.loss)
    stepper = Stepper(model, config, levers, where, device, loss_fn, total_steps=warmup + steps)
    rss_before = max_rss_mb()
    for _ in range(warmup):
        stepper.step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    seconds, cpu_seconds = [], []
    for _ in range(steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = stepper.step(batch)
        loss.item()  # waits for the device
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    result = {
        "rank": where.rank,
        "procs": where.world,
        "threads": threads,
        "step_seconds": seconds,
        "step_cpu_seconds": cpu_seconds,
        "tokens_per_second": size.batch_size * size.context / statistics.median(seconds),
        "tokens_per_cpu_second": size.batch_size * size.context / statistics.median(cpu_seconds),
        "saved_mb": max(counter.per_forward) / 2**20 if counter.per_forward else None,
        "peak_rss_mb": max_rss_mb(),
        "rss_before_steps_mb": rss_before,
        "local_parameters": distributed.local_parameter_count(stepper.model),
        "parameters": sum(p.numel() for p in stepper.model.parameters()),  # a DTensor counts in full
    }
    if device.type == "cuda":
        result["max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if where.world > 1:
        distributed.close(together=True)  # every rank measured: a clean end
    return result


def max_rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# The parent: every (size, lever) in a child, then the table
# ---------------------------------------------------------------------------------------------


def run_child(size: str, lever: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs one (size, lever) in fresh processes; returns its row (``error`` set if it could not run)."""
    spec = LEVERS[lever]
    try:
        check_levers(Levers(**spec.fields), spec.procs, resolve_device(args.device))
    except (TaskError, ValueError) as error:
        return {"size": size, "lever": lever, "error": str(error)}
    with tempfile.TemporaryDirectory(prefix="fit-levers-") as folder:
        child_args = [
            "--child",
            json.dumps({"size": dataclasses.asdict(SIZES[size]), "lever": lever, "out": folder}),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup + (args.compile_warmup if LEVERS[lever].fields.get("compile") else 0)),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        if spec.procs > 1:
            outcome = distributed.launch(child_args, spec.procs, module="benchmarks.fit_levers")
            failed = outcome.status != 0
        else:
            failed = (
                subprocess.run([sys.executable, "-m", "benchmarks.fit_levers", *child_args]).returncode != 0
            )
        ranks = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("rank*.json"))]
    if failed or len(ranks) != spec.procs:
        return {"size": size, "lever": lever, "error": "the child failed (its output is above)"}
    main = ranks[0]
    return {
        "size": size,
        "lever": lever,
        **main,
        "saved_mb": None if main["saved_mb"] is None else max(r["saved_mb"] for r in ranks),
        "tokens_per_cpu_second": min(r["tokens_per_cpu_second"] for r in ranks),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "local_parameters": [r["local_parameters"] for r in ranks],
    }


def run(sizes: list[str], levers: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Measures every (size, lever); returns the settings, the rows and the machine."""
    rows = []
    for size in sizes:
        for lever in levers:
            print(f"[fit_levers] {size} / {lever} ...", file=sys.stderr, flush=True)
            rows.append(run_child(size, lever, args))
    return {
        "settings": {
            "sizes": {name: dataclasses.asdict(SIZES[name]) for name in sizes},
            "steps": args.steps,
            "warmup": args.warmup,
            "compile_warmup": args.compile_warmup,
            "threads": args.threads,
            "device": args.device,
        },
        "machine": {
            "torch": torch.__version__,
            "cpus": distributed.available_cpus(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": os.getloadavg(),
        },
        "rows": rows,
    }


def table(result: dict[str, Any]) -> list[str]:
    """The markdown table: every lever against the fp32 row of its size."""
    cuda = any("max_allocated_mb" in row for row in result["rows"])
    lines = [
        "| size | lever | procs | tokens/s | tokens/CPU-s | vs fp32 | saved for backward (MB) | vs fp32 "
        "| peak RSS (MB) |" + (" max allocated (MB) |" if cuda else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    base = {row["size"]: row for row in result["rows"] if row["lever"] == "fp32" and "error" not in row}
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['size']} | {row['lever']} | | n/a: {row['error']} | | | | | |")
            continue
        ref = base.get(row["size"])
        speed = f"{row['tokens_per_cpu_second'] / ref['tokens_per_cpu_second']:.2f}x" if ref else ""
        saved = "n/a" if row["saved_mb"] is None else f"{row['saved_mb']:.1f}"
        saved_ratio = (
            f"{row['saved_mb'] / ref['saved_mb']:.2f}x" if ref and row["saved_mb"] and ref["saved_mb"] else ""
        )
        line = (
            f"| {row['size']} | {row['lever']} | {row['procs']} | {row['tokens_per_second']:.0f} "
            f"| {row['tokens_per_cpu_second']:.0f} | {speed} | {saved} | {saved_ratio} | {row['peak_rss_mb']:.0f} |"
        )
        lines.append(line + (f" {row.get('max_allocated_mb', 0):.0f} |" if cuda else ""))
    return lines


def print_report(result: dict[str, Any]) -> None:
    for line in table(result):
        print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fit_levers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sizes", default="small,large", help=f"comma-separated, of: {', '.join(SIZES)}")
    parser.add_argument(
        "--levers", default=",".join(LEVERS), help=f"comma-separated, of: {', '.join(LEVERS)}"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per lever")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--compile-warmup", type=int, default=2, help="more untimed steps for compile")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each process")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def selection(text: str, valid: dict[str, Any], what: str) -> list[str]:
    """The comma-separated names of ``text``; ValueError naming the valid ones for an unknown one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or '(none given)'}; valid: {', '.join(valid)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        child = json.loads(args.child)
        result = measure(
            Size(**child["size"]), LEVERS[child["lever"]], args.steps, args.warmup, args.device, args.threads
        )
        atomic_write_json(Path(child["out"]) / f"rank{result['rank']}.json", result)
        return 0
    result = run(selection(args.sizes, SIZES, "size"), selection(args.levers, LEVERS, "lever"), args)
    print_report(result)
    if args.json:
        atomic_write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
