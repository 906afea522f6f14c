"""``lab fit``: run a supervised task (new or resumed) and report its metric."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from lab.errors import UsageError, require_writable, stoppable_run
from lab.train import print_config_help


def cmd_fit(args: argparse.Namespace) -> dict[str, Any]:
    """Runs ``lab fit TASK`` or ``lab fit --resume DIR``; returns the metrics (without history)."""
    import tasks
    from agents.engine import TrainingStopped
    from core.config import apply_overrides, validate
    from core.runs import new_run_dir
    from tasks import distributed

    where = distributed.ranks()  # a rank of a data-parallel run, or the only process
    procs = where.world if where.world > 1 else args.procs
    if where.world > 1 and not (args.run_dir or args.resume):
        raise UsageError("lab fit under torchrun: give every rank the same --run-dir DIR")
    if args.resume:
        spec, config, run_dir = fit_to_resume(args)
        check_levers(config, procs)
    else:
        if not args.task:
            raise UsageError("lab fit: give a task (see `lab list tasks`), or --resume DIR")
        spec = tasks.get(args.task)
        config = spec.config_class()
        if args.help_config:
            print_config_help(config)
            raise SystemExit(0)
        changes = {"net": args.net, "epochs": args.epochs, "seed": args.seed, "device": args.device}
        # --engine torch is every task's engine; it needs a field only to name another engine.
        changes["engine"] = args.engine if args.engine != "torch" or hasattr(config, "engine") else None
        given = {k: v for k, v in changes.items() if v is not None}
        if missing := [k for k in given if not hasattr(config, k)]:
            raise UsageError(no_such_setting(spec.name, missing))
        config = dataclasses.replace(config, **given)
        config = apply_overrides(config, args.overrides)
        validate(config)
        if config.net not in spec.nets:
            raise UsageError(
                f"task {spec.name!r} cannot use net {config.net!r}; valid nets: {', '.join(spec.nets)}"
            )
        check_levers(config, procs)
        if args.run_dir:
            run_dir = Path(args.run_dir)
            # Across processes rank 0 checks: the others could see the config.json it has just written.
            if where.main and (run_dir / "config.json").exists():
                raise UsageError(f"{run_dir} already holds a run; resume it with: lab fit --resume {run_dir}")
        else:
            run_dir = new_run_dir("runs", f"fit-{spec.name}-{config.net}")
        if where.main:
            require_writable(run_dir)
    if procs > 1 and where.world == 1:
        return launch_fit(args, run_dir, procs)
    try:
        with stoppable_run(lambda: fit_kept(run_dir)):
            metrics = spec.run(config, run_dir, progress=not args.no_progress, resume=bool(args.resume))
    except distributed.RankStopped as error:
        raise TrainingStopped(str(error)) from None
    if not args.json:
        for line in metrics.get("report", []):  # what a task has to say beyond its metric
            print(line)
        metric_name = metrics.get("metric", "test_accuracy")
        value = metrics.get("test_accuracy", metrics.get("test_metric"))
        print(
            f"{spec.name} with {config.net}: {metric_name} {value:.4f}, train loss "
            f"{metrics['train_loss']:.4f}, {metrics['seconds']:.1f} s -> {run_dir}"
        )
    return {k: v for k, v in metrics.items() if k not in ("history", "report")}


def no_such_setting(task: str, keys: list[str]) -> str:
    """One line for a flag (``--engine scratch``, ``--epochs``) that task ``task`` has no setting for."""
    import tasks
    from core.config import config_fields

    if "engine" in keys:
        engines = [name for name in tasks.names() if "engine" in config_fields(tasks.get(name).config_class)]
        return f"task {task!r} runs on the torch engine only; --engine scratch runs: {', '.join(engines)}"
    flags = ", ".join(f"--{key}" for key in keys)
    return f"task {task!r} has no {flags} setting; see `lab fit {task} --help-config`"


def fit_to_resume(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """``(task spec, config, run_dir)`` of ``lab fit --resume DIR [--epochs N] [--device D]``."""
    import tasks
    from core.checkpoint import latest_checkpoint
    from core.config import config_from_dict, validate
    from core.runs import read_run_config, run_dir_of
    from tasks.distributed import is_main
    from tasks.loop import EPOCH_PREFIX, TaskError

    run_dir = run_dir_of(args.resume)
    if args.run_dir and Path(args.run_dir) != run_dir:
        raise UsageError(f"--resume {run_dir} continues the run in place; drop --run-dir {args.run_dir}")
    task, saved = read_run_config(run_dir, "task", TaskError)
    if args.task and args.task != task:
        raise UsageError(f"{run_dir} is a run of task {task!r}, not {args.task!r}")
    spec = tasks.get(task)
    flags = (("--net", args.net), ("--seed", args.seed), ("--engine", args.engine))
    fixed = [name for name, given in flags if given is not None]
    if fixed or args.overrides:
        raise UsageError(
            f"{', '.join(fixed + (['--set'] if args.overrides else []))} cannot change when resuming "
            f"{run_dir}; only --epochs and --device can (start a new run for other settings)"
        )
    config = config_from_dict(spec.config_class, saved, source=str(run_dir / "config.json"))
    changes = {"epochs": args.epochs, "device": args.device}
    config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
    if args.help_config:
        print_config_help(config)
        raise SystemExit(0)
    validate(config)
    if latest_checkpoint(run_dir / "checkpoints", prefix=EPOCH_PREFIX) is None:
        raise UsageError(f"{run_dir} has no epoch checkpoint to resume from")
    if is_main():  # the other ranks of a data-parallel run only read it
        require_writable(run_dir, run_dir / "checkpoints")
    return spec, config, run_dir


def fit_kept(run_dir: Path) -> str:
    """What a stopped ``lab fit`` run keeps, in words, with the command that continues it."""
    from core.checkpoint import latest_checkpoint
    from tasks.distributed import ranks
    from tasks.loop import EPOCH_PREFIX

    sidecar = latest_checkpoint(run_dir / "checkpoints", prefix=EPOCH_PREFIX)
    if sidecar is None:
        return "no epoch had finished, so there is nothing to resume"
    epoch = int(sidecar.stem[len(EPOCH_PREFIX) :])
    world = ranks().world
    procs = f" --procs {world}" if world > 1 else ""
    return f"the checkpoint after epoch {epoch} is kept. Resume with: lab fit --resume {run_dir}{procs}"


def check_levers(config: Any, procs: int) -> None:
    """Refuses, before anything is written or launched, levers that cannot run (TaskError, exit 2)."""
    from core.compute import resolve_device
    from tasks.loop import Levers, TaskError, levers_of
    from tasks.loop import check_levers as check

    if procs > 1 and getattr(config, "engine", "torch") != "torch":
        raise UsageError(
            f"--procs {procs} runs the torch fit loop; the {config.engine} engine runs in one process"
        )
    levers = levers_of(config)
    if levers == Levers() and procs == 1:
        return  # the plain loop: the task reports its own errors (an absent CUDA device among them)
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        raise TaskError(f"device={config.device} cannot be used ({error}); use device=cpu or auto") from None
    check(levers, procs, device)


def launch_fit(args: argparse.Namespace, run_dir: Path, procs: int) -> None:
    """``lab fit ... --procs N``: the same command in N processes (torchrun); rank 0 prints its outcome."""
    from tasks.distributed import launch

    argv = ["fit", "--resume", str(run_dir)] if args.resume else ["fit", args.task, "--run-dir", str(run_dir)]
    flags = {"--net": args.net, "--epochs": args.epochs, "--seed": args.seed, "--device": args.device}
    flags["--engine"] = args.engine
    for flag, value in flags.items():
        if value is not None:
            argv += [flag, str(value)]
    for item in args.overrides:
        argv += ["--set", item]
    argv += [flag for flag, given in (("--json", args.json), ("--no-progress", args.no_progress)) if given]
    outcome = launch(argv, procs)
    if outcome.message:  # a rank other than 0 failed; what it said is in its log, quoted here
        print(f"lab: {outcome.message}", file=sys.stderr)
    if outcome.status:
        raise SystemExit(outcome.status)
