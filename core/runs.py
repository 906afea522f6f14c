"""Run directories: naming, ``config.json``, and finding the checkpoint a command should load.

A run directory is self-describing. ``config.json`` says what made it (an agent's ``algo`` or a
supervised ``task``) and its full config; ``checkpoints/`` holds safetensors weights with JSON
sidecars (:mod:`core.checkpoint`). Commands take the directory, its ``checkpoints/`` folder, or one
checkpoint file, and :func:`locate_checkpoint` turns any of the three into the checkpoint to load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from core.checkpoint import CheckpointError, latest_checkpoint, read_sidecar
from core.files import atomic_write_json, jsonable

#: Seconds between the TensorBoard writer's flushes to disk, and so the longest its close waits: a run
#: stopped by a signal can find the writer thread in its timed queue wait, deaf to the close, until
#: the period ends (torch's default is 120 s; benchmarks/RESULTS.md, "Stopping a run").
TENSORBOARD_FLUSH_SECONDS = 10

RUN_FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"


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


def slug(name: str) -> str:
    """A name fit for a directory: ``SuperMarioBros-1-1-v0`` -> ``supermariobros-1-1-v0``."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-").lower()


def tensorboard_writer(run_dir: Path, purge_step: int | None) -> Any:
    """The run's TensorBoard ``SummaryWriter``; ``purge_step`` (a resumed run's first step or epoch)
    drops the events written after the checkpoint, so a resumed curve does not fold back."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir), purge_step=purge_step, flush_secs=TENSORBOARD_FLUSH_SECONDS)


def write_run_config(run_dir: Path, kind: str, name: str, config: Any) -> None:
    """Writes ``config.json``: what ``eval``, ``watch`` and ``--resume`` need to rebuild the run.

    Args:
        run_dir: the run directory (exists).
        kind: ``"algo"`` for an agent run, ``"task"`` for a supervised one.
        name: the algorithm (``"ppo"``) or the task (``"digits"``).
        config: the run's config dataclass.
    """
    atomic_write_json(
        Path(run_dir) / "config.json",
        {
            "run_format_version": RUN_FORMAT_VERSION,
            kind: name,
            "config": jsonable(dataclasses.asdict(config)),
        },
    )


def read_run_json(run_dir: Path, error: type[Exception] = CheckpointError) -> Any:
    """The parsed ``config.json`` of ``run_dir``; ``error`` (one line) when missing or unreadable."""
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{run_dir} is not a run directory (no config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path} is unreadable ({problem})") from None


def read_run_config(run_dir: Path, kind: str, error: type[Exception] = CheckpointError) -> tuple[str, dict]:
    """``(name, config dict)`` of a run directory made by an agent (``kind="algo"``) or a task.

    Raises:
        ``error``: not a run directory of that kind, or one of an incompatible format.
    """
    data = read_run_json(run_dir, error)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get(kind), str)
        or not isinstance(data.get("config"), dict)
    ):
        what = "an agent run (`lab train`)" if kind == "algo" else "a `lab fit` run"
        raise error(f"{run_dir} is not {what}: its config.json names no {kind}")
    # Task runs written before the format version was recorded have none; their format is version 1.
    version = data.get("run_format_version", RUN_FORMAT_VERSION if kind == "task" else None)
    if version != RUN_FORMAT_VERSION:
        raise error(
            f"{run_dir} was written by an incompatible lab version "
            f"(run format {version!r}, this lab reads {RUN_FORMAT_VERSION})"
        )
    return data[kind], data["config"]


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run directory of a run directory, its ``checkpoints/`` folder, or a checkpoint file in it."""
    path = Path(path)
    if path.is_dir():
        return path.parent if path.name == CHECKPOINTS and not (path / "config.json").exists() else path
    if path.parent.name == CHECKPOINTS and path.parent.is_dir():  # a checkpoint file
        return path.parent.parent
    return path  # nothing there: the caller's error names the path as given


def locate_checkpoint(path: str | os.PathLike, prefix: str = "") -> tuple[Path, dict[str, Any]]:
    """Finds the checkpoint to load from a run directory, its ``checkpoints/`` folder or a file.

    Args:
        path: any of the three; a file may be named with or without ``.json``/``.safetensors``.
        prefix: only checkpoints whose names start with it (``"epoch_"``).

    Returns:
        ``(sidecar_path, meta)``: the newest good checkpoint of a directory, and its sidecar's ``meta``.

    Raises:
        CheckpointError: nothing loadable there.
    """
    path = Path(path)
    if not path.exists() and not path.with_name(path.name + ".json").exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        folder = (
            path if path.name == CHECKPOINTS and not (path / "config.json").exists() else path / CHECKPOINTS
        )
        sidecar = latest_checkpoint(folder, prefix=prefix)
        if sidecar is None:
            raise CheckpointError(f"{path} holds no loadable checkpoint (looked in {folder})")
    else:
        sidecar = path
    return Path(sidecar), read_sidecar(sidecar).get("meta", {})
