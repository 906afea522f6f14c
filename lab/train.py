"""``lab train``: build a config from a preset, the flags and ``--set``, then run the algorithm."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from lab.errors import UsageError, require_writable, stoppable_run

# Fields that define the network or the data; a resumed run keeps them.
FIXED_ON_RESUME = frozenset(
    {"env", "net", "hidden", "shared_encoder", "memory", "memory_size", "memory_len", "dueling", "num_envs",
     "num_steps", "n_step", "buffer_size"}
)  # fmt: skip


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    """Starts or resumes a training run; returns its summary."""
    from core.config import apply_overrides, validate
    from core.runs import write_run_config

    if args.resume:
        module, config, run_dir = config_to_resume(args)
    else:
        module, config = new_config(args)
        if args.help_config:
            print_config_help(config)
            raise SystemExit(0)
        run_dir = new_run_dir(args)
    config = apply_overrides(config, args.overrides)
    if args.until is not None:
        # A target needs periodic evals; 50k agent steps apart unless the preset or --set chose.
        config = dataclasses.replace(config, until=args.until, eval_every=config.eval_every or 50_000)
    validate(config)
    check_net(config.net, allow_auto=True)
    check_device(config.device)
    # A new run's directory is made only now, after every check of the settings: a refused command
    # leaves nothing behind.
    if run_dir is None:
        run_dir = default_run_dir(config, module.ALGO)
        made_dir = True
    else:
        made_dir = not run_dir.exists()
    # A resumed run also proves its checkpoints/ writable; a new one has none yet.
    require_writable(*([run_dir, run_dir / "checkpoints"] if args.resume else [run_dir]))
    write_run_config(run_dir, "algo", module.ALGO, config)
    try:
        with stoppable_run(lambda: training_kept(run_dir)):
            summary = module.train(config, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    except BaseException:
        if not args.resume:
            remove_unstarted_run(run_dir, made_dir)
        raise
    if not args.json:
        print_train_summary(summary)
    return summary


def remove_unstarted_run(run_dir: Path, made_dir: bool) -> None:
    """Removes what a new run wrote when it stopped before it wrote anything but ``config.json`` (for
    example, ``init_weights`` whose tensors do not fit the network): the same command can then be run
    again with the same ``--run-dir``, which would otherwise already hold a run with no checkpoint."""
    if not run_dir.is_dir() or [path.name for path in run_dir.iterdir()] != ["config.json"]:
        return
    (run_dir / "config.json").unlink()
    if made_dir:
        run_dir.rmdir()


def new_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """The algorithm module and the config of a new run: preset, then flags (``--set`` comes later)."""
    import agents
    import envs

    if not args.env:
        raise UsageError("lab train: give a preset or Gymnasium id (see `lab list envs`), or --resume DIR")
    preset = envs.resolve(args.env)
    module = agents.algo_module(args.algo or "ppo")
    config = module.config_from_dict(getattr(preset, module.ALGO) or {}, source=f"preset {preset.name!r}")
    if args.net is not None:
        check_net(args.net, allow_auto=True)
    changes = {"net": args.net, "total_steps": args.steps, "num_envs": args.envs, "seed": args.seed,
               "device": args.device}  # fmt: skip
    config = dataclasses.replace(
        config, env=preset.name, **{k: v for k, v in changes.items() if v is not None}
    )
    return module, config


def new_run_dir(args: argparse.Namespace) -> Path | None:
    """``--run-dir`` if given (and not a run already); None for the default (:func:`default_run_dir`)."""
    if not args.run_dir:
        return None
    run_dir = Path(args.run_dir)
    if (run_dir / "config.json").exists():
        raise UsageError(f"{run_dir} already holds a run; resume it with --resume {run_dir}")
    return run_dir


def default_run_dir(config: Any, algo: str) -> Path:
    """``runs/<env>-<algo>-<time>``, created empty."""
    from core.runs import new_run_dir as make_dir
    from core.runs import slug

    return make_dir("runs", f"{slug(config.env)}-{algo}")


def config_to_resume(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """``(module, config, run_dir)`` of ``lab train --resume DIR``: the saved config, with the few
    settings a resumed run may change (steps, device, and ``--set`` of fields that do not define
    the network or the data)."""
    import agents
    from core.checkpoint import latest_checkpoint
    from core.runs import read_run_config, run_dir_of

    run_dir = run_dir_of(args.resume)
    algo, saved = read_run_config(run_dir, "algo")
    if args.algo and args.algo != algo:
        raise UsageError(f"{run_dir} is a {algo} run; --algo {args.algo} does not match")
    module = agents.algo_module(algo)
    config = module.config_from_dict(saved, source=str(run_dir / "config.json"))
    if args.env and args.env != config.env:
        raise UsageError(f"{run_dir} trains {config.env!r}, not {args.env!r}")
    if latest_checkpoint(run_dir / "checkpoints") is None:
        raise UsageError(f"{run_dir} has no loadable checkpoint to resume from")
    if args.envs is not None or args.seed is not None:
        raise UsageError("--envs and --seed cannot change when resuming; start a new run instead")
    fixed = [
        key for key in (item.split("=", 1)[0].strip() for item in args.overrides) if key in FIXED_ON_RESUME
    ]
    if fixed or args.net:
        names = fixed or ["net"]
        was = ", ".join(f"{k}={getattr(config, k, None)!r}" for k in names)
        raise UsageError(
            f"{', '.join(names)} cannot change when resuming: the checkpoint was trained with {was}; "
            "start a new run instead"
        )
    changes = {"total_steps": args.steps, "device": args.device}
    config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
    return module, config, run_dir


def training_kept(run_dir: Path) -> str:
    """What a stopped training run keeps, in words, with the command that continues it."""
    from core.checkpoint import latest_checkpoint

    sidecar = latest_checkpoint(run_dir / "checkpoints")
    if sidecar is None:
        return f"no checkpoint was written yet; start again with: lab train --run-dir {run_dir} ..."
    step = int(sidecar.stem.rsplit("_", 1)[-1])
    return f"the checkpoint at step {step:,} is kept. Resume with: lab train --resume {run_dir}"


def print_train_summary(summary: dict[str, Any]) -> None:
    """One line: steps, training throughput, and the final eval (kept apart from the throughput)."""
    line = (
        f"{summary['algo']} on {summary['env']}: {summary['steps']:,} steps in {summary['train_seconds']:.0f} s "
        f"({summary['sps']:.0f} steps/s); final eval ({summary['eval_seconds']:.0f} s): return "
        f"{summary['eval_return_mean']:.1f} over {summary['eval_episodes']} episodes"
    )
    if "eval_clear_rate" in summary:
        line += f", flag reached {summary['eval_clear_rate']:.0%}"
    if summary["start_step"] > 0:  # a resumed run: its whole time too
        line += f"; {summary['run_seconds'] / 60:.1f} min of training since the run began"
    print(f"{line} -> {summary['run_dir']}")
    until = summary.get("until")
    if until and until["reached_at_step"] is not None:
        print(
            f"target {until['metric']} >= {until['target']} reached at {until['reached_at_step']:,} agent steps, "
            f"{until['reached_after_seconds'] / 60:.1f} min of wall-clock training"
        )
    elif until:
        print(
            f"target {until['metric']} >= {until['target']} not reached in {summary['steps']:,} agent steps"
        )


def print_config_help(config: Any) -> None:
    """Prints the fields of a config dataclass with their types, values and help; an agent's config
    lists the fields every agent shares first, then its algorithm's own."""
    from agents.engine import AgentConfig
    from core.config import describe

    print(f"config fields of {type(config).__name__} (set with --set key=value):")
    rows = describe(type(config))
    groups = [("", rows)]
    if isinstance(config, AgentConfig):
        shared = {field.name for field in dataclasses.fields(AgentConfig)}
        groups = [
            ("shared by every agent", [row for row in rows if row[0] in shared]),
            (f"{type(config).__name__}'s own", [row for row in rows if row[0] not in shared]),
        ]
    # Columns as wide as their longest entry (a Literal's choices can be long), at least the usual 22/14.
    name_width = max([22] + [len(row[0]) for row in rows])
    type_width = max([14] + [len(row[1]) for row in rows])
    for title, group in groups:
        if title:
            print(f" {title}:")
        for name, type_name, _default, help_text in group:
            print(
                f"  {name:<{name_width}} {type_name:<{type_width}} {getattr(config, name)!r:<14} {help_text}"
            )


def check_net(name: str, allow_auto: bool = False) -> None:
    import nets

    if allow_auto and name == "auto":
        return
    if name not in nets.names():
        raise UsageError(f"unknown net {name!r}; valid nets: {', '.join(nets.names())}")


def check_device(name: str) -> None:
    from core.compute import resolve_device

    try:
        resolve_device(name)
    except ValueError as error:
        raise UsageError(f"lab: {error}") from None
