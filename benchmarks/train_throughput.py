"""Training throughput side by side: our PPO and DQN against Stable-Baselines3's on the same Mario
env stack, with the same network, envs, rollout, batch sizes and replay ratio; plus the emulator
limit and a supervised line (digits CNN epoch against a plain torch loop).

    python -m benchmarks.train_throughput --repeats 3 --json /tmp/train_bench.json   (or: lab bench train)

Every system runs in its own child process (``--child NAME``), one after another within each
repeat, so that load changes on a shared machine hit all of them; medians over the repeats are
reported, and for each ratio also the ratio within each repeat and their median. What each number
means:

* **agent steps/s**: steps after a warm-up, so that start-up (process spawn, env boot, first
  allocation) is not counted for anyone. PPO: the updates after the first (rollout + learning,
  from the end of update 1 to the end of the last). DQN: the steps after ``learning_starts``
  (acting + replay sampling + one gradient step per ``train_freq`` agent steps, the same replay
  ratio for both).
* **peak memory**: the largest proportional set size (PSS, so shared pages are split, not
  counted twice) of the child and all its env processes, sampled every 10 s; on CUDA also
  ``torch.cuda.max_memory_allocated``.
* **emulator limit**: bare nes-py frames/s with one process per core, divided by the frame skip
  (4): the agent steps/s a trainer could reach if learning cost nothing.

The systems:

============================  ======================================================================
ppo-ours                      ``agents.ppo.train`` with the Mario preset but serial (``overlap=False``,
                              ``env_groups=1``):
                              shared-memory async envs, uint8 rollout storage, one learner thread
                              (``threads=1``), bf16 autocast where the hardware has native bf16
ppo-ours-fp32                 the same with ``bf16=False`` (what the bf16 lever is worth)
ppo-ours-all-threads          the same with ``threads=0``: one thread per core while learning (the
                              rollout's inference keeps to one, the env workers hold the cores)
ppo-ours-overlap              the same with ``overlap=True`` (the Mario preset's default): the update
                              on one rollout runs in a thread while the next rollout is collected
                              (policy lag of one update)
ppo-ours-groups               the same with ``env_groups=2`` too: two env groups, each with its own
                              workers, stepped in turn, so that one group's actions are computed
                              while the other's emulators run (not the preset's default: not
                              reliably faster on 2 cores, benchmarks/RESULTS.md)
ppo-ours-augment              ppo-ours with ``augment=shift``: pad-4 random shifts and DrAC's
                              regulariser on a quarter of each minibatch (``drac_share``, a second
                              forward and backward pass over those frames)
ppo-ours-overlap-augment      ppo-ours-overlap with ``augment=shift`` (what a user of the preset pays)
ppo-ours-overlap-augment-full the same with ``drac_share=1``: DrAC on the whole minibatch, as in the paper
ppo-sb3                       SB3 ``PPO("CnnPolicy")`` (its NatureCNN) over ``SubprocVecEnv`` of our
                              single-env stack (``envs.make``), as an SB3 user would run it (torch's
                              default threads)
ppo-sb3-1thread               the same after ``torch.set_num_threads(1)`` (SB3 given our thread plan)
ppo-sb3-ours-encoder          SB3 with our Nature CNN through ``nets.sb3_adapter``
dqn-ours                      ``agents.dqn.train`` with SB3's DQN algorithm (no double, dueling,
                              n-step or priorities): frame-once replay, the env stepped in a worker
                              process while the gradient step runs, bf16 learning where native
                              (acting stays fp32 on the CPU)
dqn-ours-overlap              ``overlap=True`` with the env in the main process (``env_backend=sync``),
                              bf16 learning where native: each training phase's gradient step runs in a
                              thread while the main thread collects the next 4 agent steps (acting
                              lags one phase; the replay ratio is unchanged); nes-py's emulator
                              releases the GIL, so the two run on two cores
dqn-ours-overlap-trim         dqn-ours-overlap with ``keep_freed_memory=False``: glibc's default malloc
                              thresholds, which hand freed tensors back to the kernel and page-fault
                              them in again at every gradient step
dqn-ours-overlap-async        the same with the env in a worker process (``env_backend=async``):
                              three busy processes/threads on 2 cores, and a pipe round trip per step
dqn-ours-baseline             dqn-ours in one process (``env_backend=sync``), fp32: what the two
                              levers are worth (both use one learner thread)
dqn-preset                    the Mario DQN preset as shipped (double DQN, dueling head, 3-step
                              returns, the learner thread, bf16 learning where native), with the
                              benchmark's buffer and learning_starts
dqn-preset-serial             the same with ``overlap=False, bf16=False`` (the preset before session 5)
dqn-ours-overlap-augment      dqn-ours-overlap with ``augment=shift`` (DrQ: each sampled observation
                              and next observation shifted)
dqn-sb3                       SB3 ``DQN("CnnPolicy")`` over ``DummyVecEnv`` (its default for one env)
dqn-sb3-1thread               the same after ``torch.set_num_threads(1)``
dqn-sb3-kept                  dqn-sb3 after ``agents.engine.keep_freed_memory()``: what our malloc
                              setting would give SB3
============================  ======================================================================
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.env_throughput import FRAME_SKIP, command_line, cpu_model, package_versions

ENV = "mario-1-1"
PPO_SYSTEMS = [
    "ppo-ours",
    "ppo-ours-fp32",
    "ppo-ours-all-threads",
    "ppo-ours-overlap",
    "ppo-ours-groups",
    "ppo-ours-augment",
    "ppo-ours-overlap-augment",
    "ppo-ours-overlap-augment-full",
    "ppo-sb3",
    "ppo-sb3-1thread",
    "ppo-sb3-ours-encoder",
]
DQN_SYSTEMS = [
    "dqn-ours",
    "dqn-ours-overlap",
    "dqn-ours-overlap-trim",
    "dqn-ours-overlap-async",
    "dqn-ours-overlap-augment",
    "dqn-ours-baseline",
    "dqn-preset",
    "dqn-preset-serial",
    "dqn-sb3",
    "dqn-sb3-1thread",
    "dqn-sb3-kept",
]
ALL_SYSTEMS = [*PPO_SYSTEMS, *DQN_SYSTEMS, "emulator", "digits-ours", "digits-plain"]
# The default run is the comparison the speed issue asks for: the presets as shipped (overlap) against
# SB3 with its NatureCNN and with our encoder, the emulator limit and the supervised line: 4.5 minutes
# a repeat on the 2-core CPU machine, against ~25 for all systems (the others are levers, measured on demand).
DEFAULT_SYSTEMS = [
    "ppo-ours-overlap",
    "ppo-sb3",
    "ppo-sb3-ours-encoder",
    "dqn-ours-overlap",
    "dqn-sb3",
    "emulator",
    "digits-ours",
    "digits-plain",
]
TARGETS = {
    "ppo-ours-overlap/ppo-sb3": 2.0,  # on the 2-core CPU machine; 1.6 on the GPU box
    "ppo-ours-overlap/emulator-limit": None,  # 0.9 on the GPU box
    "dqn-ours-overlap/dqn-sb3": 2.0,
    # Augmentation should cost under 10% (>= 0.9); not in the default run, so no verdict is printed.
    "ppo-ours-overlap-augment/ppo-ours-overlap": None,
    "ppo-ours-overlap-augment-full/ppo-ours-overlap": None,
    "dqn-ours-overlap-augment/dqn-ours-overlap": None,
}


# ---------------------------------------------------------------------------------------------
# Children: one system each, printing one JSON line
# ---------------------------------------------------------------------------------------------


def _cuda_peak_mb(device: str) -> float | None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def child_ppo_ours(
    settings: dict[str, Any],
    bf16: bool = True,
    threads: int = 1,
    overlap: bool = False,
    env_groups: int = 1,
    augment: str = "none",
    drac_share: float | None = None,
) -> dict[str, Any]:
    from agents import ppo
    from envs.registry import PRESETS

    batch = settings["envs"] * settings["steps"]
    values = {
        **PRESETS[ENV].ppo,
        "env": ENV,
        "num_envs": settings["envs"],
        "num_steps": settings["steps"],
        "num_minibatches": batch // settings["minibatch"],
        "update_epochs": settings["epochs"],
        "total_steps": batch * settings["updates"],
        "device": settings["device"],
        "bf16": bf16,
        "threads": threads,
        "overlap": overlap,
        "env_groups": env_groups,
        "augment": augment,
        **({} if drac_share is None else {"drac_share": drac_share}),
        "eval_every": 0,
        "eval_episodes": 1,
        "checkpoint_every": 10**9,
        "seed": 1,
    }
    config = ppo.config_from_dict(values)
    with tempfile.TemporaryDirectory() as run_dir:
        ppo.train(config, Path(run_dir), progress=False)
        history = json.loads((Path(run_dir) / "metrics.json").read_text())["history"]
    # Timed from the end of the first update to the end of the last. With overlap, update k ends
    # after rollout k+1 was collected, so between the ends of updates 0 and U-2 lie U-2 rollouts and
    # U-2 updates; the last update runs alone (no rollout to hide behind) and is left out.
    timed = history[:-1] if overlap else history
    if len(timed) < 2:
        raise ValueError(f"--updates must be at least {3 if overlap else 2} to time this PPO system")
    return {
        "steps": timed[-1]["step"] - timed[0]["step"],
        "seconds": timed[-1]["seconds"] - timed[0]["seconds"],
        "cuda_peak_mb": _cuda_peak_mb(settings["device"]),
    }


def _sb3_env(seed: int) -> Any:
    import envs

    def thunk() -> Any:
        env = envs.make(ENV)
        env.reset(seed=seed)
        return env

    return thunk


class _Clock:
    """SB3 callback recording when each rollout starts and when a step count is passed."""

    def __init__(self) -> None:
        from stable_baselines3.common.callbacks import BaseCallback

        clock = self

        class Callback(BaseCallback):
            def _on_rollout_start(self) -> None:
                clock.rollout_starts.append((time.perf_counter(), self.model.num_timesteps))

            def _on_step(self) -> bool:
                if (
                    clock.mark_at is not None
                    and clock.marked is None
                    and self.model.num_timesteps >= clock.mark_at
                ):
                    clock.marked = (time.perf_counter(), self.model.num_timesteps)
                return True

        self.rollout_starts: list[tuple[float, int]] = []
        self.mark_at: int | None = None
        self.marked: tuple[float, int] | None = None
        self.callback = Callback()


def _quiet(model: Any) -> None:
    """Gives an SB3 model a logger that writes nowhere: SB3's own default (verbose=0) still creates an
    empty ``SB3-<date>`` folder in the temporary directory at every ``learn()``."""
    from stable_baselines3.common.logger import Logger

    model.set_logger(Logger(folder=None, output_formats=[]))


def child_ppo_sb3(settings: dict[str, Any], our_encoder: bool = False, threads: int = 0) -> dict[str, Any]:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import SubprocVecEnv, VecMonitor

    from envs.registry import PRESETS

    if threads:
        torch.set_num_threads(threads)
    preset = PRESETS[ENV].ppo
    vec_env = VecMonitor(SubprocVecEnv([_sb3_env(i) for i in range(settings["envs"])]))
    policy_kwargs: dict[str, Any] = {}
    if our_encoder:
        from nets.sb3_adapter import EncoderExtractor

        policy_kwargs = {
            "features_extractor_class": EncoderExtractor,
            "features_extractor_kwargs": {"net": "nature"},
        }
    model = PPO(
        "CnnPolicy", vec_env, n_steps=settings["steps"], batch_size=settings["minibatch"],
        n_epochs=settings["epochs"], learning_rate=preset["learning_rate"], gamma=preset["gamma"],
        gae_lambda=preset["gae_lambda"], clip_range=preset["clip_coef"], ent_coef=preset["ent_coef"],
        max_grad_norm=preset["max_grad_norm"], device=settings["device"], policy_kwargs=policy_kwargs,
        seed=1, verbose=0,
    )  # fmt: skip
    _quiet(model)
    clock = _Clock()
    total = settings["envs"] * settings["steps"] * settings["updates"]
    model.learn(total_timesteps=total, callback=clock.callback)
    end = time.perf_counter()
    vec_env.close()
    start, start_steps = clock.rollout_starts[1]  # the end of update 1, as for ours
    return {
        "steps": model.num_timesteps - start_steps,
        "seconds": end - start,
        "cuda_peak_mb": _cuda_peak_mb(settings["device"]),
    }


def _dqn_values(settings: dict[str, Any]) -> dict[str, Any]:
    """SB3's DQN algorithm in our config's terms: the compute per step is then the same."""
    return {
        "num_envs": 1,
        "buffer_size": settings["buffer"],
        "learning_starts": settings["learning_starts"],
        "train_frequency": 4,
        "gradient_steps": 1,
        "batch_size": 32,
        "target_network_frequency": 1_000,
        "double": False,
        "dueling": False,
        "n_step": 1,
        "prioritized": False,
        "max_grad_norm": 10.0,  # SB3's DQN default
    }


def child_dqn_ours(
    settings: dict[str, Any],
    levers: bool,
    overlap: bool = False,
    backend: str | None = None,
    keep_freed_memory: bool = True,
    augment: str = "none",
) -> dict[str, Any]:
    return _time_dqn_ours(
        settings,
        {
            **_dqn_values(settings),
            "bf16": levers,
            "env_backend": backend or ("async" if levers else "sync"),
            "overlap": overlap,
            "keep_freed_memory": keep_freed_memory,
            "augment": augment,
        },
    )


def child_dqn_preset(settings: dict[str, Any], serial: bool) -> dict[str, Any]:
    """The Mario DQN preset's own algorithm (double, dueling, 3-step returns), as shipped or serial."""
    sized = {key: _dqn_values(settings)[key] for key in ("buffer_size", "learning_starts")}
    return _time_dqn_ours(settings, {**sized, **({"overlap": False, "bf16": False} if serial else {})})


