"""``lab compress``: distil, prune or quantise a trained agent into a new run directory.

    lab compress RUN --method distil|prune|quantize [--student NET] [--structured] [--sparsity S]
                 [--steps N] [--out DIR] [--resume] [--set key=value ...] [--student-set key=value ...]
                 [--episodes N] [--sticky-episodes M] [--no-eval] [--json]

The new run loads like any other (``lab eval``, ``watch``, ``explain``, ``demo``). Unless
``--no-eval``, the command ends with the comparison table of the teacher and the result, measured
side by side (``compress.compare``); ``--json`` prints it with the run's summary.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from lab.errors import UsageError, require_writable, stoppable_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``lab compress`` (kept free of heavy imports: ``lab --help`` builds every parser)."""
    from lab.arguments import add_repeatable, non_negative_int, positive_int

    parser.add_argument(
        "run", metavar="RUN", nargs="?", help="the trained agent (run directory or checkpoint file)"
    )
    parser.add_argument("--method", default=None, help="distil, prune or quantize")
    parser.add_argument(
        "--student",
        default=None,
        metavar="NET",
        help="distil / prune --structured: the student's net (default nature-tiny / nature-half for images)",
    )
    parser.add_argument(
        "--structured",
        action="store_true",
        help="prune: cut whole channels and units to the student's widths",
    )
    parser.add_argument(
        "--sparsity", type=float, default=None, help="prune: fraction of weights set to zero, in (0, 1)"
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="frames to collect (distil 200k, prune 100k, quantize 4096 calibration frames)",
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="new run directory (default: RUN-METHOD)")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    add_repeatable(parser, "--set", "any compression setting (see --help-config), e.g. num_envs=4")
    add_repeatable(
        parser,
        "--student-set",
        "a field of the student's agent config, e.g. hidden=16 for a smaller MLP",
        dest="student_overrides",
    )
    parser.add_argument("--help-config", action="store_true", help="list the compression settings and exit")
    parser.add_argument(
        "--episodes", type=positive_int, default=20, help="table: greedy episodes (default 20)"
    )
    parser.add_argument(
        "--sticky-episodes",
        type=non_negative_int,
        default=50,
        help="table: sticky-action episodes (default 50)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=12345, help="table: seed of the eval envs")
    parser.add_argument("--no-eval", action="store_true", help="skip the comparison table")
    parser.add_argument("--json", action="store_true", help="print one JSON summary as the last line")


def cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the compression; returns its summary (with the comparison table unless ``--no-eval``)."""
    from compress import get_method
    from compress.agents import load_teacher
    from compress.pipeline import CompressConfig, check, compress
    from core.config import apply_overrides, validate

    if args.help_config:
        from lab.train import print_config_help

        print_config_help(CompressConfig())
        raise SystemExit(0)
    if args.run is None or args.method is None:
        raise UsageError("lab compress: give the RUN to compress and --method distil, prune or quantize")
    get_method(args.method)  # the unknown method is the first thing to report
    changes = {"method": args.method, "student": args.student, "sparsity": args.sparsity, "steps": args.steps}
    config = dataclasses.replace(CompressConfig(), **{k: v for k, v in changes.items() if v is not None})
    if args.structured:
        config = dataclasses.replace(config, structured=True)
    config = apply_overrides(config, args.overrides)
    validate(config)
    if config.structured and config.method != "prune":
        raise UsageError("lab compress: --structured applies to --method prune")
    if config.structured and args.sparsity is not None:
        raise UsageError(
            "lab compress: --sparsity applies to unstructured pruning; --structured cuts to the widths of --student"
        )
    if args.sparsity is not None and config.method != "prune":
        raise UsageError("lab compress: --sparsity applies to --method prune")
    teacher = load_teacher(args.run)  # not an agent: CheckpointError, exit 2
    if not args.resume:
        check(teacher, config, args.student_overrides)
    out = Path(args.out) if args.out else default_out(args.run, config)
    if args.resume:
        if not (out / "checkpoints").is_dir():
            raise UsageError(f"lab compress: --resume needs the run to continue in --out; {out} has none")
    elif out.exists() and any(out.iterdir()):
        raise UsageError(
            f"lab compress: {out} is not empty; choose another --out or continue it with --resume"
        )
    out.mkdir(parents=True, exist_ok=True)
    require_writable(out)
    with stoppable_run(lambda: f"the last checkpoint is in {out}; continue with --out {out} --resume"):
        result = compress(
            teacher, config, out, args.student_overrides, resume=args.resume, progress=not args.json
        )
    summary: dict[str, Any] = dataclasses.asdict(result)
    if not args.json:
        print(
            f"{result.method}: {result.run_dir} from {result.teacher} after {result.frames:,} frames in "
            f"{result.seconds:.0f} s; {result.parameters:,} parameters ({result.nonzero_parameters:,} non-zero) "
            f"against the teacher's {result.teacher_parameters:,}"
        )
    if not args.no_eval:
        from compress.compare import compare_runs, comparison_json, format_comparison

        rows, protocol = compare_runs(
            [result.teacher, result.run_dir],
            episodes=args.episodes,
            sticky_episodes=args.sticky_episodes,
            seed=args.seed,
            progress=None if args.json else print,
        )
        summary["table"] = comparison_json(rows, protocol)
        if not args.json:
            print(format_comparison(rows, protocol))
    return summary


def default_out(run: str, config: Any) -> Path:
    """``RUN-distil``, ``RUN-prune90``, ``RUN-channels`` or ``RUN-int8`` beside the teacher's run."""
    from core.runs import run_dir_of

    base = run_dir_of(run)
    if config.method == "quantize":
        suffix = "int8"
    elif config.method == "prune":
        suffix = "channels" if config.structured else f"prune{round(config.sparsity * 100)}"
    else:
        suffix = "distil"
    return base.with_name(f"{base.name}-{suffix}")
