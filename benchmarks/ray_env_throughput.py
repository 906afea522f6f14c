"""Mario env steps/s: the subprocess vector env next to the Ray one, on the same machine, in one run.

Run:  python -m benchmarks.ray_env_throughput --seconds 8 --repeats 3 [--envs 8] [--envs-per-worker N]
      [--address ADDRESS] [--json [PATH]]

Both back-ends step the same ``num_envs`` copies of ``mario-1-1`` (the full preprocessing stack of
``envs.make``) in groups of ``envs_per_worker``, with uniformly random actions:

  subproc  ``envs.vector.SubprocVectorEnv``: worker processes, observations in shared memory
  ray      ``envs.ray_vector.RayVectorEnv``: Ray actors on a local Ray (or ``--address``),
           observations in Ray's replies

Both vector envs are built once and then measured in turn, repeat after repeat, alternating which
goes first, so that a load change on a shared machine hits both; the medians of the repeats and
their ratio (ray / subproc, target >= 0.85) are reported, with the median of the per-repeat
ratios. Also reported: the main process's CPU time per vector step (all its threads: Ray's
included), the cost each back-end adds where the learner runs, and frames per CPU-second of the
main process and the workers (Ray's own daemons, raylet and GCS, are not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from importlib import metadata
from typing import Any

import numpy as np

PRESET = "mario-1-1"
FRAME_SKIP = 4
SYSTEMS = ("subproc", "ray")
TARGET_RATIO = 0.85
WARMUP_STEPS = 10


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the given processes (this machine's), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # the fields after "pid (comm)"
        except OSError:  # an actor on another node: its CPU time is not visible from here
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("ray", "gymnasium", "nes-py", "gym-super-mario-bros", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def measure(vec: Any, worker_pids: list[int], seconds: float, rng: np.random.Generator) -> dict[str, float]:
    """Steps ``vec`` with random actions for ``seconds``; rates and CPU costs of that stretch."""
    num_envs, num_actions = vec.num_envs, int(vec.single_action_space.n)
    for _ in range(WARMUP_STEPS):  # after the other back-end ran, caches and the scheduler settle
        vec.step(rng.integers(0, num_actions, num_envs))
    steps = 0
    workers_before = _cpu_seconds(worker_pids)
    main_before = time.process_time()
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        vec.step(rng.integers(0, num_actions, num_envs))
        steps += 1
    main_cpu = time.process_time() - main_before
    total_cpu = main_cpu + _cpu_seconds(worker_pids) - workers_before
    return {
        "env_steps_per_second": steps * num_envs / elapsed,
        "main_cpu_us_per_step": main_cpu / steps * 1e6,
        "frames_per_cpu_second": steps * num_envs * FRAME_SKIP / max(total_cpu, 1e-9),
    }


def run(
    seconds: float, repeats: int, num_envs: int, envs_per_worker: int, address: str | None, seed: int = 0
) -> dict[str, Any]:
    """Builds both vector envs, measures them in turn ``repeats`` times, returns the summary."""
    from envs.factory import _make_seeded
    from envs.ray_vector import RayVectorEnv, ensure_ray
    from envs.vector import SubprocVectorEnv

    env_fns = [partial(_make_seeded, PRESET, seed + index, {}) for index in range(num_envs)]
    load_start = os.getloadavg()[0]
    # The subprocess workers fork before Ray starts its threads in this process.
    subproc = SubprocVectorEnv(env_fns, envs_per_worker=envs_per_worker, seed=seed)
    ensure_ray(address)
    remote = RayVectorEnv(env_fns, envs_per_worker=envs_per_worker, seed=seed)
    vecs = {"subproc": subproc, "ray": remote}
    pids = {"subproc": [process.pid for process in subproc._processes], "ray": remote.actor_pids()}
    samples: dict[str, list[dict[str, float]]] = {system: [] for system in SYSTEMS}
    rng = np.random.default_rng(seed)
    try:
        for vec in vecs.values():
            vec.reset(seed=seed)
        for repeat in range(repeats):
            order = SYSTEMS if repeat % 2 == 0 else SYSTEMS[::-1]
            for system in order:
                samples[system].append(measure(vecs[system], pids[system], seconds, rng))
                rate = samples[system][-1]["env_steps_per_second"]
                print(f"repeat {repeat + 1}/{repeats} {system:<8} {rate:8.1f} env steps/s", file=sys.stderr)
    finally:
        subproc.close()
        remote.close()

    def medians(key: str) -> dict[str, float]:
        return {system: statistics.median(sample[key] for sample in samples[system]) for system in SYSTEMS}

    rates = medians("env_steps_per_second")
    paired = [
        ray_sample["env_steps_per_second"] / subproc_sample["env_steps_per_second"]
        for ray_sample, subproc_sample in zip(samples["ray"], samples["subproc"], strict=True)
    ]
    ratio = rates["ray"] / rates["subproc"]
    return {
        "benchmark": "ray_env_throughput",
        "command": " ".join(["python -m benchmarks.ray_env_throughput", *sys.argv[1:]]),
        "settings": {
            "preset": PRESET,
            "num_envs": num_envs,
            "envs_per_worker": envs_per_worker,
            "seconds": seconds,
            "repeats": repeats,
            "address": address,
            "cpus": os.cpu_count(),
            "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        },
        "versions": _versions(),
        "env_steps_per_second": {
            system: {"median": rates[system], "samples": [s["env_steps_per_second"] for s in samples[system]]}
            for system in SYSTEMS
        },
        "main_cpu_us_per_step": medians("main_cpu_us_per_step"),
        "frames_per_cpu_second": medians("frames_per_cpu_second"),
        "ratio_ray_over_subproc": ratio,
        "ratio_per_repeat_median": statistics.median(paired),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
    }


def print_report(result: dict[str, Any]) -> None:
    settings = result["settings"]
    print(
        f"Mario {settings['preset']}: {settings['num_envs']} envs, {settings['envs_per_worker']} per worker, "
        f"{settings['repeats']} x {settings['seconds']:g} s, load {settings['load_average']['start']:.1f}"
        f" -> {settings['load_average']['end']:.1f}"
    )
    print(f"{'system':<10}{'env steps/s':>12}{'main CPU/step':>15}{'frames/CPU-s':>14}   samples")
    for system in SYSTEMS:
        entry = result["env_steps_per_second"][system]
        samples = ", ".join(f"{value:.1f}" for value in entry["samples"])
        print(
            f"{system:<10}{entry['median']:>12.1f}{result['main_cpu_us_per_step'][system]:>12.0f} us"
            f"{result['frames_per_cpu_second'][system]:>14.0f}   [{samples}]"
        )
    verdict = "met" if result["target_met"] else "MISSED"
    print(
        f"ray / subproc: {result['ratio_ray_over_subproc']:.3f} (median of per-repeat ratios "
        f"{result['ratio_per_repeat_median']:.3f}); target >= {result['target_ratio']}: {verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per back-end and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats (medians are reported)")
    parser.add_argument("--envs", type=int, default=8, help="Mario envs in each vector env")
    parser.add_argument(
        "--envs-per-worker",
        type=int,
        default=None,
        help="envs per worker/actor (default: one worker per core)",
    )
    parser.add_argument("--address", default=None, help="Ray cluster (default: a local Ray)")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="print the result as JSON instead of the table (to PATH if given)",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.repeats < 1 or args.envs < 1:
        parser.error("--seconds, --repeats and --envs must be positive")
    from envs.vector import available_cpus

    envs_per_worker = args.envs_per_worker or -(-args.envs // available_cpus())  # ceil: one worker per core
    result = run(args.seconds, args.repeats, args.envs, envs_per_worker, args.address)
    if args.json is None:
        print_report(result)
    elif args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
