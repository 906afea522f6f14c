"""Data parallelism for the fit loop: ranks, the process group, DDP or FSDP2, full state dicts, agreed
stops, and the launcher behind ``lab fit TASK --procs N``.

Every process of a data-parallel run executes the same loop over the same global batches; each takes
its share of every batch, and the gradients are averaged before the step (DistributedDataParallel),
or reduce-scattered to the rank that owns each parameter shard (``fully_shard``, FSDP2, with
``shard=true``). The process group is gloo on the CPU and NCCL on GPUs. Ranks are told by the
launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, as ``torchrun`` sets them); a
process without them is rank 0 of 1 and none of this is used.

Only rank 0 writes the run directory; every rank reads it to resume. Checkpoints hold full
(unsharded) state dicts, so a run can resume with any number of processes.

Stopping: a Ctrl-C or SIGTERM is not acted on at once; it is a request that the ranks agree on at the
next step boundary (one all-reduce of a flag per step), so that they all stop at the same step and
none is left waiting in a collective. A rank that dies makes the collectives of the others fail;
they stop with :class:`RankStopped`, and the launcher names the rank that failed first.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nets.transformer import Block


class RankStopped(RuntimeError):
    """This rank lost the others of its run (one of them crashed or was killed); it stops too."""


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Where this process stands in a data-parallel run."""

    rank: int = 0  # 0 .. world - 1; rank 0 writes the run directory
    world: int = 1  # number of processes
    local_rank: int = 0  # index on this machine (the GPU it uses)

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks() -> Ranks:
    """The ranks ``torchrun`` (or ``lab fit --procs``) put in the environment; rank 0 of 1 without them."""
    return Ranks(
        rank=int(os.environ.get("RANK", 0)),
        world=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def is_main() -> bool:
    """Whether this process writes the run directory (rank 0, or the only process)."""
    return ranks().main


# ---------------------------------------------------------------------------------------------
# The process group and the wrapped model
# ---------------------------------------------------------------------------------------------


def start(device: torch.device, where: Ranks) -> torch.device:
    """Joins the process group (gloo on the CPU, NCCL on CUDA); returns this rank's device.

    On CUDA each rank uses GPU ``LOCAL_RANK``.
    """
    if device.type == "cuda":
        device = torch.device("cuda", where.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def close(together: bool = False) -> None:
    """Leaves the process group, if this process joined one.

    Args:
        together: wait for every rank first, at an end they all reach (a finish, an agreed stop). A
            gloo rank that leaves and exits while another still holds its connections can abort
            ("terminate called without an active exception", SIGABRT; seen in the two-process
            test on a loaded machine), and the launcher then stops the others, rank 0 amid its
            plots. Never after a failure: the others may be gone, and a barrier would wait.
    """
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def data_parallel(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` wrapped in DistributedDataParallel (its gradients are averaged over the ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def shard(net: nn.Module) -> nn.Module:
    """Shards ``net`` in place with FSDP2: each Transformer block, then the rest (the root).

    Each rank keeps 1/world of every parameter (dim 0, padded), of its gradient and of the optimizer
    state built on it; a block's full parameters exist only while it runs (an all-gather before its
    forward and again before its backward). Returns ``net``, now an ``FSDPModule``.
    """
    from torch.distributed.fsdp import fully_shard

    for module in net.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(net)
    return net


def meta_twin(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose parameters live on the meta device (no memory); buffers are copied.

    It receives trained weights with ``twin.load_state_dict(full_state, assign=True)``: what a sharded
    run hands back, without holding a second full copy of the weights while it trains.
    """
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in net.parameters()
    }
    return copy.deepcopy(net, memo)


def local_parameter_count(net: nn.Module) -> int:
    """Parameter elements stored on this rank (a shard's local part for FSDP2 DTensors)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in net.parameters())


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module | None, sharded: nn.Module | None, enabled: bool) -> Iterator[None]:
    """Skips the cross-rank gradient reduction of this backward unless ``enabled`` (accumulation).

    Args:
        wrapped: the DistributedDataParallel module, if any.
        sharded: the FSDP2 root module, if any.
        enabled: reduce in this backward (the last micro-batch of a step).
    """
    if sharded is not None:
        sharded.set_requires_gradient_sync(enabled)
        yield
    elif wrapped is not None and not enabled:
        with wrapped.no_sync():
            yield
    else:
        yield


def full_state(
    net: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and optimizer's full (unsharded) state dicts.

    Sharded, it is collective (every rank must call it) and only rank 0 receives them, on the CPU
    (the others get empty dicts). Unsharded, it is the plain state dicts.

    Args:
        net: the model (sharded in place by :func:`shard`, or plain).
        optimizer: its optimizer.
        sharded: whether ``net`` is an FSDP2 module.
    """
    if not sharded:
        return net.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(net, optimizer, options=options)


def load_full_state(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    sharded: bool,
) -> None:
    """Loads what :func:`full_state` returned; sharded, each rank keeps its own shard of it."""
    if not sharded:
        net.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        net,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state,
        options=StateDictOptions(full_state_dict=True),
    )


# ---------------------------------------------------------------------------------------------
# Small collectives
# ---------------------------------------------------------------------------------------------


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_rank0(flag: bool) -> bool:
    """Rank 0's ``flag``, on every rank (a decision that depends on rank 0's clock)."""
    value = torch.tensor([float(flag)])
    dist.broadcast(value, src=0)
    return bool(value.item())


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` (a tensor of any device) over the ranks, as a CPU tensor."""
    total = value.detach().float().cpu().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (pickled over the wire, never to disk)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def failure_in_words(error: BaseException) -> str:
    """The gist of a failed collective: ``Connection closed by peer [127.0.0.1]:29500``."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0])  # gloo's source location
    return text.split(". ")[0][:120]


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank went away."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return any(mark in text for mark in ("gloo", "NCCL", "Connection closed by peer", "Connection reset"))


# ---------------------------------------------------------------------------------------------
# Agreed stops
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StopRequest:
    """Set by SIGINT/SIGTERM while :func:`stop_requests` is active; acted on at a step boundary."""

    requested: bool = False


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Turns Ctrl-C and SIGTERM into a :class:`StopRequest` flag for the duration (main thread only)."""
    request = StopRequest()

    def note(signum: int, frame: Any) -> None:
        request.requested = True

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LaunchOutcome:
    """How a launched run ended: the exit status for ``lab`` and, if it failed, a one-line reason."""

    status: int  # 0 done, 1 a rank failed, 2 bad input seen by a rank, 130 interrupted
    message: str = ""  # empty when rank 0 has already said everything


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch(argv: list[str], procs: int, module: str = "lab") -> LaunchOutcome:
    """Runs ``python -m <module> <argv>`` in ``procs`` processes with torchrun's launcher (elastic_launch).

    Rank 0 keeps this terminal (its progress bar, messages and JSON line); the other ranks write to
    log files in a temporary folder, from which the last line of a failed rank's stderr is quoted.
    Each rank gets ``cpus // procs`` CPU threads unless ``OMP_NUM_THREADS`` is set. A failed rank
    stops the others (SIGTERM); Ctrl-C or SIGTERM here is passed on to every rank, which stop
    together at their next step and keep the last epoch checkpoint.

    Args:
        argv: the arguments of every rank (``fit TASK --run-dir DIR ...`` for ``lab``).
        procs: number of processes, at least 2.
        module: the module every rank runs.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher's own log lines (closing signals, failure tables) would bury the one-line outcome;
    # its modules set their loggers' levels themselves, at import.
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cpus() // procs)))
    log_dir = Path(tempfile.mkdtemp(prefix="lab-ranks-"))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=procs,
        run_id=f"lab-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port on this machine, as torchrun --standalone
        max_restarts=0,
        monitor_interval=0.1,
        shutdown_timeout=60,  # time for the ranks to reach their agreed stop
        logs_specs=DefaultLogsSpecs(
            log_dir=str(log_dir), redirects={rank: Std.ALL for rank in range(1, procs)}
        ),
    )
    try:
        elastic_launch(config, sys.executable)("-m", module, *argv)
    except SignalException:
        return LaunchOutcome(130)  # rank 0 said what was kept and how to resume
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        status = failure.exitcode if failure.exitcode in (2, 130) else 1
        if rank == 0:
            return LaunchOutcome(status)  # its one line is on this terminal already
        reason = last_line(log_dir, rank) if failure.exitcode > 0 else ""  # a killed rank said nothing
        return LaunchOutcome(
            status,
            f"rank {rank} of {procs} {exit_in_words(failure.exitcode)}"
            + (f": {reason}" if reason else "")
            + "; the other ranks were stopped",
        )
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)  # its one line, if any, is in the outcome
    return LaunchOutcome(0)


def exit_in_words(exitcode: int) -> str:
    """``failed (exit 1)`` or ``was killed by SIGKILL``."""
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"failed (exit {exitcode})"


def last_line(log_dir: Path, rank: int) -> str:
    """The last non-empty line a launched rank wrote to stderr (its one-line error), or ''."""
    for path in sorted(log_dir.glob(f"*/attempt_*/{rank}/stderr.log")):
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""
