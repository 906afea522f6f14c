"""Algorithm-independent helpers shared by ppo.py and dqn.py: devices, seeding, run directories,
checkpoints of a training run, episode statistics, logging with a progress bar, greedy evaluation.

Nothing here knows what PPO or DQN is; each algorithm file keeps its own math.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from agents.checkpoint import (
    CheckpointError,
    atomic_write_json,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_run_json,
    read_sidecar,
    save_checkpoint,
)

RUN_FORMAT_VERSION = 1


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


TORCH_DEFAULT_THREADS = torch.get_num_threads()  # one per core, before anyone changes it


def set_learner_threads(threads: int) -> int:
    """Sets torch's intra-op CPU threads of this process; returns the number set.

    Args:
        threads: the count; 0 means torch's default (one per core).

    Why agents default to one: the env workers need the other cores. With two threads on the
    2-core machine, while other processes ran, a Nature CNN gradient step on 32 frames took 290 ms
    instead of 53 ms and a one-frame forward 17 ms instead of 1.5 ms: OpenMP threads spin-wait
    for a core that an env worker holds (benchmarks/RESULTS.md has the side-by-side numbers).
    """
    count = threads if threads > 0 else TORCH_DEFAULT_THREADS
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def glibc() -> ctypes.CDLL | None:
    """The C library this interpreter runs on if it is glibc, else None (musl's mallopt is a no-op)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
    except (AttributeError, OSError):
        return None
    return libc


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep the memory torch frees for reuse instead of giving it back to the
    kernel at once; process-wide. Returns whether it applied (False off glibc: macOS, musl).

    Why: a DQN gradient step on the CPU allocates and frees the same few-MB tensors every time (the
    uint8 batch and its float copy, activations, bf16 gradients cast back to fp32). glibc serves
    allocations above its mmap threshold (128 KiB at first, moved up and down by what was freed last)
    with fresh mappings that it unmaps on free, and returns the top of its heap to the kernel; every
    reuse then page-faults and zero-fills those pages again. A 70-s Mario DQN benchmark process took
    0.4-2.5M page faults (up to ~800 per agent step) and 1.6-6.2 s of system CPU that way, against
    0.15M (mostly start-up) and 0.9-1.4 s with this (benchmarks/RESULTS.md, session 7). Fixed
    thresholds stop it: allocations up to 32 MiB (the most mallopt takes) come from the heap, and up to
    256 MiB of free heap stays mapped.
    It is what preloading jemalloc or tcmalloc buys (PyTorch's CPU performance guide advises that),
    without a library to install.
    """
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    )


def adam_kernel(device: torch.device) -> dict[str, bool]:
    """The fastest Adam implementation torch has for ``device``, as keyword arguments of the optimizer.

    Fused (one kernel over all parameters) on the CPU and CUDA. Why on the CPU too: torch's default
    there is a Python loop over the parameters; for the Nature CNN's 1.7M parameters one Adam step took
    4.3 ms that way, 3.3 ms multi-tensor (foreach) and 1.0 ms fused on one core of the 2-core EPYC
    (``python -m benchmarks.learner_parts``; 12.9, 4.4 and 1.3 ms in a busier hour). Other devices
    keep torch's default.
    """
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA, or a CPU with AVX512-BF16/AMX."""
    return device.type == "cuda" or (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def bf16_autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast where the hardware computes bf16 natively: CUDA, or a CPU with AVX512-BF16/AMX.

    Why on the CPU too: oneDNN's bf16 convolutions run the Nature CNN's forward + backward 2.2x
    faster than fp32 on the 2-core EPYC of benchmarks/RESULTS.md. Elsewhere (a CPU without native
    bf16, where bf16 is emulated and slower) the returned context does nothing. Weights, optimizer
    state, losses and the logits' softmax stay fp32; only matmuls and convolutions run in bf16.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and native_bf16(device))


#: The layers whose inputs, weights and biases bf16 autocast rounds to bf16 (on the CPU and CUDA alike).
AUTOCAST_BF16_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def forward_copy(module: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """A copy of ``module`` for forward passes only (acting, target values), refreshed by
    ``copy.load_state_dict(module.state_dict())``.

    Under ``bf16_autocast(device, bf16)``, where that is active, the copy stores the weights and biases
    of the layers that autocast runs in bf16 (``AUTOCAST_BF16_LAYERS``) in bf16: its forward computes
    exactly what ``module`` computes under autocast, which rounds those fp32 weights to bf16 again at
    every call (``load_state_dict`` rounds them the same way, once per refresh). Why: for a Mario DQN
    that cast is 1.7M weights per forward; a target forward on 32 frames without it saves ~5% of a
    gradient step, and acting beside the learner thread reads half the bytes
    (``python -m benchmarks.learner_parts``). Elsewhere it is a plain fp32 copy.

    Args:
        module: the network to copy (not changed).
        device: the device the copy computes on (its weights are already there).
        bf16: whether its forward passes will run under ``bf16_autocast(device, True)``.

    Returns:
        The copy, in eval mode, without gradients.
    """
    duplicate = copy.deepcopy(module).eval().requires_grad_(False)
    if bf16 and native_bf16(device):
        for layer in duplicate.modules():
            if isinstance(layer, AUTOCAST_BF16_LAYERS):
                layer.to(torch.bfloat16)
    return duplicate


def seed_everything(seed: int, deterministic: bool = True) -> np.random.Generator:
    """Seeds Python, numpy and torch; returns a numpy Generator for the algorithm's own sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    return np.random.default_rng(seed)


def train_env_overrides(config: Any) -> dict[str, Any]:
    """``envs.make_vec`` options that a training config sets: sticky actions (Mario presets only)."""
    if not config.sticky:
        return {}
    import envs

    if envs.resolve(config.env).kind != "mario":
        raise ValueError(f"sticky applies to Mario presets only; this run trains {config.env!r}")
    return {"sticky_prob": config.sticky}


def eval_env_overrides(config: Any) -> dict[str, Any]:
    """Options of the periodic evaluation's envs: the preset's protocol plus the training's sticky actions."""
    import envs

    return {**envs.eval_overrides(config.env), **train_env_overrides(config)}


# ---------------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------------


def new_run_dir(base: str | os.PathLike, name: str) -> Path:
    """``base/name-YYYYmmdd-HHMMSS`` (with a suffix if taken); created empty."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(base) / f"{name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(base) / f"{name}-{stamp}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


def write_run_config(run_dir: Path, algo: str, config: Any) -> None:
    """Writes ``config.json``: what ``lab eval|watch|train --resume`` need to rebuild the run."""
    atomic_write_json(
        run_dir / "config.json",
        {"run_format_version": RUN_FORMAT_VERSION, "algo": algo, "config": dataclasses.asdict(config)},
    )


def read_run_config(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """Returns ``(algo, config dict)`` of a run directory; CheckpointError when it is not one."""
    path = Path(run_dir) / "config.json"
    data = read_run_json(run_dir, CheckpointError)
    if not isinstance(data, dict) or "algo" not in data or "config" not in data:
        raise CheckpointError(f"{path} is not an agent-lab run config")
    if data.get("run_format_version") != RUN_FORMAT_VERSION:
        raise CheckpointError(
            f"{run_dir} was written by an incompatible lab version "
            f"(run format {data.get('run_format_version')!r}, this lab reads {RUN_FORMAT_VERSION})"
        )
    return data["algo"], data["config"]


def locate_checkpoint(run_or_checkpoint: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Finds the checkpoint to load from a run directory or a checkpoint file.

    Returns:
        ``(sidecar_path, meta)`` where meta holds at least ``algo`` and ``config``.

    Raises:
        CheckpointError: nothing loadable there.
    """
    path = Path(run_or_checkpoint)
    if not path.exists() and not path.with_name(path.name + ".json").exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        sidecar = latest_checkpoint(path / "checkpoints")
        if sidecar is None:
            raise CheckpointError(f"{path} holds no loadable checkpoint (looked in {path / 'checkpoints'})")
    else:
        sidecar = path
    meta = read_sidecar(sidecar).get("meta", {})
    if "algo" not in meta or "config" not in meta:
        raise CheckpointError(f"{sidecar} is not an agent checkpoint (no algo/config in its sidecar)")
    return Path(sidecar), meta


def save_training_checkpoint(
    run_dir: Path, global_step: int, state: dict[str, Any], meta: dict[str, Any], keep: int
) -> Path:
    """Saves ``checkpoints/step_<global_step>`` atomically and keeps only the newest ``keep``."""
    # A run has one writer: temp files here were left by a process killed mid-write.
    for stale in (run_dir / "checkpoints").glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    sidecar = save_checkpoint(run_dir / "checkpoints" / f"step_{global_step:012d}", state, meta)
    prune_checkpoints(run_dir / "checkpoints", keep)
    return sidecar


def load_training_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The newest good checkpoint of a run, or None when it has none yet."""
    sidecar = latest_checkpoint(run_dir / "checkpoints")
    return None if sidecar is None else load_checkpoint(sidecar)


# ---------------------------------------------------------------------------------------------
# Episode statistics from a same-step-autoreset vector env
# ---------------------------------------------------------------------------------------------


#: The info keys of a finished episode that its statistics keep (Mario's progress and stage).
EPISODE_INFO_KEYS = ("x_pos_max", "flag_get", "world", "stage")


def stage_label(stats: dict[str, float]) -> str | None:
    """``"1-3"`` for an episode of Mario's world 1, stage 3; None when the env reports no stage."""
    if "world" not in stats or "stage" not in stats:
        return None
    return f"{int(stats['world'])}-{int(stats['stage'])}"


def finished_episodes(infos: dict[str, Any]) -> Iterator[tuple[int, dict[str, float]]]:
    """Yields ``(env_index, stats)`` for every episode that ended at this vector step.

    ``stats`` has ``return`` and ``length`` and, where the env reports them, ``x_pos_max``,
    ``flag_get``, ``world`` and ``stage`` (Mario). Reads Gymnasium's dict-of-arrays ``final_info``
    with its ``_key`` masks.
    """
    final_info = infos.get("final_info")
    if not final_info or "_final_info" not in infos:
        return
    episode = final_info.get("episode")
    if episode is None:
        return
    for index in np.flatnonzero(infos["_final_info"]):
        if "_episode" in final_info and not final_info["_episode"][index]:
            continue
        stats = {"return": float(episode["r"][index]), "length": float(episode["l"][index])}
        for key in EPISODE_INFO_KEYS:
            if key in final_info and final_info.get(f"_{key}", np.ones(index + 1, bool))[index]:
                stats[key] = float(final_info[key][index])
        yield int(index), stats


class EpisodeTracker:
    """Recent-episode windows for the progress bar and TensorBoard ``charts/``: one over all
    episodes, and one per stage for multi-stage Mario presets (so a rare stage keeps its own 100)."""

    def __init__(self, window: int = 100) -> None:
        self.window = window
        self.recent: deque[dict[str, float]] = deque(maxlen=window)
        self.by_stage: dict[str, deque[dict[str, float]]] = {}
        self.count = 0

    def add(self, stats: dict[str, float]) -> None:
        self.recent.append(stats)
        self.count += 1
        label = stage_label(stats)
        if label is not None:
            self.by_stage.setdefault(label, deque(maxlen=self.window)).append(stats)

    def mean(self, key: str, stage: str | None = None) -> float:
        """Mean of ``key`` over the recent episodes (of ``stage`` only, when given)."""
        episodes = self.recent if stage is None else self.by_stage.get(stage, ())
        values = [s[key] for s in episodes if key in s]
        return float(np.mean(values)) if values else math.nan

    def stage_means(self) -> dict[str, dict[str, float]]:
        """``{stage: {"clear_rate", "x_pos_max_mean", "episodes"}}`` when episodes span several stages."""
        if len(self.by_stage) < 2:
            return {}
        return {
            label: {
                "clear_rate": self.mean("flag_get", label),
                "x_pos_max_mean": self.mean("x_pos_max", label),
                "episodes": float(len(self.by_stage[label])),
            }
            for label in sorted(self.by_stage)
        }

    def state(self) -> dict[str, Any]:
        """For checkpoints: the count and the window, so that a resumed run's curves carry on."""
        return {
            "episodes": self.count,
            "recent_episodes": list(self.recent),
            "recent_by_stage": {label: list(window) for label, window in self.by_stage.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("episodes", 0))
        self.recent.clear()
        self.recent.extend(dict(stats) for stats in state.get("recent_episodes", []))
        self.by_stage = {
            label: deque((dict(stats) for stats in window), maxlen=self.window)
            for label, window in state.get("recent_by_stage", {}).items()
        }


def stage_scalars(episodes: EpisodeTracker) -> dict[str, float]:
    """``stages/<W-S>/clear_rate`` and ``stages/<W-S>/x_pos_max`` for multi-stage runs, else ``{}``."""
    scalars = {}
    for label, means in episodes.stage_means().items():
        scalars[f"stages/{label}/clear_rate"] = means["clear_rate"]
        scalars[f"stages/{label}/x_pos_max"] = means["x_pos_max_mean"]
    return scalars


# ---------------------------------------------------------------------------------------------
# Logging: TensorBoard + a progress bar (SPS, recent return, ETA)
# ---------------------------------------------------------------------------------------------


class RunLogger:
    """TensorBoard writer plus a tqdm bar over agent steps; resumes the event stream on resume."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: bool, config: Any) -> None:
        # purge_step drops events written after the checkpoint we resume from, so curves do not fold back.
        self.writer = SummaryWriter(str(run_dir), purge_step=start_step if start_step > 0 else None)
        if start_step == 0:
            rows = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(config).items())
            self.writer.add_text("config", f"|param|value|\n|-|-|\n{rows}")
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not progress,
            unit="step",
            dynamic_ncols=True,
            smoothing=0.05,
        )
        self.last_step = start_step

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(name, value, step)

    def progress(self, step: int, episodes: EpisodeTracker, sps: float) -> None:
        self.bar.update(step - self.last_step)
        self.last_step = step
        postfix = {"sps": f"{sps:.0f}", "eps": episodes.count}
        if episodes.recent:
            postfix["return"] = f"{episodes.mean('return'):.1f}"
            if not math.isnan(episodes.mean("x_pos_max")):
                postfix["x"] = f"{episodes.mean('x_pos_max'):.0f}"
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.writer.flush()
        self.writer.close()


# ---------------------------------------------------------------------------------------------
# Greedy evaluation
# ---------------------------------------------------------------------------------------------


class Policy(Protocol):
    """What evaluation and video need from a trained agent."""

    def reset(self, num_envs: int) -> None: ...

    def act(self, obs: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Greedy actions for a batch of observations; ``starts[i]`` marks a new episode in env i."""
        ...


def evaluate(
    policy: Policy,
    make_vec_env: Callable[[int], Any],
    episodes: int,
    seed: int,
    max_envs: int = 8,
) -> dict[str, Any]:
    """Plays ``episodes`` greedy episodes and summarises them.

    Each env gets a fixed quota of episodes, so short episodes are not over-represented.

    Returns:
        ``episodes``, ``return_mean``, ``return_std``, ``length_mean`` and, for Mario,
        ``clear_rate`` and ``x_pos_mean``; plus the per-episode list under ``per_episode``.
    """
    num_envs = max(1, min(max_envs, episodes))
    quota = [episodes // num_envs + (1 if i < episodes % num_envs else 0) for i in range(num_envs)]
    env = make_vec_env(num_envs)
    results: list[dict[str, float]] = []
    try:
        obs, _ = env.reset(seed=seed)
        policy.reset(num_envs)
        starts = np.ones(num_envs, dtype=bool)
        done_count = [0] * num_envs
        while len(results) < episodes:
            actions, _ = policy.act(obs, starts)
            obs, _, terminations, truncations, infos = env.step(actions)
            starts = np.logical_or(terminations, truncations)
            for index, stats in finished_episodes(infos):
                if done_count[index] < quota[index]:
                    done_count[index] += 1
                    results.append(stats)
    finally:
        env.close()
    return summarize_episodes(results)


def summarize_episodes(results: list[dict[str, float]]) -> dict[str, Any]:
    returns = np.array([r["return"] for r in results], dtype=np.float64)
    summary: dict[str, Any] = {
        "episodes": len(results),
        "return_mean": float(returns.mean()) if len(results) else math.nan,
        "return_std": float(returns.std()) if len(results) else math.nan,
        "length_mean": float(np.mean([r["length"] for r in results])) if results else math.nan,
    }
    if results and "flag_get" in results[0]:
        summary["clear_rate"] = float(np.mean([r.get("flag_get", 0.0) for r in results]))
        summary["x_pos_mean"] = float(np.mean([r.get("x_pos_max", 0.0) for r in results]))
    labels = sorted({label for label in map(stage_label, results) if label is not None})
    if len(labels) > 1:
        summary["stages"] = {}
        for label in labels:
            played = [r for r in results if stage_label(r) == label]
            summary["stages"][label] = {
                "episodes": len(played),
                "clear_rate": float(np.mean([r.get("flag_get", 0.0) for r in played])),
                "x_pos_mean": float(np.mean([r.get("x_pos_max", 0.0) for r in played])),
            }
    summary["per_episode"] = results
    return summary


# ---------------------------------------------------------------------------------------------
# End of a run: metrics.json and the learning curve
# ---------------------------------------------------------------------------------------------


def run_summary(
    run_dir: Path,
    algo: str,
    env: str,
    steps: int,
    sps: float,
    episodes: int,
    skipped_updates: int,
    eval_summary: dict[str, Any],
) -> dict[str, Any]:
    """The ``lab train --json`` summary of DESIGN.md, plus the eval's Mario keys where present."""
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "algo": algo,
        "env": env,
        "steps": steps,
        "sps": round(sps, 1),
        "episodes": episodes,
        "skipped_updates": skipped_updates,
        "eval_episodes": eval_summary["episodes"],
        "eval_return_mean": eval_summary["return_mean"],
        "eval_return_std": eval_summary["return_std"],
    }
    if "clear_rate" in eval_summary:
        summary["eval_clear_rate"] = eval_summary["clear_rate"]
        summary["eval_x_pos_mean"] = eval_summary["x_pos_mean"]
    return summary


def finish_run(run_dir: Path, summary: dict[str, Any], history: list[dict[str, float]]) -> None:
    """Writes ``metrics.json`` (summary + per-update history) and ``learning_curve.png``."""
    atomic_write_json(run_dir / "metrics.json", {**summary, "history": history})
    if history:
        plot_learning_curve(
            history, run_dir / "learning_curve.png", title=f"{summary.get('algo')} on {summary.get('env')}"
        )


# (clear rate of the last 100 training episodes, plot label, `lab export` summary key)
CLEAR_MILESTONES = (
    (1e-9, "first clear", "steps_to_first_clear"),
    (0.9, "90% clears", "steps_to_90_clears"),
)


def first_step_reaching(history: list[dict[str, float]], key: str, threshold: float) -> int | None:
    """The agent step of the first history record whose ``key`` is at least ``threshold``."""
    for record in history:
        value = record.get(key, math.nan)
        if not math.isnan(value) and value >= threshold:
            return int(record["step"])
    return None


def plot_learning_curve(history: list[dict[str, float]], path: Path, title: str = "") -> None:
    """Recent mean episode return over agent steps; Mario adds furthest x and the clear rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] for h in history], dtype=np.float64)
    has_mario = any(not math.isnan(h.get("clear_rate", math.nan)) for h in history)
    fig, axes = plt.subplots(1, 3 if has_mario else 1, figsize=(13 if has_mario else 6, 3.6), squeeze=False)
    panels = [("return_mean", "mean episode return (last 100)")]
    if has_mario:
        panels += [
            ("x_pos_max_mean", "furthest x (last 100 episodes)"),
            ("clear_rate", "flag reached (last 100)"),
        ]
    for axis, (key, label) in zip(axes[0], panels, strict=True):
        axis.plot(steps, [h.get(key, math.nan) for h in history], color="tab:blue")
        axis.set_xlabel("agent steps")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    if has_mario:
        # Milestones of the training episodes: the first flag, and 90% of the last 100 episodes.
        for (threshold, text, _key), color in zip(CLEAR_MILESTONES, ("tab:green", "tab:red"), strict=True):
            step = first_step_reaching(history, "clear_rate", threshold)
            if step is not None:
                axes[0][2].axvline(step, color=color, linestyle="--", linewidth=1)
                axes[0][2].annotate(
                    f"{text}: {step / 1e6:.2f}M", (step, 0.5 + 0.4 * threshold), xytext=(4, 0),
                    textcoords="offset points", color=color, fontsize=8,
                )  # fmt: skip
        axes[0][2].set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave half a PNG behind
        raise
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Greedy-evaluation scalars for TensorBoard (added with dqn.py; ppo.py has the same in its file)
# ---------------------------------------------------------------------------------------------


def eval_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """``eval/`` TensorBoard scalars of an :func:`evaluate` summary."""
    scalars = {"eval/return_mean": summary["return_mean"], "eval/length_mean": summary["length_mean"]}
    if "clear_rate" in summary:
        scalars["eval/clear_rate"] = summary["clear_rate"]
        scalars["eval/x_pos_mean"] = summary["x_pos_mean"]
    return scalars


def export_slim_checkpoint(run_dir: Path, out_dir: Path) -> Path:
    """Copies a run's newest checkpoint without optimizer state and RNG (a few MB, for shipping).

    ``out_dir`` becomes a run directory of its own: ``lab eval|watch`` load it, and
    ``lab train --resume`` continues from its weights with a fresh optimizer.
    """
    loaded = load_training_checkpoint(run_dir)
    if loaded is None:
        raise CheckpointError(f"{run_dir} holds no loadable checkpoint")
    state, meta = loaded
    slim = {
        key: state[key]
        for key in ("model", "global_step", "update", "episodes", "recent_episodes", "history")
        if key in state
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    for old in (out_dir / "checkpoints").glob("*") if (out_dir / "checkpoints").is_dir() else []:
        old.unlink()
    return save_training_checkpoint(out_dir, int(state["global_step"]), slim, meta, keep=1)


# ---------------------------------------------------------------------------------------------
# Stopping a run that cannot go on
# ---------------------------------------------------------------------------------------------

MAX_BAD_UPDATES = 3  # updates in a row whose every step had a non-finite loss or gradient


class TrainingStopped(RuntimeError):
    """Training cannot go on (persistent NaNs, env workers that keep failing); the message says why."""


def worker_scalars(*vec_envs: Any) -> dict[str, float]:
    """``charts/`` counts of env-worker failures of ``envs.vector.SubprocVectorEnv``s, summed over
    them (restarts, dropped episodes, failures by kind); ``{}`` for in-process vector envs, which
    have no workers.

    The log has each failure as it happens; on TensorBoard the counts line up with the curves. They
    count from 0 in each process (a resumed run starts a new vector env).
    """
    with_workers = [vec_env for vec_env in vec_envs if hasattr(vec_env, "failure_counts")]
    if not with_workers:
        return {}
    scalars = {
        "charts/worker_restarts": float(sum(vec_env.restarts for vec_env in with_workers)),
        "charts/dropped_episodes": float(sum(vec_env.dropped_episodes for vec_env in with_workers)),
    }
    for kind in with_workers[0].failure_counts:
        count = sum(vec_env.failure_counts[kind] for vec_env in with_workers)
        scalars[f"charts/worker_failures_{kind}"] = float(count)
    return scalars


def try_to_save(save: Callable[[], None]) -> str:
    """Runs ``save``; returns "" or a note on why the checkpoint could not be written."""
    try:
        save()
    except OSError as error:
        return f" (and the checkpoint could not be written: {error.strerror or error})"
    return "; a checkpoint was saved"
