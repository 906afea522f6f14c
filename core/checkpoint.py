"""Checkpoints: weights in safetensors plus a JSON sidecar, written atomically, loaded without pickle.

A checkpoint is two files that share a stem, ``<stem>.safetensors`` and ``<stem>.json``. Any nested
structure of dicts, lists, tuples, tensors, numpy arrays and JSON scalars (a model's state dict, an
optimizer's state dict, RNG states, counters) is split by :func:`pack` into a flat ``{key: tensor}``
map for safetensors and a JSON skeleton in which each tensor is replaced by ``{"__tensor__": key}``.

Crash safety: each file is written to a temporary name, fsynced and ``os.replace``-d into place, the
weights first. The sidecar records the SHA-256 of the weights file, so a sidecar and a weights file
from two different saves (a kill between the two renames) never load as one checkpoint: the loader
reports it as corrupt and :func:`latest_checkpoint` falls back to the previous good one. Both files
are written to their temporary names before either is renamed, so a full disk or a read-only
directory (:class:`StorageError`) replaces nothing and leaves no temporary file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from core.errors import CheckpointError
from core.files import StorageError, atomic_write_files, json_bytes, signals_deferred

FORMAT = "agent-lab-checkpoint"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Packing nested state into (JSON skeleton, flat tensor map)
# ---------------------------------------------------------------------------------------------


def pack(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Splits a nested structure into a JSON-able skeleton and a flat map of tensors.

    Args:
        obj: dicts (string or int keys), lists, tuples, tensors, numpy arrays and JSON scalars.
        prefix: key prefix for the tensors found inside ``obj``.

    Returns:
        ``(skeleton, tensors)``; :func:`unpack` inverts it.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(node, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(node))
            return {"__ndarray__": path}
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if not isinstance(key, str | int):
                    raise TypeError(f"cannot checkpoint a dict key of type {type(key).__name__}")
                # JSON object keys are strings; remember int keys (optimizer state uses them).
                json_key = key if isinstance(key, str) else f"__int__{key}"
                out[json_key] = walk(value, f"{path}/{key}" if path else str(key))
            return {"__dict__": out}
        if isinstance(node, list | tuple):
            items = [walk(value, f"{path}/{i}") for i, value in enumerate(node)]
            return {"__tuple__": items} if isinstance(node, tuple) else items
        if isinstance(node, np.integer | np.floating | np.bool_):
            return node.item()
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise TypeError(f"cannot checkpoint a value of type {type(node).__name__} at {path!r}")

    return walk(obj, prefix), tensors


def unpack(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuilds what :func:`pack` split. Raises CheckpointError on a dangling tensor reference."""
    if isinstance(skeleton, list):
        return [unpack(item, tensors) for item in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton or "__ndarray__" in skeleton:
            key = skeleton.get("__tensor__", skeleton.get("__ndarray__"))
            if key not in tensors:
                raise CheckpointError(f"checkpoint is inconsistent: tensor {key!r} is missing")
            return tensors[key] if "__tensor__" in skeleton else tensors[key].numpy()
        if "__tuple__" in skeleton:
            return tuple(unpack(item, tensors) for item in skeleton["__tuple__"])
        if "__dict__" in skeleton:
            return {
                (int(k[len("__int__") :]) if k.startswith("__int__") else k): unpack(v, tensors)
                for k, v in skeleton["__dict__"].items()
            }
        raise CheckpointError("checkpoint is inconsistent: unknown node in the JSON sidecar")
    return skeleton


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    stem: str | os.PathLike, state: dict[str, Any], meta: dict[str, Any] | None = None
) -> Path:
    """Saves ``state`` (nested tensors and scalars) as ``<stem>.safetensors`` + ``<stem>.json``.

    Args:
        stem: path without suffix, e.g. ``runs/x/checkpoints/step_000001024``.
        state: what to restore later (model/optimizer state dicts, RNG states, counters).
        meta: JSON-able description (config, kind, versions) stored in the sidecar as is.

    Returns:
        The path of the JSON sidecar.
    """
    stem = Path(stem)
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(stem.parent, error) from error
    skeleton, tensors = pack(state)
    weights = safetensors_save(tensors) if tensors else safetensors_save({"__empty__": torch.zeros(0)})
    weights_path = stem.with_name(stem.name + ".safetensors")
    sidecar_path = stem.with_name(stem.name + ".json")
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights_file": weights_path.name,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
        "meta": meta or {},
        "state": skeleton,
    }
    # Weights renamed first: a kill between the two renames leaves an old sidecar whose hash does
    # not match, which loads as corrupt instead of as a mix of two saves.
    atomic_write_files([(weights_path, weights), (sidecar_path, json_bytes(sidecar))])
    return sidecar_path


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates a checkpoint's JSON sidecar (``<stem>.json`` or ``<stem>.safetensors``)."""
    sidecar_path = _sidecar_path(Path(path))
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {sidecar_path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"checkpoint sidecar {sidecar_path} is unreadable or truncated ({error})"
        ) from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar_path} is not an agent-lab checkpoint")
    if sidecar.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{sidecar_path} has checkpoint format version {sidecar.get('format_version')!r}; "
            f"this lab reads version {FORMAT_VERSION}"
        )
    return sidecar


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads a checkpoint written by :func:`save_checkpoint`; never unpickles anything.

    Args:
        path: the ``.json`` sidecar, the ``.safetensors`` file, or their common stem.

    Returns:
        ``(state, meta)``.

    Raises:
        CheckpointError: missing, truncated, tampered (hash mismatch) or foreign files.
    """
    sidecar_path = _sidecar_path(Path(path))
    sidecar = read_sidecar(sidecar_path)
    weights_path = sidecar_path.with_name(str(sidecar.get("weights_file", "")))
    try:
        weights = weights_path.read_bytes()
    except OSError:
        raise CheckpointError(f"checkpoint weights {weights_path} are missing or unreadable") from None
    if hashlib.sha256(weights).hexdigest() != sidecar.get("weights_sha256"):
        raise CheckpointError(
            f"checkpoint weights {weights_path} do not match their sidecar (truncated or tampered)"
        )
    try:
        tensors = safetensors_load(weights)
    except Exception as error:  # safetensors raises its own error types on malformed headers
        raise CheckpointError(f"checkpoint weights {weights_path} are malformed ({error})") from None
    return unpack(sidecar["state"], tensors), sidecar.get("meta", {})


def _sidecar_path(path: Path) -> Path:
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    if path.suffix == ".json":
        return path
    return path.with_name(path.name + ".json")


def list_checkpoints(directory: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Sidecars of the checkpoints in ``directory`` whose names start with ``prefix``, oldest first
    (names sort by step or epoch)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{prefix}*.json") if not p.name.startswith("."))


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "") -> Path | None:
    """The newest checkpoint in ``directory`` (named ``prefix...``) that loads cleanly, skipping corrupt ones."""
    for sidecar_path in reversed(list_checkpoints(directory, prefix)):
        try:
            load_checkpoint(sidecar_path)
        except CheckpointError:
            continue
        return sidecar_path
    return None


def prune_checkpoints(directory: str | os.PathLike, keep: int, prefix: str = "") -> None:
    """Deletes all but the newest ``keep`` checkpoints named ``prefix...`` (both files of each)."""
    for sidecar_path in list_checkpoints(directory, prefix)[:-keep] if keep > 0 else []:
        weights_path = sidecar_path.with_suffix(".safetensors")
        with signals_deferred():  # never one file of the pair without the other
            for file in (sidecar_path, weights_path):
                file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------


def rng_state(np_rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Captures torch (CPU and CUDA), numpy-global, Python and an optional numpy Generator state."""
    import random

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _jsonable_np_state(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    if np_rng is not None:
        state["np_generator"] = json.loads(json.dumps(np_rng.bit_generator.state))
    return state


def set_rng_state(state: dict[str, Any], np_rng: np.random.Generator | None = None) -> None:
    """Restores what :func:`rng_state` captured."""
    import random

    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if np_rng is not None and "np_generator" in state:
        np_rng.bit_generator.state = state["np_generator"]


def _jsonable_np_state(np_state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = np_state
    return (name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached))