def _time_dqn_ours(settings: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Agent steps/s of ``agents.dqn.train`` on the Mario preset with ``overrides``, after learning_starts."""
    from agents import dqn
    from envs.registry import PRESETS

    values = {
        **PRESETS[ENV].dqn,
        "env": ENV,
        "total_steps": settings["dqn_steps"],
        "device": settings["device"],
        "threads": 1,
        "eval_every": 0,
        "eval_episodes": 1,
        "checkpoint_every": 10**9,
        "log_every": settings["learning_starts"],
        "seed": 1,
        **overrides,
    }
    config = dqn.config_from_dict(values)
    with tempfile.TemporaryDirectory() as run_dir:
        dqn.train(config, Path(run_dir), progress=False)
        history = json.loads((Path(run_dir) / "metrics.json").read_text())["history"]
    elapsed = {row["step"]: row["step"] / row["sps"] for row in history}
    first = settings["learning_starts"]
    last = max(elapsed)
    return {
        "steps": last - first,
        "seconds": elapsed[last] - elapsed[first],
        "cuda_peak_mb": _cuda_peak_mb(settings["device"]),
    }


def child_dqn_sb3(
    settings: dict[str, Any], threads: int = 0, keep_freed_memory: bool = False
) -> dict[str, Any]:
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

    from envs.registry import PRESETS

    if threads:
        torch.set_num_threads(threads)
    if keep_freed_memory:
        from core.compute import keep_freed_memory as keep

        keep()
    preset, values = PRESETS[ENV].dqn, _dqn_values(settings)
    vec_env = VecMonitor(DummyVecEnv([_sb3_env(0)]))
    model = DQN(
        "CnnPolicy", vec_env, buffer_size=values["buffer_size"], learning_starts=values["learning_starts"],
        batch_size=values["batch_size"], train_freq=values["train_frequency"],
        gradient_steps=values["gradient_steps"], target_update_interval=values["target_network_frequency"],
        learning_rate=preset["learning_rate"], gamma=preset["gamma"],
        exploration_fraction=preset["exploration_fraction"], exploration_final_eps=preset["end_e"],
        max_grad_norm=values["max_grad_norm"], device=settings["device"], seed=1, verbose=0,
    )  # fmt: skip
    _quiet(model)
    clock = _Clock()
    clock.mark_at = settings["learning_starts"]
    model.learn(total_timesteps=settings["dqn_steps"], callback=clock.callback)
    end = time.perf_counter()
    vec_env.close()
    assert clock.marked is not None
    start, start_steps = clock.marked
    return {
        "steps": model.num_timesteps - start_steps,
        "seconds": end - start,
        "cuda_peak_mb": _cuda_peak_mb(settings["device"]),
    }


def child_emulator(settings: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.env_throughput import measure_emulator
    from envs.vector import available_cpus

    seconds = settings["emulator_seconds"]
    frames_per_second, _ = measure_emulator(seconds, available_cpus())
    # Reported as agent steps: what a trainer could reach if learning cost nothing.
    return {"steps": frames_per_second / FRAME_SKIP * seconds, "seconds": seconds, "cuda_peak_mb": None}


def child_digits(settings: dict[str, Any], plain: bool) -> dict[str, Any]:
    """Seconds per epoch of the digits CNN: ``lab fit digits`` against a textbook DataLoader loop.

    Both train the same model (tasks.digits.build_model: Nature CNN + linear head), AdamW with the
    same learning rate, batch 64, the same random-shift augmentation, and score the held-out split
    after every epoch. Reported "steps" are training images.
    """
    import torch

    from tasks import digits

    epochs = settings["digits_epochs"]
    config = digits.DigitsConfig(epochs=epochs, device=settings["device"], seed=0)
    if not plain:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        with tempfile.TemporaryDirectory() as run_dir:
            metrics = digits.run(config, Path(run_dir), progress=False)
            # fit() logs each epoch's wall time (training + evaluation) to TensorBoard.
            events = EventAccumulator(run_dir)
            events.Reload()
            seconds = sum(event.value for event in events.Scalars("charts/epoch_seconds"))
        return {"steps": metrics["train_size"] * epochs, "seconds": seconds, "cuda_peak_mb": None}

    from torch.utils.data import DataLoader, TensorDataset

    digits.seed_everything(config.seed)
    device = torch.device(settings["device"] if settings["device"] != "auto" else "cpu")
    (train_x, train_y), (test_x, test_y) = digits.load_split(config.test_fraction, config.seed)
    model = digits.build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=config.batch_size, shuffle=True)
    generator = torch.Generator().manual_seed(1)
    seconds = 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for images, labels in loader:
            images = digits.random_shift(images, 1, generator).to(device)
            loss = torch.nn.functional.cross_entropy(model(images), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the usual running-loss bookkeeping
        model.eval()
        with torch.no_grad():
            (model(test_x.to(device)).argmax(1) == test_y.to(device)).float().mean().item()
        seconds += time.perf_counter() - start
    return {"steps": len(train_x) * epochs, "seconds": seconds, "cuda_peak_mb": None}


def run_child(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    children = {
        "ppo-ours": lambda: child_ppo_ours(settings),
        "ppo-ours-fp32": lambda: child_ppo_ours(settings, bf16=False),
        "ppo-ours-all-threads": lambda: child_ppo_ours(settings, threads=0),
        "ppo-ours-overlap": lambda: child_ppo_ours(settings, overlap=True),
        "ppo-ours-groups": lambda: child_ppo_ours(settings, overlap=True, env_groups=2),
        "ppo-ours-augment": lambda: child_ppo_ours(settings, augment="shift"),
        "ppo-ours-overlap-augment": lambda: child_ppo_ours(settings, overlap=True, augment="shift"),
        "ppo-ours-overlap-augment-full": lambda: child_ppo_ours(
            settings, overlap=True, augment="shift", drac_share=1.0
        ),
        "ppo-sb3": lambda: child_ppo_sb3(settings),
        "ppo-sb3-1thread": lambda: child_ppo_sb3(settings, threads=1),
        "ppo-sb3-ours-encoder": lambda: child_ppo_sb3(settings, our_encoder=True),
        "dqn-ours": lambda: child_dqn_ours(settings, levers=True),
        "dqn-ours-overlap": lambda: child_dqn_ours(settings, levers=True, overlap=True, backend="sync"),
        "dqn-ours-overlap-trim": lambda: child_dqn_ours(
            settings, levers=True, overlap=True, backend="sync", keep_freed_memory=False
        ),
        "dqn-ours-overlap-async": lambda: child_dqn_ours(
            settings, levers=True, overlap=True, backend="async"
        ),
        "dqn-ours-overlap-augment": lambda: child_dqn_ours(
            settings, levers=True, overlap=True, backend="sync", augment="shift"
        ),
        "dqn-ours-baseline": lambda: child_dqn_ours(settings, levers=False),
        "dqn-preset": lambda: child_dqn_preset(settings, serial=False),
        "dqn-preset-serial": lambda: child_dqn_preset(settings, serial=True),
        "dqn-sb3": lambda: child_dqn_sb3(settings),
        "dqn-sb3-1thread": lambda: child_dqn_sb3(settings, threads=1),
        "dqn-sb3-kept": lambda: child_dqn_sb3(settings, keep_freed_memory=True),
        "emulator": lambda: child_emulator(settings),
        "digits-ours": lambda: child_digits(settings, plain=False),
        "digits-plain": lambda: child_digits(settings, plain=True),
    }
    return children[name]()


# ---------------------------------------------------------------------------------------------
# Parent: runs the children in turn, samples their memory, reports medians and ratios
# ---------------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc (no psutil dependency)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def _pss_mb(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        total_kb += int(line.split()[1])
                        break
        except OSError:
            continue  # the process ended between listing and reading
    return total_kb / 1024


# Reading smaps_rollup costs the kernel ~45 ms of CPU per sample for a training process tree (it
# walks the page tables of torch's large mappings, every forked worker carries them) and holds each
# process's mmap lock meanwhile: sampled every 0.2 s, as at first, that took a fifth of a core from
# the system being measured; every 2 s it still cost the 5-process PPO with env groups ~10% (196 vs
# 176 steps/s, 2 runs each) against ~2% for 3 processes, so systems with more processes lost more.
# The peak is reached within seconds (buffers are allocated up front) and then held.
PSS_INTERVAL = 10.0


def run_child_process(
    name: str, settings: dict[str, Any], sample: Callable[[int], None], intervals: Iterator[float]
) -> dict[str, Any]:
    """Runs one system in a child process and returns its result, with ``rate`` (steps per second).

    While the child runs, ``sample(child_pid)`` is called after each of ``intervals`` (seconds) from a
    thread, so that the child's output is read meanwhile and a full pipe cannot stall it. RuntimeError
    when the child fails.
    """
    command = [
        sys.executable,
        "-m",
        "benchmarks.train_throughput",
        "--child",
        name,
        "--settings",
        json.dumps(settings),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample_until_done() -> None:
        while not done.wait(next(intervals)):
            sample(process.pid)

    sampler = threading.Thread(target=sample_until_done, daemon=True)
    sampler.start()
    stdout, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"benchmark child {name} failed with exit status {process.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["rate"] = result["steps"] / result["seconds"]
    return result


def rate_unit(system: str) -> str:
    """What a system's rate counts: images for the digits lines, agent steps for the rest."""
    return "images/s" if system.startswith("digits") else "steps/s"


def measure(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Runs one system in a child process; its result plus the peak PSS of its process tree."""
    peak = 0.0

    def sample(pid: int) -> None:
        nonlocal peak
        peak = max(peak, _pss_mb(descendants(pid)))

    # After 0.5, 1.5, 4.5, ... s up to PSS_INTERVAL: short children get samples too.
    intervals = itertools.chain((0.5 * 3**k for k in range(3)), itertools.repeat(PSS_INTERVAL))
    result = run_child_process(name, settings, sample, intervals)
    result["peak_pss_mb"] = round(peak, 1)
    return result


def run(systems: list[str], settings: dict[str, Any], repeats: int) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
    # A child that fails (an untested device, a crash) is reported, and the others still run: on the
    # GPU box one failure must not cost the whole device session's measurements.
    failures: dict[str, list[str]] = {}
    load_before = os.getloadavg()
    for repeat in range(repeats):
        for system in systems:
            try:
                result = measure(system, settings)
            except RuntimeError as error:
                failures.setdefault(system, []).append(str(error))
                print(
                    f"  repeat {repeat + 1}/{repeats}  {system:<22} FAILED: {error}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            samples[system].append({**result, "repeat": repeat})
            print(
                f"  repeat {repeat + 1}/{repeats}  {system:<22} {result['rate']:8.1f} {rate_unit(system)}"
                f"  peak {result['peak_pss_mb']:7.0f} MB  load {os.getloadavg()[0]:.1f}"
                f"  page faults {result.get('minor_faults', 0) / 1e6:.2f}M",
                file=sys.stderr,
                flush=True,
            )
    samples = {system: rows for system, rows in samples.items() if rows}
    medians = {system: statistics.median(r["rate"] for r in rows) for system, rows in samples.items()}
    ratios: dict[str, float] = {}
    # Also each repeat's own ratio (its two systems ran a minute or two apart): on a machine whose speed
    # drifts during a run, their median is less swayed by the drift than the ratio of the medians.
    paired: dict[str, dict[str, Any]] = {}

    def ratio(name: str, numerator: str, denominator: str) -> None:
        if numerator in medians and denominator in medians:
            ratios[name] = medians[numerator] / medians[denominator]
            rates = {
                system: {r["repeat"]: r["rate"] for r in samples[system]}
                for system in (numerator, denominator)
            }
            per_repeat = [
                rates[numerator][repeat] / rates[denominator][repeat]
                for repeat in sorted(rates[numerator].keys() & rates[denominator].keys())
            ]
            if per_repeat:  # none when the two never succeeded in the same repeat
                paired[name] = {
                    "median": statistics.median(per_repeat),
                    "per_repeat": [round(x, 3) for x in per_repeat],
                }

    ratio("ppo-ours/ppo-sb3", "ppo-ours", "ppo-sb3")
    ratio("ppo-ours/ppo-sb3-ours-encoder", "ppo-ours", "ppo-sb3-ours-encoder")
    ratio("ppo-ours-fp32/ppo-sb3", "ppo-ours-fp32", "ppo-sb3")
    ratio("ppo-ours/ppo-ours-fp32", "ppo-ours", "ppo-ours-fp32")
    ratio("ppo-ours/ppo-ours-all-threads", "ppo-ours", "ppo-ours-all-threads")
    ratio("ppo-ours/ppo-sb3-1thread", "ppo-ours", "ppo-sb3-1thread")
    ratio("ppo-ours/emulator-limit", "ppo-ours", "emulator")
    ratio("ppo-ours-overlap/ppo-sb3", "ppo-ours-overlap", "ppo-sb3")
    ratio("ppo-ours-overlap/ppo-ours", "ppo-ours-overlap", "ppo-ours")
    ratio("ppo-ours-overlap/emulator-limit", "ppo-ours-overlap", "emulator")
    ratio("ppo-ours-groups/ppo-sb3", "ppo-ours-groups", "ppo-sb3")
    ratio("ppo-ours-groups/ppo-ours-overlap", "ppo-ours-groups", "ppo-ours-overlap")
    ratio("ppo-ours-groups/emulator-limit", "ppo-ours-groups", "emulator")
    ratio("dqn-ours/dqn-sb3", "dqn-ours", "dqn-sb3")
    ratio("dqn-ours-overlap/dqn-sb3", "dqn-ours-overlap", "dqn-sb3")
    ratio("dqn-ours-overlap/dqn-ours", "dqn-ours-overlap", "dqn-ours")
    ratio("ppo-ours-augment/ppo-ours", "ppo-ours-augment", "ppo-ours")
    ratio("ppo-ours-overlap-augment/ppo-ours-overlap", "ppo-ours-overlap-augment", "ppo-ours-overlap")
    ratio(
        "ppo-ours-overlap-augment-full/ppo-ours-overlap", "ppo-ours-overlap-augment-full", "ppo-ours-overlap"
    )
    ratio("dqn-ours-overlap-augment/dqn-ours-overlap", "dqn-ours-overlap-augment", "dqn-ours-overlap")
    ratio("dqn-ours-overlap/dqn-ours-overlap-trim", "dqn-ours-overlap", "dqn-ours-overlap-trim")
    ratio("dqn-ours-overlap/dqn-sb3-kept", "dqn-ours-overlap", "dqn-sb3-kept")
    ratio("dqn-sb3-kept/dqn-sb3", "dqn-sb3-kept", "dqn-sb3")
    ratio("dqn-ours-overlap/dqn-ours-overlap-async", "dqn-ours-overlap", "dqn-ours-overlap-async")
    ratio("dqn-ours/dqn-ours-baseline", "dqn-ours", "dqn-ours-baseline")
    ratio("dqn-ours-baseline/dqn-sb3", "dqn-ours-baseline", "dqn-sb3")
    ratio("dqn-ours/dqn-sb3-1thread", "dqn-ours", "dqn-sb3-1thread")
    ratio("dqn-preset/dqn-preset-serial", "dqn-preset", "dqn-preset-serial")
    ratio("digits-ours/digits-plain", "digits-ours", "digits-plain")
    from envs.vector import available_cpus

    return {
        "command": command_line("benchmarks.train_throughput"),
        "machine": {
            "cpus": available_cpus(),
            "cpu_model": cpu_model(),
            "gpu": _gpu_name(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {**package_versions(), "torch": _torch_version()},
        "settings": settings,
        "repeats": repeats,
        "rates": {
            system: {
                "median": medians[system],
                "samples": [round(r["rate"], 2) for r in rows],
                "peak_pss_mb": max(r["peak_pss_mb"] for r in rows),
                "cuda_peak_mb": max((r["cuda_peak_mb"] or 0.0) for r in rows) or None,
                # per sample, of the child process's own threads (None from a child that did not say)
                "minor_faults": [r.get("minor_faults") for r in rows],
                "system_cpu_s": [r.get("system_cpu_s") for r in rows],
            }
            for system, rows in samples.items()
        },
        "ratios": ratios,
        "paired_ratios": paired,
        "targets": {k: v for k, v in TARGETS.items() if v is not None},
        "failures": failures,
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def print_report(result: dict[str, Any]) -> None:
    machine = result["machine"]
    print(f"command: {result['command']}")
    print(
        f"machine: {machine['cpus']} cpus, {machine['cpu_model']}, gpu {machine['gpu']}; "
        f"load average before {machine['load_average_before']}, after {machine['load_average_after']}"
    )
    print("versions: " + ", ".join(f"{name} {version}" for name, version in result["versions"].items()))
    print(f"settings: {result['settings']}  repeats: {result['repeats']}")
    print(f"{'system':<24}{'median/s':>10}{'peak MB':>10}{'cuda MB':>10}   samples")
    for system, entry in result["rates"].items():
        cuda = f"{entry['cuda_peak_mb']:.0f}" if entry["cuda_peak_mb"] else "-"
        print(
            f"{system:<24}{entry['median']:>10.1f}{entry['peak_pss_mb']:>10.0f}{cuda:>10}   {entry['samples']}"
        )
    for system, errors in result.get("failures", {}).items():
        print(f"{system:<24}FAILED in {len(errors)} of {result['repeats']} repeats: {errors[0]}")
    for name, value in result["ratios"].items():
        target = result["targets"].get(name)
        verdict = "" if target is None else f"   target >= {target}: {'met' if value >= target else 'MISSED'}"
        pairs = result.get("paired_ratios", {}).get(name)
        if pairs is not None and len(pairs["per_repeat"]) > 1:
            each = ", ".join(f"{x:.2f}" for x in pairs["per_repeat"])
            verdict += f"   per repeat {each} (median {pairs['median']:.3f})"
        print(f"{name:<32}{value:>8.3f}{verdict}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma-separated subset of {','.join(ALL_SYSTEMS)} (default: {','.join(DEFAULT_SYSTEMS)})",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats (medians are reported)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (all systems)")
    parser.add_argument("--envs", type=int, default=8, help="PPO: parallel envs")
    parser.add_argument("--steps", type=int, default=128, help="PPO: rollout steps per env per update")
    parser.add_argument("--minibatch", type=int, default=256, help="PPO: minibatch size")
    parser.add_argument("--epochs", type=int, default=4, help="PPO: epochs per update")
    parser.add_argument("--updates", type=int, default=6, help="PPO: updates (the first is warm-up)")
    parser.add_argument("--dqn-steps", type=int, default=3_000, help="DQN: agent steps in all")
    parser.add_argument("--learning-starts", type=int, default=1_000, help="DQN: steps before learning")
    parser.add_argument("--buffer", type=int, default=50_000, help="DQN: replay capacity")
    parser.add_argument("--emulator-seconds", type=float, default=10.0, help="emulator limit: seconds")
    parser.add_argument("--digits-epochs", type=int, default=5, help="digits: epochs")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    return parser


def settings_from_args(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The systems to run and the children's settings; ValueError names a bad value."""
    systems = [s for s in args.systems.split(",") if s]
    if not systems:
        raise ValueError(f"no systems given; choose from {', '.join(ALL_SYSTEMS)}")
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system {unknown[0]!r}; choose from {', '.join(ALL_SYSTEMS)}")
    if args.dqn_steps <= args.learning_starts or args.dqn_steps % args.learning_starts:
        raise ValueError("--dqn-steps must be a multiple of --learning-starts and larger than it")
    if (args.envs * args.steps) % args.minibatch:
        raise ValueError("--envs x --steps must be a multiple of --minibatch")
    if args.updates < 2:
        raise ValueError("--updates must be at least 2 (the first one is not timed)")
    if args.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, not {args.device!r}")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {
        "device": device,
        "envs": args.envs,
        "steps": args.steps,
        "minibatch": args.minibatch,
        "epochs": args.epochs,
        "updates": args.updates,
        "dqn_steps": args.dqn_steps,
        "learning_starts": args.learning_starts,
        "buffer": args.buffer,
        "emulator_seconds": args.emulator_seconds,
        "digits_epochs": args.digits_epochs,
    }
    return systems, settings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child is not None:
        result = run_child(args.child, json.loads(args.settings))
        # The whole child process (its threads, not its worker processes): minor page faults are
        # pages the kernel mapped and zero-filled on first touch (see agents.engine.keep_freed_memory).
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result.update(minor_faults=usage.ru_minflt, system_cpu_s=usage.ru_stime)
        print(json.dumps(result))
        return 0
    try:
        systems, settings = settings_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    result = run(systems, settings, args.repeats)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
