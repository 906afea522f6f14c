"""Mario environment throughput: the emulator limit, our vector env, and the SB3 baseline.

Run:  python -m benchmarks.env_throughput --seconds 10 --repeats 3 [--num-envs N] [--json out.json] [--overhead]

Measures, on the same machine in one run, with random actions (one every ``frame_skip`` frames):

  (a) emulator   raw nes-py ``SuperMarioBrosEnv.step`` with no wrappers, one process per core
  (b) ours       ``envs.make_vec("mario-1-1", N, backend="async")``: the full preprocessing stack
                 (4-frame skip with max-pool, native grayscale, 84x84, 4-frame stack, statistics)
                 in our shared-memory vector env, several envs per worker, one worker per core
  (c) sb3        Stable-Baselines3 ``SubprocVecEnv`` over Gymnasium's standard wrappers
                 (``MaxAndSkipObservation``, ``GrayscaleObservation``, ``ResizeObservation``,
                 ``FrameStackObservation``) and nes-py's ``JoypadSpace``, with the same N envs
  (d) gym-async  Gymnasium's ``AsyncVectorEnv`` (one env per process, shared memory) over our
                 stack, to show what several envs per worker buys

All rates are emulator frames per second (agent steps x frame skip for b, c, d). The systems are
measured in turn, repeat after repeat, so that a load change on a shared machine hits all of them;
the medians of the repeats are reported. Targets: (b) >= 0.85 (a) and (b) >= 1.3 (c).

Also reported: frames per CPU-second (the main process and its workers, user + system time).
On a machine that other jobs share, wall-clock rates depend on how many processes a system runs
(the scheduler shares the cores per process: 8 single-env processes get more of a busy machine
than 2 workers do); CPU-normalised rates measure the work each system needs per frame instead.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

STAGE = "SuperMarioBros-1-1-v0"
PRESET = "mario-1-1"
FRAME_SKIP = 4
NUM_ACTIONS = 7  # SIMPLE_MOVEMENT
SYSTEMS = ("emulator", "ours", "sb3", "gym-async")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line(module: str) -> str:
    """The command line that started this run, as a user would retype it.

    ``sys.argv`` is ``[".../train_throughput.py", ...]`` under ``python -m`` and ``[".../lab", "bench",
    "train", ...]`` under the ``lab`` command.
    """
    program = Path(sys.argv[0]).name
    if program.endswith(".py"):
        return shlex.join(["python", "-m", module, *sys.argv[1:]])
    return shlex.join([program, *sys.argv[1:]])


def package_versions() -> dict[str, str]:
    names = [
        "gymnasium",
        "nes-py",
        "gym-super-mario-bros",
        "stable_baselines3",
        "numpy",
        "opencv-python-headless",
    ]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _process_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the given (child) processes, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # the fields after "pid (comm)"
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


# -- (a) the emulator limit -----------------------------------------------------------------------


def _emulator_worker(seconds: float, seed: int, barrier: Any, results: Any) -> None:
    import gym_super_mario_bros  # noqa: F401
    import gymnasium as gym
    from gym_super_mario_bros.actions import SIMPLE_MOVEMENT
    from nes_py.wrappers import JoypadSpace

    # The button bytes of the same action set, so that the game goes the same way as in (b) and (c).
    codes = [sum(JoypadSpace._button_map[button] for button in combo) for combo in SIMPLE_MOVEMENT]
    env = gym.make(STAGE).unwrapped  # no wrappers at all
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    barrier.wait()
    frames, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        action = codes[rng.integers(NUM_ACTIONS)]
        for _ in range(FRAME_SKIP):
            _, _, terminated, truncated, _ = env.step(action)
            frames += 1
            if terminated or truncated:
                env.reset()
                break
    results.put((frames, time.perf_counter() - start, time.process_time() - cpu_start))
    env.close()


def measure_emulator(seconds: float, processes: int) -> tuple[float, float]:
    """Total frames/s of ``processes`` processes each stepping a bare SuperMarioBrosEnv, and frames per CPU-second."""
    barrier, results = mp.Barrier(processes), mp.Queue()
    workers = [
        mp.Process(target=_emulator_worker, args=(seconds, seed, barrier, results))
        for seed in range(processes)
    ]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=seconds + 120) for _ in workers]  # (frames, seconds, cpu seconds)
    for worker in workers:
        worker.join()
    rate = sum(frames / elapsed for frames, elapsed, _ in reports)
    return rate, sum(frames for frames, _, _ in reports) / sum(cpu for _, _, cpu in reports)


# -- (b), (c), (d): vector envs ---------------------------------------------------------------------


def _time_vector_env(
    vec_env: Any, num_envs: int, seconds: float, pids: list[int], sb3: bool = False
) -> tuple[float, float]:
    """Frames/s of a vector env stepped with random actions for ``seconds`` (after a warm-up),
    and frames per CPU-second of the main process and the workers ``pids`` together."""
    rng = np.random.default_rng(0)
    if sb3:
        vec_env.seed(0)
        vec_env.reset()
    else:
        vec_env.reset(seed=0)
    for _ in range(10):  # warm-up: first steps touch lazily allocated memory
        vec_env.step(rng.integers(0, NUM_ACTIONS, num_envs))
    steps, start = 0, time.perf_counter()
    cpu_start = time.process_time() + _process_cpu_seconds(pids)
    while time.perf_counter() - start < seconds:
        vec_env.step(rng.integers(0, NUM_ACTIONS, num_envs))
        steps += 1
    elapsed = time.perf_counter() - start
    cpu = time.process_time() + _process_cpu_seconds(pids) - cpu_start
    frames = steps * num_envs * FRAME_SKIP
    return frames / elapsed, frames / cpu


def measure_ours(seconds: float, num_envs: int, envs_per_worker: int | None) -> tuple[float, float]:
    import envs

    vec_env = envs.make_vec(PRESET, num_envs, seed=0, backend="async", envs_per_worker=envs_per_worker)
    try:
        return _time_vector_env(vec_env, num_envs, seconds, [p.pid for p in vec_env._processes])
    finally:
        vec_env.close()


def measure_gym_async(seconds: float, num_envs: int) -> tuple[float, float]:
    from gymnasium.vector import AsyncVectorEnv, AutoresetMode

    from envs.factory import _make_seeded

    env_fns = [partial(_make_seeded, PRESET, index, {}) for index in range(num_envs)]
    vec_env = AsyncVectorEnv(env_fns, shared_memory=True, autoreset_mode=AutoresetMode.SAME_STEP)
    try:
        return _time_vector_env(vec_env, num_envs, seconds, [p.pid for p in vec_env.processes])
    finally:
        vec_env.close()


def make_sb3_style_env() -> Any:
    """The usual Gymnasium-wrapper Mario stack: JoypadSpace + MaxAndSkip + Grayscale + Resize + FrameStack."""
    import gym_super_mario_bros  # noqa: F401
    import gymnasium as gym
    from gym_super_mario_bros.actions import SIMPLE_MOVEMENT
    from gymnasium.wrappers import (
        FrameStackObservation,
        GrayscaleObservation,
        MaxAndSkipObservation,
        ResizeObservation,
    )
    from nes_py.wrappers import JoypadSpace

    env = gym.make(STAGE)
    env = JoypadSpace(env, SIMPLE_MOVEMENT)
    env = MaxAndSkipObservation(env, skip=FRAME_SKIP)
    env = GrayscaleObservation(env, keep_dim=False)
    env = ResizeObservation(env, (84, 84))
    return FrameStackObservation(env, stack_size=4)


def measure_sb3(seconds: float, num_envs: int) -> tuple[float, float]:
    from stable_baselines3.common.vec_env import SubprocVecEnv

    vec_env = SubprocVecEnv([make_sb3_style_env] * num_envs)
    try:
        return _time_vector_env(vec_env, num_envs, seconds, [p.pid for p in vec_env.processes], sb3=True)
    finally:
        vec_env.close()


def measure_vector_overhead(seconds: float, num_envs: int) -> dict[str, dict[str, float]]:
    """Vector steps/s and main-process CPU per step on CartPole, whose step costs ~10 us: what is left
    is the vector env's own overhead (pipes, pickling, info merging, process wake-ups)."""
    from gymnasium.vector import AsyncVectorEnv, AutoresetMode

    import envs
    from envs.factory import _make_seeded

    results = {}
    for kind in ("sync", "ours", "gym-async"):
        if kind == "gym-async":
            env_fns = [partial(_make_seeded, "cartpole", index, {}) for index in range(num_envs)]
            vec_env = AsyncVectorEnv(env_fns, shared_memory=True, autoreset_mode=AutoresetMode.SAME_STEP)
        else:
            vec_env = envs.make_vec(
                "cartpole", num_envs, seed=0, backend="sync" if kind == "sync" else "async"
            )
        try:
            vec_env.reset(seed=0)
            rng = np.random.default_rng(0)
            steps, start, cpu_start = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - start < seconds:
                vec_env.step(rng.integers(0, 2, num_envs))
                steps += 1
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        finally:
            vec_env.close()
        results[kind] = {"steps_per_second": steps / elapsed, "main_cpu_us_per_step": 1e6 * cpu / steps}
    return results


