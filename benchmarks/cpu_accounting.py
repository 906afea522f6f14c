"""Where a training system's CPU time goes: one ``train_throughput`` child at a time, with the CPU time
of its process tree read from /proc every second, split by role (the trainer process's main thread,
its other threads, such as PPO's learner thread, and its worker processes), over a steady window that
leaves out start-up and the end (a last update with no rollout to hide behind, the final eval).

    python -m benchmarks.cpu_accounting --systems ppo-ours-overlap,ppo-sb3 --updates 16

For each system it reports agent steps/s (the child's own timing, as in ``train_throughput``), how
many cores the tree kept busy, the CPU-seconds each role spent per 1024 agent steps, and the rate the
system would reach if that work kept every core busy (``ceiling``): the most that a better schedule
of the same work could give. Ratios of one system's ceiling to another's measured rate bound what
scheduling alone could still win. Linux only (/proc); the numbers are user + system time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import train_throughput

REPORT_STEPS = 1024  # CPU time is reported per this many agent steps (one rollout of the benchmark)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(stat_path: str) -> float:
    """User + system CPU seconds from a /proc stat file (fields 14 and 15)."""
    with open(stat_path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_cpu_seconds(pid: int) -> dict[int, tuple[float, float]]:
    """For ``pid`` and each of its descendants: (CPU seconds of the whole process, of its main thread).

    The whole-process figure includes threads that have already ended (a learner thread started
    per update would otherwise drop out of the count), so a process's other threads are the
    difference of the two.
    """
    seconds = {}
    for process in train_throughput.descendants(pid):
        try:
            seconds[process] = (
                _cpu_seconds(f"/proc/{process}/stat"),
                _cpu_seconds(f"/proc/{process}/task/{process}/stat"),
            )
        except OSError:
            continue  # the process ended between listing and reading
    return seconds


def account(
    samples: list[tuple[float, dict[int, tuple[float, float]]]], root: int, skip: float, tail: float
) -> dict[str, Any]:
    """The CPU seconds of each role between the first sample ``skip`` s after the start and the last
    one ``tail`` s before the end. ValueError when the run was too short for that window."""
    window = [sample for sample in samples if samples[0][0] + skip <= sample[0] <= samples[-1][0] - tail]
    lasted = samples[-1][0] - samples[0][0] if samples else 0.0
    if len(window) < 2:
        raise ValueError(f"the run lasted {lasted:.0f} s: too short for --skip and --tail")
    (first_time, first), (last_time, last) = window[0], window[-1]
    roles = {"main thread": 0.0, "other threads": 0.0, "worker processes": 0.0}
    for process, (total, main) in last.items():
        total_before, main_before = first.get(process, (0.0, 0.0))
        if process != root:
            roles["worker processes"] += total - total_before
        else:
            roles["main thread"] += main - main_before
            roles["other threads"] += (total - main) - (total_before - main_before)
    return {"window_seconds": last_time - first_time, "cpu_seconds": roles}


def measure(system: str, settings: dict[str, Any], skip: float, tail: float) -> dict[str, Any]:
    """Runs ``system`` as a train_throughput child and accounts for its CPU time."""
    samples: list[tuple[float, dict[int, tuple[float, float]]]] = []
    root = 0  # the child's pid, once it is sampled

    def sample(pid: int) -> None:
        nonlocal root
        root = pid
        samples.append((time.monotonic(), process_cpu_seconds(pid)))

    # At once, then every second.
    result = train_throughput.run_child_process(
        system, settings, sample, itertools.chain([0.0], itertools.repeat(1.0))
    )
    rate = result["rate"]
    accounted = account(samples, root, skip, tail)
    window, cpu = accounted["window_seconds"], accounted["cpu_seconds"]
    cores = len(os.sched_getaffinity(0))  # the cores this process may use, as the children do
    per_steps = {role: seconds / window * REPORT_STEPS / rate for role, seconds in cpu.items()}
    total = sum(per_steps.values())
    return {
        "rate": rate,
        "window_seconds": window,
        "cores_busy": sum(cpu.values()) / window,
        f"cpu_seconds_per_{REPORT_STEPS}_steps": per_steps,
        "total_cpu_seconds": total,
        "ceiling": REPORT_STEPS / (total / cores),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--systems",
        default="ppo-ours-overlap,ppo-sb3",
        help=f"comma-separated train_throughput systems (choose from {', '.join(train_throughput.ALL_SYSTEMS)})",
    )
    parser.add_argument("--updates", type=int, default=16, help="PPO updates per run (default 16)")
    parser.add_argument("--dqn-steps", type=int, default=6000, help="DQN agent steps per run (default 6000)")
    parser.add_argument("--skip", type=float, default=15.0, help="seconds left out at the start (default 15)")
    parser.add_argument("--tail", type=float, default=10.0, help="seconds left out at the end (default 10)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")
    args = parser.parse_args(argv)
    base = train_throughput.build_parser().parse_args(
        [
            f"--systems={args.systems}",
            f"--updates={args.updates}",
            f"--dqn-steps={args.dqn_steps}",
            f"--device={args.device}",
        ]
    )
    try:
        systems, settings = train_throughput.settings_from_args(base)
    except ValueError as error:
        parser.error(str(error))
    if args.skip < 0 or args.tail < 0:
        parser.error("--skip and --tail must not be negative")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json: folder {Path(args.json).resolve().parent} does not exist")
    results = {}
    for system in systems:
        try:
            results[system] = entry = measure(system, settings, args.skip, args.tail)
        except RuntimeError as error:
            print(f"{system}: {error}", file=sys.stderr)
            return 1
        except ValueError as error:  # a window longer than the run: the arguments' fault
            print(f"{system}: {error}", file=sys.stderr)
            return 2
        roles = ", ".join(
            f"{role} {seconds:.2f}"
            for role, seconds in entry[f"cpu_seconds_per_{REPORT_STEPS}_steps"].items()
        )
        print(
            f"{system:<22} {entry['rate']:7.1f} {train_throughput.rate_unit(system)}  {entry['cores_busy']:.2f} cores busy  "
            f"CPU-s per {REPORT_STEPS} steps {entry['total_cpu_seconds']:.2f} ({roles})  "
            f"ceiling {entry['ceiling']:.0f} steps/s",
            flush=True,
        )
    if "ppo-ours-overlap" in results and "ppo-sb3" in results:
        bound = results["ppo-ours-overlap"]["ceiling"] / results["ppo-sb3"]["rate"]
        print(f"ppo-ours-overlap ceiling / ppo-sb3 rate: {bound:.2f}")
    if args.json:  # written whole or not at all: a temporary file renamed over the target
        path = Path(args.json)
        partial = path.with_name(path.name + ".partial")
        report = {"command": " ".join(sys.argv), "settings": settings, "systems": results}
        partial.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(partial, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
