"""``lab bench``: throughput side by side with Stable-Baselines3 (the only command that imports
``benchmarks/``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lab.errors import UsageError


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    """``lab bench env`` (the env stack against the emulator and SB3) or ``lab bench train``."""
    from benchmarks import env_throughput, train_throughput
    from envs.vector import available_cpus

    if args.what == "fit":
        return bench_fit(args)
    if args.what == "env":
        result = env_throughput.run(
            args.seconds, args.repeats, max(8, 2 * available_cpus()), None, list(env_throughput.SYSTEMS)
        )
        if not args.json:
            env_throughput.print_report(result)
        return result
    argv = ["--repeats", str(args.repeats), "--device", args.device]
    if args.systems:
        argv += ["--systems", args.systems]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("lab bench train --device cuda: no CUDA device is available; use --device cpu")
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
        from agents.engine import TrainingStopped
        from core.files import jsonable

        if args.json:  # what was measured is still printed, then the run counts as failed
            print(json.dumps(jsonable(result)))
        failed = ", ".join(result["failures"])
        raise TrainingStopped(f"benchmark systems failed: {failed} (their errors are printed above)")
    return result


def bench_fit(args: argparse.Namespace) -> dict[str, Any]:
    """``lab bench fit [--systems fp32,bf16,...] [--device cpu|cuda]``: ``benchmarks/fit_levers.py``."""
    import torch

    from benchmarks import fit_levers

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("lab bench fit --device cuda: no CUDA device is available; use --device cpu")
    options = fit_levers.build_parser().parse_args(
        ["--device", args.device] + (["--levers", args.systems] if args.systems else [])
    )
    try:
        sizes = fit_levers.selection(options.sizes, fit_levers.SIZES, "size")
        levers = fit_levers.selection(options.levers, fit_levers.LEVERS, "lever")
    except ValueError as error:
        raise UsageError(f"lab bench fit: {error}") from None
    result = fit_levers.run(sizes, levers, options)
    if not args.json:
        fit_levers.print_report(result)
    return result