# -- the run ---------------------------------------------------------------------------------------


def _ratios(medians: dict[str, float]) -> dict[str, float]:
    ratios = {}
    for other in ("emulator", "sb3", "gym-async"):
        if "ours" in medians and other in medians:
            ratios[f"ours/{other}"] = medians["ours"] / medians[other]
    return ratios


def run(seconds: float, repeats: int, num_envs: int, envs_per_worker: int | None, systems: list[str]) -> dict:
    from envs.vector import available_cpus

    cpus = available_cpus()
    wall: dict[str, list[float]] = {system: [] for system in systems}
    per_cpu: dict[str, list[float]] = {system: [] for system in systems}
    load_before = os.getloadavg()
    for repeat in range(repeats):
        for system in systems:
            if system == "emulator":
                rate, efficiency = measure_emulator(seconds, cpus)
            elif system == "ours":
                rate, efficiency = measure_ours(seconds, num_envs, envs_per_worker)
            elif system == "sb3":
                rate, efficiency = measure_sb3(seconds, num_envs)
            else:
                rate, efficiency = measure_gym_async(seconds, num_envs)
            wall[system].append(rate)
            per_cpu[system].append(efficiency)
            print(
                f"  repeat {repeat + 1}/{repeats}  {system:<10} {rate:7.0f} frames/s  {efficiency:7.0f} frames/CPU-s"
                f"  load {os.getloadavg()[0]:.1f}",
                file=sys.stderr,
                flush=True,
            )
    medians = {system: statistics.median(values) for system, values in wall.items()}
    cpu_medians = {system: statistics.median(values) for system, values in per_cpu.items()}
    return {
        "command": command_line("benchmarks.env_throughput"),
        "machine": {
            "cpus": cpus,
            "nproc": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": package_versions(),
        "settings": {
            "seconds": seconds,
            "repeats": repeats,
            "num_envs": num_envs,
            "envs_per_worker": envs_per_worker,
            "frame_skip": FRAME_SKIP,
            "stage": STAGE,
        },
        "frames_per_second": {
            system: {"median": medians[system], "samples": wall[system]} for system in systems
        },
        "frames_per_cpu_second": {
            system: {"median": cpu_medians[system], "samples": per_cpu[system]} for system in systems
        },
        "ratios": _ratios(medians),
        "ratios_per_cpu_second": _ratios(cpu_medians),
        "targets": {"ours/emulator": 0.85, "ours/sb3": 1.3},
    }


def print_report(result: dict) -> None:
    machine, versions = result["machine"], result["versions"]
    print(f"command: {result['command']}")
    print(
        f"machine: {machine['cpus']} cpus, {machine['cpu_model']}, {machine['platform']}; "
        f"load average before {machine['load_average_before']}, after {machine['load_average_after']}"
    )
    print("versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    print(f"settings: {result['settings']}")
    print(f"{'system':<12}{'frames/s':>10}{'frames/CPU-s':>14}   samples (frames/s)")
    for system, entry in result["frames_per_second"].items():
        samples = ", ".join(f"{value:.0f}" for value in entry["samples"])
        efficiency = result["frames_per_cpu_second"][system]["median"]
        print(f"{system:<12}{entry['median']:>10.0f}{efficiency:>14.0f}   [{samples}]")
    print(f"{'ratio':<16}{'frames/s':>10}{'frames/CPU-s':>14}")
    for name, value in result["ratios"].items():
        target = result["targets"].get(name)
        verdict = "" if target is None else f"   target >= {target}: {'met' if value >= target else 'MISSED'}"
        print(f"{name:<16}{value:>10.3f}{result['ratios_per_cpu_second'][name]:>14.3f}{verdict}")
    if "vector_overhead_cartpole" in result:
        print(f"vector env overhead, CartPole x {result['settings']['num_envs']}:")
        for kind, entry in result["vector_overhead_cartpole"].items():
            print(
                f"  {kind:<10}{entry['steps_per_second']:>8.0f} steps/s"
                f"{entry['main_cpu_us_per_step']:>8.0f} us main-process CPU per step"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per system and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats (the median is reported)")
    parser.add_argument(
        "--num-envs", type=int, default=None, help="envs for b, c, d (default: max(8, 2 x cpus))"
    )
    parser.add_argument(
        "--envs-per-worker", type=int, default=None, help="ours: envs per worker (default: per core)"
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")
    parser.add_argument(
        "--overhead", action="store_true", help="also measure the vector envs' own overhead on CartPole"
    )
    args = parser.parse_args(argv)
    systems = [system.strip() for system in args.systems.split(",") if system.strip()]
    unknown = [system for system in systems if system not in SYSTEMS]
    if unknown or args.seconds <= 0 or args.repeats < 1:
        parser.error(f"bad --systems {unknown}, --seconds or --repeats; systems: {', '.join(SYSTEMS)}")
    from envs.vector import available_cpus

    num_envs = args.num_envs or max(8, 2 * available_cpus())
    result = run(args.seconds, args.repeats, num_envs, args.envs_per_worker, systems)
    if args.overhead:
        result["vector_overhead_cartpole"] = measure_vector_overhead(args.seconds, num_envs)
    print_report(result)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
