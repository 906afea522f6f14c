"""``lab``: the one command line of the agent lab.

    lab train PRESET_OR_ENV_ID [--algo ppo|dqn] [--net NAME] [--steps N] [--envs N] [--seed S]
              [--device auto|cpu|cuda] [--run-dir DIR] [--resume DIR] [--set key=value ...] [--json]
    lab eval RUN_OR_CKPT [--episodes N] [--json]
    lab watch RUN_OR_CKPT [--episodes N] [--out FILE.mp4|.gif] [--human]
    lab fit TASK [--net NAME] [--epochs N] [--set key=value ...] [--json]
    lab fit --resume DIR [--epochs N]
    lab bench ...
    lab list [envs|tasks|nets]
    lab demo

Bad input (unknown preset, net or task, a malformed ``--set``, a missing or foreign checkpoint) ends
with one line on stderr naming the problem and the valid choices, exit status 2, no traceback. So
does a run directory that cannot be written (read-only, or a disk that fills up during a checkpoint
write): the last good checkpoint stays, and the line says how to resume. Set ``LAB_DEBUG=1`` to see
the traceback anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------


def build_parser() -> Parser:
    parser = Parser(prog="lab", description="Agent lab: train agents, watch rollouts, run supervised tasks.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    train = commands.add_parser("train", help="train an agent (PPO or DQN) on a preset or Gymnasium id")
    train.add_argument("env", nargs="?", metavar="PRESET_OR_ENV_ID", help="e.g. cartpole, mario-1-1")
    train.add_argument("--algo", choices=["ppo", "dqn"], default=None, help="algorithm (default: ppo)")
    train.add_argument("--net", default=None, help="encoder from nets/ (see `lab list nets`)")
    train.add_argument("--steps", type=positive_int, default=None, help="total agent steps of the run")
    train.add_argument("--envs", type=positive_int, default=None, help="number of parallel envs")
    train.add_argument("--seed", type=non_negative_int, default=None, help="random seed")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where to train")
    train.add_argument("--run-dir", default=None, help="output directory (default: runs/<env>-<algo>-<time>)")
    train.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field (repeatable); see `lab train ENV --help-config`",
    )
    train.add_argument("--help-config", action="store_true", help="list the config fields and exit")
    train.add_argument("--json", action="store_true", help="print one JSON summary as the last line")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("eval", help="play greedy episodes with a trained agent")
    evaluate.add_argument("run", metavar="RUN_OR_CKPT", help="run directory or checkpoint file")
    evaluate.add_argument("--episodes", type=positive_int, default=20, help="episodes to play (default 20)")
    evaluate.add_argument("--seed", type=non_negative_int, default=12345, help="seed of the eval envs")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    evaluate.add_argument(
        "--deterministic-start",
        action="store_true",
        help="no randomised starts (no-ops / sticky actions) in Mario",
    )
    evaluate.add_argument(
        "--save", action="store_true", help="also write the summary to eval.json in the run directory"
    )
    evaluate.add_argument("--stochastic", action="store_true", help=STOCHASTIC_HELP)
    evaluate.add_argument(
        "--sticky",
        type=probability,
        default=None,
        metavar="P",
        help="Mario: repeat the previous action on each frame with probability P (ALE v5 uses 0.25)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON summary as the last line")

    watch = commands.add_parser("watch", help="record rollouts of a trained agent to MP4/GIF")
    watch.add_argument("run", metavar="RUN_OR_CKPT", help="run directory or checkpoint file")
    watch.add_argument("--episodes", type=positive_int, default=1, help="episodes to record (default 1)")
    watch.add_argument("--out", default=None, help="output .mp4 or .gif (default: RUN/videos/watch.mp4)")
    watch.add_argument("--human", action="store_true", help="open a window instead of writing a file")
    watch.add_argument("--stochastic", action="store_true", help=STOCHASTIC_HELP)
    watch.add_argument(
        "--small",
        action="store_true",
        help="half size, every other frame (a GIF of a few hundred KB for a README)",
    )
    watch.add_argument("--seed", type=non_negative_int, default=0, help="seed of the env")
    watch.add_argument(
        "--max-steps", type=positive_int, default=5000, help="stop an episode after this many steps"
    )
    watch.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    watch.add_argument("--json", action="store_true", help="print one JSON summary as the last line")

    fit = commands.add_parser("fit", help="run a supervised task (see `lab list tasks`)")
    fit.add_argument("task", nargs="?", metavar="TASK", help="xor, playground, digits, sequence, sentiment")
    fit.add_argument("--net", default=None, help="network from nets/ (see `lab list nets`)")
    fit.add_argument("--epochs", type=positive_int, default=None, help="training epochs")
    fit.add_argument("--seed", type=non_negative_int, default=None, help="random seed")
    fit.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    fit.add_argument("--run-dir", default=None, help="output directory (default: runs/fit-<task>-<time>)")
    fit.add_argument(
        "--resume", default=None, metavar="DIR", help="continue the run in DIR (--epochs may raise its total)"
    )
    fit.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field (repeatable); see `lab fit TASK --help-config`",
    )
    fit.add_argument("--help-config", action="store_true", help="list the config fields and exit")
    fit.add_argument("--json", action="store_true", help="print one JSON summary as the last line")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")

    bench = commands.add_parser("bench", help="throughput side by side with Stable-Baselines3")
    bench.add_argument(
        "what",
        nargs="?",
        default="env",
        choices=["env", "train"],
        help="env: Mario env stack vs emulator and SB3; train: PPO/DQN agent steps/s vs SB3 (minutes)",
    )
    bench.add_argument("--seconds", type=positive_float, default=10.0, help="env: seconds per measurement")
    bench.add_argument("--repeats", type=positive_int, default=3, help="repeats (medians are reported)")
    bench.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="train: where to train"
    )
    bench.add_argument(
        "--systems",
        default=None,
        help="train: comma-separated systems (default: the presets against SB3, the emulator limit and "
        "the digits line; `python -m benchmarks.train_throughput --help` lists all)",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON summary as the last line")

    listing = commands.add_parser("list", help="show presets, tasks or nets")
    listing.add_argument("what", nargs="?", default="all", choices=["all", "envs", "tasks", "nets"])

    export = commands.add_parser(
        "export", help="copy a run's newest weights, config and learning curve to a small run for sharing"
    )
    export.add_argument("run", metavar="RUN_DIR", help="the run to export")
    export.add_argument("out", metavar="OUT_DIR", help="the new run directory (made if missing)")
    export.add_argument("--json", action="store_true", help="print one JSON summary as the last line")

    commands.add_parser("demo", help="the flagship demo on the shipped defaults")
    return parser


STOCHASTIC_HELP = (
    "sample actions from the policy (PPO; DQN: epsilon-greedy at its final epsilon) instead of the greedy "
    "argmax, as the RL Zoo evaluates Atari agents"
)


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def probability(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _number(text: str, kind: type) -> Any:
    try:
        value = float(text)
        if kind is int:
            if not value.is_integer() or abs(value) > 2**62:
                raise ValueError
            return int(value)
        if math.isnan(value):
            raise ValueError
        return value
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a{'n integer' if kind is int else ' number'}, got {text!r}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def algo_module(name: str) -> Any:
    from agents import dqn, ppo

    return {"ppo": ppo, "dqn": dqn}[name]


def config_class(module: Any) -> type:
    return module.PPOConfig if module.ALGO == "ppo" else module.DQNConfig


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from agents import common
    from lab.config import apply_overrides, validate

    if args.resume:
        run_dir = Path(args.resume)
        algo, saved = common.read_run_config(run_dir)
        if args.algo and args.algo != algo:
            raise UsageError(f"{run_dir} is a {algo} run; --algo {args.algo} does not match")
        module = algo_module(algo)
        config = module.config_from_dict(saved)
        if args.env and args.env != config.env:
            raise UsageError(f"{run_dir} trains {config.env!r}, not {args.env!r}")
        if common.latest_checkpoint(run_dir / "checkpoints") is None:
            raise UsageError(f"{run_dir} has no loadable checkpoint to resume from")
        changes = {"total_steps": args.steps, "device": args.device}
        config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
        fixed = [
            item.split("=", 1)[0].strip()
            for item in args.overrides
            if item.split("=", 1)[0].strip() in FIXED_ON_RESUME
        ]
        if args.envs is not None or args.seed is not None:
            raise UsageError("--envs and --seed cannot change when resuming; start a new run instead")
        if fixed or args.net:
            raise UsageError(
                f"{', '.join(fixed or ['net'])} cannot change when resuming: the checkpoint was trained with "
                f"{', '.join(f'{k}={getattr(config, k, None)!r}' for k in (fixed or ['net']))}; start a new run instead"
            )
        config = apply_overrides(config, args.overrides)
    else:
        if not args.env:
            raise UsageError(
                "lab train: give a preset or Gymnasium id (see `lab list envs`), or --resume DIR"
            )
        import envs

        preset = envs.resolve(args.env)
        algo = args.algo or "ppo"
        module = algo_module(algo)
        cls = config_class(module)
        defaults = getattr(preset, algo, {}) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in defaults.items() if k in known})
        config = dataclasses.replace(config, env=preset.name)
        if args.help_config:
            print_config_help(config)
            raise SystemExit(0)
        if args.net is not None:
            check_net(args.net, allow_auto=True)
        changes = {
            "net": args.net,
            "total_steps": args.steps,
            "num_envs": args.envs,
            "seed": args.seed,
            "device": args.device,
        }
        config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
        config = apply_overrides(config, args.overrides)
        validate(config)
        check_net(config.net, allow_auto=True)
        common.resolve_device(config.device)
        run_dir = (
            Path(args.run_dir) if args.run_dir else common.new_run_dir("runs", f"{slug(config.env)}-{algo}")
        )
        if args.run_dir and (run_dir / "config.json").exists():
            raise UsageError(f"{run_dir} already holds a run; resume it with --resume {run_dir}")
        require_writable(run_dir)
        common.write_run_config(run_dir, algo, config)
    if args.resume:
        validate(config)
        common.resolve_device(config.device)
        require_writable(run_dir, run_dir / "checkpoints")
        common.write_run_config(run_dir, algo, config)
    # SIGTERM (a scheduler's or `timeout`'s stop) saves a checkpoint just like Ctrl-C does.
    previous_handler = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        return module.train(config, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted; checkpoint saved. Resume with: lab train --resume {run_dir}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (common.TrainingStopped, OSError) as error:
        storage = storage_error_in(error)
        if storage is None:
            raise
        sidecar = common.latest_checkpoint(run_dir / "checkpoints")
        kept = (
            f"the last good checkpoint (step {int(sidecar.stem.rsplit('_', 1)[-1])}) is kept"
            if sidecar is not None
            else "no checkpoint was written yet"
        )
        raise UsageError(
            f"lab: {storage_message(storage)}; training stopped, {kept}; "
            f"{storage_remedy(storage)}, then resume with: lab train --resume {run_dir}"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def require_writable(*directories: Path) -> None:
    """Refuses a run directory that cannot be written before anything is written to it."""
    from agents.checkpoint import StorageError, check_writable

    for directory in directories:
        try:
            check_writable(directory)
        except StorageError as error:
            raise UsageError(f"lab: {error}; nothing was changed") from None


def storage_error_in(error: BaseException) -> OSError | None:
    """The full-disk or read-only OSError that ``error`` is or was caused by, if any."""
    from agents.checkpoint import is_storage_error

    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if is_storage_error(cause):
            return cause  # type: ignore[return-value]
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def storage_remedy(error: OSError) -> str:
    import errno

    return (
        "free some disk space"
        if error.errno in (errno.ENOSPC, errno.EDQUOT)
        else "make the run directory writable"
    )


# Fields that define the network or the data; a resumed run keeps them.
FIXED_ON_RESUME = frozenset(
    {"env", "net", "hidden", "shared_encoder", "memory", "memory_size", "memory_len", "dueling", "num_envs",
     "num_steps", "n_step", "buffer_size"}
)  # fmt: skip


def print_config_help(config: Any) -> None:
    from lab.config import describe

    print(f"config fields of {type(config).__name__} (set with --set key=value):")
    for name, type_name, _default, help_text in describe(type(config)):
        print(f"  {name:<22} {type_name:<14} {getattr(config, name)!r:<14} {help_text}")


def load_agent(
    path: str, device_name: str, stochastic: bool = False, seed: int = 0
) -> tuple[Any, Any, dict[str, Any]]:
    """Returns (policy, config, meta) of a run directory or checkpoint; greedy unless ``stochastic``
    (then its action sampling is seeded with ``seed``)."""
    from agents import common

    sidecar, meta = common.locate_checkpoint(path)
    if meta.get("algo") not in ("ppo", "dqn"):
        raise UsageError(f"{sidecar} was written by an unknown algorithm {meta.get('algo')!r}")
    module = algo_module(meta["algo"])
    device = common.resolve_device(device_name)
    policy = module.load_policy(sidecar, meta, device)
    if stochastic:
        policy.sample_actions(seed)
    return policy, module.config_from_dict(meta["config"]), meta


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    import envs
    from agents import common

    policy, config, _ = load_agent(args.run, args.device, args.stochastic, args.seed)
    overrides = {} if args.deterministic_start else envs.eval_overrides(config.env)
    if args.sticky is not None:
        if envs.resolve(config.env).kind != "mario":
            raise UsageError(f"--sticky applies to Mario presets only; this run trains {config.env!r}")
        overrides["sticky_prob"] = args.sticky
    summary = common.evaluate(
        policy,
        lambda n: envs.make_vec(config.env, n, seed=args.seed, **overrides),
        args.episodes,
        args.seed,
    )
    summary = {
        "run": args.run,
        "env": config.env,
        "actions": "sampled" if args.stochastic else "greedy",
        **summary,
    }
    if args.save:
        from agents.checkpoint import atomic_write_json

        sidecar, meta = common.locate_checkpoint(args.run)
        saved = {
            **summary,
            "checkpoint": sidecar.name,
            "seed": args.seed,
            "randomised_start": overrides,
            "date": time.strftime("%Y-%m-%d"),
        }
        path = sidecar.parent.parent / "eval.json"
        atomic_write_json(path, saved)
        summary["saved"] = str(path)
    if not args.json:
        print_eval(summary)
        if args.save:
            print(f"saved: {summary['saved']}")
    return summary


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from agents import common
    from agents.checkpoint import check_writable, load_checkpoint

    source, out = Path(args.run), Path(args.out)
    if not source.is_dir() or common.latest_checkpoint(source / "checkpoints") is None:
        raise UsageError(f"{source} is not a run directory with a loadable checkpoint")
    if out.resolve() == source.resolve():
        raise UsageError("OUT_DIR must differ from RUN_DIR")
    if out.exists():
        check_writable(out)
    sidecar = common.export_slim_checkpoint(source, out)
    state, meta = load_checkpoint(sidecar)
    history = list(state.get("history", []))
    if history:
        common.plot_learning_curve(
            history, out / "learning_curve.png", f"{meta['algo'].upper()} on {meta['config']['env']}"
        )
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    summary = {"run": str(out), "checkpoint": str(sidecar), "steps": int(state["global_step"]), "bytes": size}
    if any("clear_rate" in record for record in history):
        for threshold, _label, key in common.CLEAR_MILESTONES:
            summary[key] = common.first_step_reaching(history, "clear_rate", threshold)
    if not args.json:
        print(f"exported {source} at {summary['steps']:,} steps to {out} ({size / 2**20:.1f} MB)")
    return summary


def print_eval(summary: dict[str, Any]) -> None:
    line = (
        f"{summary['env']}: {summary['episodes']} {summary.get('actions', 'greedy')} episodes, "
        f"return {summary['return_mean']:.1f} "
        f"+- {summary['return_std']:.1f}, length {summary['length_mean']:.0f}"
    )
    if "clear_rate" in summary:
        line += f", flag reached {summary['clear_rate']:.0%}, mean furthest x {summary['x_pos_mean']:.0f}"
    print(line)


def cmd_watch(args: argparse.Namespace) -> dict[str, Any]:
    from lab.watch import watch

    policy, config, _ = load_agent(args.run, args.device, args.stochastic, args.seed)
    run_path = Path(args.run)
    run_dir = run_path if run_path.is_dir() else run_path.parent.parent
    if args.out is None and not args.human:
        out = run_dir / "videos" / "watch.mp4"
    else:
        out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".mp4", ".gif"):
        raise UsageError(f"--out must end in .mp4 or .gif, got {out.name!r}")
    summary = watch(
        policy, config.env, out, args.episodes, args.seed, args.human, args.max_steps, small=args.small
    )
    if not args.json:
        for episode in summary["per_episode"]:
            print(describe_episode(episode))
        if out is not None:
            print(f"video: {out}")
    return summary


def describe_episode(episode: dict[str, Any]) -> str:
    text = f"return {episode['return']:.1f}, {episode['length']} steps"
    if "flag_get" in episode:
        text += (
            f", flag {'reached' if episode['flag_get'] else 'not reached'}, "
            f"distance x={episode.get('x_pos_max', 0):.0f}"
        )
        if "game_time" in episode:
            text += f", game time {episode['game_time']}"
    return text


def cmd_fit(args: argparse.Namespace) -> dict[str, Any]:
    import tasks
    from agents import common
    from lab.config import apply_overrides, validate

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
        run_dir = (
            Path(args.run_dir)
            if args.run_dir
            else common.new_run_dir("runs", f"fit-{spec.name}-{config.net}")
        )
        if args.run_dir and (run_dir / "config.json").exists():
            raise UsageError(f"{run_dir} already holds a run; resume it with: lab fit --resume {run_dir}")
        require_writable(run_dir)
    # SIGTERM stops like Ctrl-C: the epochs done so far are checkpointed, the run resumes from them.
    previous_handler = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        # Only a resume passes the flag, so a task's run() may predate it.
        resume = {"resume": True} if args.resume else {}
        metrics = spec.run(config, run_dir, progress=not args.no_progress, **resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {fit_checkpoint_note(run_dir)}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except OSError as error:
        storage = storage_error_in(error)
        if storage is None:
            raise
        raise UsageError(
            f"lab: {storage_message(storage)}; training stopped, {fit_checkpoint_note(run_dir)}"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
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
    from agents.checkpoint import config_from_dict, latest_checkpoint
    from lab.config import validate
    from tasks.loop import EPOCH_PREFIX, read_run_config

    run_dir = Path(args.resume)
    if args.run_dir and Path(args.run_dir) != run_dir:
        raise UsageError(f"--resume {run_dir} continues the run in place; drop --run-dir {args.run_dir}")
    task, saved = read_run_config(run_dir)
    if args.task and args.task != task:
        raise UsageError(f"{run_dir} is a run of task {task!r}, not {args.task!r}")
    spec = tasks.get(task)
    fixed = [name for name, given in (("--net", args.net), ("--seed", args.seed)) if given is not None]
    if fixed or args.overrides:
        raise UsageError(
            f"{', '.join(fixed + (['--set'] if args.overrides else []))} cannot change when resuming "
            f"{run_dir}; only --epochs and --device can (start a new run for other settings)"
        )
    config = config_from_dict(spec.config_class, saved)
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


def fit_checkpoint_note(run_dir: Path) -> str:
    """What a stopped ``lab fit`` run keeps, in words, with the command that continues it."""
    from agents.checkpoint import latest_checkpoint
    from tasks.loop import EPOCH_PREFIX

    sidecar = latest_checkpoint(run_dir / "checkpoints", prefix=EPOCH_PREFIX)
    if sidecar is None:
        return "no epoch had finished, so there is nothing to resume"
    epoch = int(sidecar.stem[len(EPOCH_PREFIX) :])
    return f"the checkpoint after epoch {epoch} is kept. Resume with: lab fit --resume {run_dir}"


def cmd_list(args: argparse.Namespace) -> None:
    sections = ["envs", "tasks", "nets"] if args.what == "all" else [args.what]
    for section in sections:
        if section == "envs":
            import envs

            print("environment presets (any registered Gymnasium id with discrete actions works too):")
            for name in envs.names():
                print(f"  {name:<24} {envs.get_preset(name).description}")
        elif section == "tasks":
            import tasks

            print("supervised tasks (lab fit TASK):")
            for name in tasks.names():
                spec = tasks.get(name)
                print(f"  {name:<24} {spec.description} [nets: {', '.join(spec.nets)}]")
        else:
            import nets

            print("networks (--net NAME):")
            for name in nets.names():
                print(f"  {name:<24} {nets.describe(name)}")


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import env_throughput, train_throughput
    from envs.vector import available_cpus

    if args.what == "train":
        argv = ["--repeats", str(args.repeats), "--device", args.device]
        if args.systems:
            argv += ["--systems", args.systems]
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError(
                    "lab bench train --device cuda: no CUDA device is available; use --device cpu"
                )
        try:
            systems, settings = train_throughput.settings_from_args(
                train_throughput.build_parser().parse_args(argv)
            )
        except ValueError as error:
            raise UsageError(f"lab bench train: {error}") from None
        result = train_throughput.run(systems, settings, args.repeats)
        if not args.json:
            train_throughput.print_report(result)
        if result["failures"]:
            if args.json:  # what was measured is still printed, then the run counts as failed
                print(json.dumps(jsonable(result)))
            from agents.common import TrainingStopped

            failed = ", ".join(result["failures"])
            raise TrainingStopped(f"benchmark systems failed: {failed} (their errors are printed above)")
        return result
    result = env_throughput.run(
        args.seconds, args.repeats, max(8, 2 * available_cpus()), None, list(env_throughput.SYSTEMS)
    )
    if not args.json:
        env_throughput.print_report(result)
    return result


def cmd_demo(args: argparse.Namespace) -> dict[str, Any] | None:
    from lab.demo import demo

    return demo()


def check_net(name: str, allow_auto: bool = False) -> None:
    import nets

    if allow_auto and name == "auto":
        return
    if name not in nets.names():
        raise UsageError(f"unknown net {name!r}; valid nets: {', '.join(nets.names())}")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-").lower()


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "watch": cmd_watch,
    "fit": cmd_fit,
    "bench": cmd_bench,
    "list": cmd_list,
    "export": cmd_export,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    """Runs ``lab``; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    from agents.checkpoint import CheckpointError
    from agents.common import TrainingStopped
    from envs.vector import EnvWorkerError

    debug = os.environ.get("LAB_DEBUG") == "1"
    # A path or name the terminal cannot encode must not turn finished work into an error.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
        result = COMMANDS[args.command](args)
    except UsageError as error:
        return fail(str(error))
    except (TrainingStopped, EnvWorkerError) as error:
        if debug:
            raise
        storage = storage_error_in(error)
        if storage is not None:  # a full disk or read-only directory is the user's to fix: exit 2
            return fail(f"lab: {storage_message(storage)}")
        print(f"lab: {one_line(str(error))} (LAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    except CheckpointError as error:
        return fail(f"lab: {error}")
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as error:
        if debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        if isinstance(error, OSError) and storage_error_in(error) is error:
            message = storage_message(error)
        return fail(f"lab: {one_line(str(message))}")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(jsonable(result)))
    return 0


def storage_message(error: OSError) -> str:
    """``cannot write PATH: <reason in words>`` for any OSError of a full disk or read-only directory."""
    from agents.checkpoint import StorageError

    if isinstance(error, StorageError) or not error.filename:
        return str(error)
    return str(StorageError(error.filename, error))


def fail(message: str) -> int:
    print(one_line(message), file=sys.stderr)
    return EXIT_USAGE


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def jsonable(value: Any) -> Any:
    """NaN is not JSON: report it as null."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        return jsonable(value.item())
    return value


if __name__ == "__main__":
    sys.exit(main())
