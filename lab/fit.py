"""``lab fit``: run a supervised task (new or resumed) and report its metric."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from lab.errors import UsageError, require_writable, stoppable_run
from lab.train import print_config_help


def cmd_fit(args: argparse.Namespace) -> dict[str, Any]:
    """Runs ``lab fit TASK`` or ``lab fit --resume DIR``; returns the metrics (without history)."""
    import tasks
    from core.config import apply_overrides, validate
    from core.runs import new_run_dir

    if args.resume:
        spec, config, run_dir = fit_to_resume(args)
    else:
        if not args.task:
            raise UsageError("lab fit: give a task (see `lab list tasks`), or --resume DIR")
        spec = tasks.get(args.task)
        config = spec.config_class()
        if args.help_config:
            print_config_help(config)
            raise SystemExit(0)
        changes = {"net": args.net, "epochs": args.epochs, "seed": args.seed, "device": args.device}
        config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
        config = apply_overrides(config, args.overrides)
        validate(config)
        if config.net not in spec.nets:
            raise UsageError(
                f"task {spec.name!r} cannot use net {config.net!r}; valid nets: {', '.join(spec.nets)}"
            )
        if args.run_dir:
            run_dir = Path(args.run_dir)
            if (run_dir / "config.json").exists():
                raise UsageError(f"{run_dir} already holds a run; resume it with: lab fit --resume {run_dir}")
        else:
            run_dir = new_run_dir("runs", f"fit-{spec.name}-{config.net}")
        require_writable(run_dir)
    with stoppable_run(lambda: fit_kept(run_dir)):
        metrics = spec.run(config, run_dir, progress=not args.no_progress, resume=bool(args.resume))
    if not args.json:
        metric_name = metrics.get("metric", "test_accuracy")
        value = metrics.get("test_accuracy", metrics.get("test_metric"))
        print(
            f"{spec.name} with {config.net}: {metric_name} {value:.4f}, train loss "
            f"{metrics['train_loss']:.4f}, {metrics['seconds']:.1f} s -> {run_dir}"
        )
    return {k: v for k, v in metrics.items() if k != "history"}


def fit_to_resume(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """``(task spec, config, run_dir)`` of ``lab fit --resume DIR [--epochs N] [--device D]``."""
    import tasks
    from core.checkpoint import latest_checkpoint
    from core.config import config_from_dict, validate
    from core.runs import read_run_config, run_dir_of
    from tasks.loop import EPOCH_PREFIX, TaskError

    run_dir = run_dir_of(args.resume)
    if args.run_dir and Path(args.run_dir) != run_dir:
        raise UsageError(f"--resume {run_dir} continues the run in place; drop --run-dir {args.run_dir}")
    task, saved = read_run_config(run_dir, "task", TaskError)
    if args.task and args.task != task:
        raise UsageError(f"{run_dir} is a run of task {task!r}, not {args.task!r}")
    spec = tasks.get(task)
    fixed = [name for name, given in (("--net", args.net), ("--seed", args.seed)) if given is not None]
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
    require_writable(run_dir, run_dir / "checkpoints")
    return spec, config, run_dir


def fit_kept(run_dir: Path) -> str:
    """What a stopped ``lab fit`` run keeps, in words, with the command that continues it."""
    from core.checkpoint import latest_checkpoint
    from tasks.loop import EPOCH_PREFIX

    sidecar = latest_checkpoint(run_dir / "checkpoints", prefix=EPOCH_PREFIX)
    if sidecar is None:
        return "no epoch had finished, so there is nothing to resume"
    epoch = int(sidecar.stem[len(EPOCH_PREFIX) :])
    return f"the checkpoint after epoch {epoch} is kept. Resume with: lab fit --resume {run_dir}"
