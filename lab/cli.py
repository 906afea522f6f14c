"""``lab``: the one command line of the agent lab.

    lab train PRESET_OR_ENV_ID [--algo ppo|dqn] [--net NAME] [--steps N] [--envs N] [--seed S]
              [--device auto|cpu|cuda] [--run-dir DIR] [--resume DIR] [--set key=value ...]
              [--until METRIC=VALUE] [--json]
    lab eval RUN_OR_CKPT [RUN_OR_CKPT ...] [--episodes N] [--sticky P] [--stochastic]
              [--table [--sticky-episodes M]] [--save] [--json]
    lab watch RUN_OR_CKPT [--episodes N] [--out FILE.mp4|.gif] [--explain METHOD]
              [--human [--speed X] [--scale N] [--follow]]
    lab explain RUN_OR_CKPT [--method NAME] [--episodes N] [--out FILE] [--no-checks] [--human] [--json]
    lab compress RUN --method distil|prune|quantize [--student NET] [--sparsity S] [--steps N] [--out DIR]
    lab sweep PRESET_OR_ENV --param NAME=SPEC ... [--seeds K] [--samples N] [--scheduler asha|none]
    lab compare RUN_OR_SWEEP_DIR ... [--metric M] [--out FILE.png] [--json]
    lab fit TASK [--net NAME] [--engine torch|scratch] [--procs N] [--epochs N] [--set key=value ...]
    lab fit --resume DIR [--epochs N]
    lab export RUN_DIR OUT_DIR
    lab bench [train|fit|...]
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
import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from core.errors import CheckpointError, TrainingStopped
from lab.arguments import (
    STOCHASTIC_HELP,
    add_repeatable,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from lab.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    UsageError,
    fail,
    one_line,
    reader_gone,
    storage_error_in,
    storage_message,
)


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
        "--until",
        default=None,
        metavar="METRIC=VALUE",
        help="stop once a periodic greedy eval reaches it, e.g. clear_rate=0.9, and a second eval of as many "
        "episodes confirms it (their mean; sets eval_every if unset)",
    )
    add_repeatable(
        train, "--set", "override any config field (repeatable); see `lab train ENV --help-config`"
    )
    train.add_argument("--help-config", action="store_true", help="list the config fields and exit")
    train.add_argument("--json", action="store_true", help="print one JSON summary as the last line")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("eval", help="play greedy episodes with a trained agent")
    evaluate.add_argument(
        "run",
        metavar="RUN_OR_CKPT",
        nargs="+",
        help="run directory or checkpoint file; several: the comparison table (lab compress) of them all",
    )
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
    evaluate.add_argument(
        "--stage",
        default=None,
        metavar="W-S",
        help="a multi-stage preset's stage alone, e.g. 1-3, with the seeds it gets in the full evaluation",
    )
    evaluate.add_argument("--stochastic", action="store_true", help=STOCHASTIC_HELP)
    evaluate.add_argument(
        "--sticky",
        type=probability,
        default=None,
        metavar="P",
        help="Mario: repeat the previous action on each frame with probability P (ALE v5 uses 0.25)",
    )
    evaluate.add_argument(
        "--table",
        action="store_true",
        help="the comparison table even for one run: parameters, bytes, latency, greedy and sticky clear rates",
    )
    evaluate.add_argument(
        "--sticky-episodes",
        type=non_negative_int,
        default=50,
        help="table: episodes with sticky actions (p = --sticky, default 0.25) per run (default 50)",
    )
    evaluate.add_argument(
        "--latency-calls",
        type=positive_int,
        default=600,
        help="table: timed batch-1 calls per run (default 600)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON summary as the last line")

    watch = commands.add_parser("watch", help="record rollouts of a trained agent to MP4/GIF, or show them")
    watch.add_argument("run", metavar="RUN_OR_CKPT", help="run directory or checkpoint file")
    watch.add_argument(
        "--episodes", type=positive_int, default=None, help="episodes to play (default 1; --follow: no end)"
    )
    watch.add_argument("--out", default=None, help="output .mp4 or .gif (default: RUN/videos/watch.mp4)")
    watch.add_argument("--human", action="store_true", help="open a window instead of writing a file")
    watch.add_argument(
        "--speed", type=positive_float, default=None, help="--human: times the game's own speed (default 1)"
    )
    watch.add_argument(
        "--scale", type=positive_int, default=None, help="--human: enlarge the picture N times (default: fit)"
    )
    watch.add_argument(
        "--follow",
        action="store_true",
        help="--human: keep playing, loading the newest checkpoint of a run still training between episodes",
    )
    watch.add_argument("--stochastic", action="store_true", help=STOCHASTIC_HELP)
    watch.add_argument(
        "--small",
        action="store_true",
        help="half size, every other frame (a GIF of a few hundred KB for a README)",
    )
    watch.add_argument(
        "--stage",
        default=None,
        metavar="W-S",
        help="a multi-stage preset's stage to play, e.g. 1-3 (default: drawn)",
    )
    watch.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the env: episode k starts with seed + k"
    )
    watch.add_argument(
        "--deterministic-start",
        action="store_true",
        help="Mario: the stage's saved start, no random no-ops (default: lab eval's starts and stall cut-off)",
    )
    watch.add_argument(
        "--max-steps", type=positive_int, default=5000, help="stop an episode after this many steps"
    )
    watch.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    watch.add_argument(
        "--explain",
        default=None,
        metavar="METHOD",
        help="the game next to its attribution map, e.g. saliency (a shortcut to `lab explain --method`)",
    )
    watch.add_argument("--json", action="store_true", help="print one JSON summary as the last line")

    fit = commands.add_parser("fit", help="run a supervised task (see `lab list tasks`)")
    fit.add_argument(
        "task", nargs="?", metavar="TASK", help="xor, playground, digits, sequence, sentiment, ssl, lm, optim"
    )
    fit.add_argument("--net", default=None, help="network from nets/ (see `lab list nets`)")
    fit.add_argument("--epochs", type=positive_int, default=None, help="training epochs")
    fit.add_argument("--seed", type=non_negative_int, default=None, help="random seed")
    fit.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    fit.add_argument(
        "--engine",
        choices=["torch", "scratch"],
        default=None,
        help="torch, or scratch: the numpy autograd engine of scratch/ (xor, playground, digits, optim)",
    )
    fit.add_argument(
        "--procs",
        type=positive_int,
        default=1,
        help="data parallelism: train in N processes launched with torchrun (gloo on CPU, NCCL on GPUs); "
        "batch_size stays the batch of one step; --set shard=true shards the model (FSDP2)",
    )
    fit.add_argument("--run-dir", default=None, help="output directory (default: runs/fit-<task>-<time>)")
    fit.add_argument(
        "--resume", default=None, metavar="DIR", help="continue the run in DIR (--epochs may raise its total)"
    )
    add_repeatable(fit, "--set", "override any config field (repeatable); see `lab fit TASK --help-config`")
    fit.add_argument("--help-config", action="store_true", help="list the config fields and exit")
    fit.add_argument("--json", action="store_true", help="print one JSON summary as the last line")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")

    bench = commands.add_parser("bench", help="throughput side by side with Stable-Baselines3")
    bench.add_argument(
        "what",
        nargs="?",
        default="env",
        choices=["env", "train", "fit"],
        help="env: Mario env stack vs emulator and SB3; train: PPO/DQN agent steps/s vs SB3 (minutes); "
        "fit: tokens/s and memory of the fit loop's levers on the lm GPT (--systems picks levers)",
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

    from lab import explain as explain_command

    explain_command.add_arguments(
        commands.add_parser("explain", help="attribution maps of an agent or model, with faithfulness checks")
    )
    from lab import compress as compress_command

    compress_command.add_arguments(
        commands.add_parser("compress", help="distil, prune or quantise a trained agent into a new run")
    )
    from lab import sweep as sweep_command

    sweep_command.add_arguments(
        commands.add_parser("sweep", help="a hyperparameter sweep on Ray Tune (ASHA, seeds, --resume)")
    )
    from lab import compare as compare_command

    compare_command.add_arguments(
        commands.add_parser("compare", help="runs grouped by configuration: curves, IQM, P(improvement)")
    )
    commands.add_parser("demo", help="the flagship demo on the shipped defaults")
    return parser


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

# Each command lives in its own module, imported only when it runs (``lab --help`` stays fast).
COMMANDS = {
    "train": "lab.train:cmd_train",
    "eval": "lab.play:cmd_eval",
    "compress": "lab.compress:cmd_compress",
    "watch": "lab.play:cmd_watch",
    "export": "lab.play:cmd_export",
    "demo": "lab.demo:cmd_demo",
    "fit": "lab.fit:cmd_fit",
    "bench": "lab.bench:cmd_bench",
    "list": "lab.listing:cmd_list",
    "sweep": "lab.sweep:cmd_sweep",
    "compare": "lab.compare:cmd_compare",
    "explain": "lab.explain:cmd_explain",
}


def command(name: str) -> Callable[[argparse.Namespace], Any]:
    module, function = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), function)


def env_workers_failed(error: BaseException) -> bool:
    """Whether ``error`` is an ``envs.vector.EnvWorkerError``. That module is loaded whenever one was
    raised; importing it up front would load the envs (0.3 s) for every ``lab --help``."""
    vector = sys.modules.get("envs.vector")
    return vector is not None and isinstance(error, vector.EnvWorkerError)


def main(argv: list[str] | None = None) -> int:
    """Runs ``lab``; returns the exit status (0 ok, 1 a run that failed, 2 bad input, 130 interrupted,
    141 the reader of the output went away)."""
    debug = os.environ.get("LAB_DEBUG") == "1"
    # A path or name the terminal cannot encode must not turn finished work into an error.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
        result = command(args.command)(args)
    except UsageError as error:
        return fail(str(error))
    except RuntimeError as error:  # a run that stopped, or its env workers that failed for good
        if debug or not (isinstance(error, TrainingStopped) or env_workers_failed(error)):
            raise
        storage = storage_error_in(error)
        if storage is not None:  # a full disk or read-only directory is the user's to fix: exit 2
            return fail(f"lab: {storage_message(storage)}")
        print(f"lab: {one_line(str(error))} (LAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    except CheckpointError as error:
        return fail(f"lab: {error}")
    except BrokenPipeError:
        return reader_gone()
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
    try:
        if getattr(args, "json", False) and result is not None:
            from core.files import jsonable

            print(json.dumps(jsonable(result)))
        sys.stdout.flush()  # a reader gone away shows here, not as an error at the exit's flush
    except BrokenPipeError:
        return reader_gone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
