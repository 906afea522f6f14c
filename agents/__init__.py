"""Reinforcement-learning agents on the run engine of :mod:`agents.engine`: PPO and DQN.

``ALGOS`` maps an algorithm's name to its module; every module has ``ALGO``, a config dataclass
(``CONFIG``), ``train(config, run_dir, resume, progress)``, ``load_policy(sidecar, meta, device)`` and
``config_from_dict(values)``. :func:`load_agent` turns a run directory, its ``checkpoints/`` folder or a
checkpoint file into a ready policy, for every command that plays an agent.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from agents import dqn, ppo
from core.checkpoint import CheckpointError
from core.compute import resolve_device
from core.runs import locate_checkpoint, run_dir_of

ALGOS: dict[str, ModuleType] = {"ppo": ppo, "dqn": dqn}


def algo_module(name: str) -> ModuleType:
    """The module of algorithm ``name``; ValueError naming the valid ones otherwise."""
    if name not in ALGOS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGOS)}")
    return ALGOS[name]


class LoadedAgent(NamedTuple):
    """A trained agent ready to play: its policy, config, checkpoint meta and where it came from."""

    policy: Any  # agents.episodes.Policy: PPOPolicy or DQNPolicy
    config: Any  # PPOConfig or DQNConfig
    meta: dict[str, Any]  # the checkpoint's meta: algo, config, obs_shape, num_actions
    sidecar: Path  # the checkpoint file loaded
    run_dir: Path  # the run directory it belongs to


def load_agent(path: str | Path, device: str = "cpu", stochastic: bool = False, seed: int = 0) -> LoadedAgent:
    """Loads the policy of a run directory, its ``checkpoints/`` folder or a checkpoint file.

    Args:
        path: any of the three.
        device: ``auto``, ``cpu`` or ``cuda``.
        stochastic: sample actions (PPO) or act epsilon-greedily (DQN) instead of greedily, seeded
            with ``seed``.

    Raises:
        CheckpointError: nothing loadable there, or not an agent's checkpoint.
    """
    sidecar, meta = locate_checkpoint(path)
    if "algo" not in meta or "config" not in meta:
        raise CheckpointError(f"{sidecar} is not an agent checkpoint (no algo/config in its sidecar)")
    if meta["algo"] not in ALGOS:
        raise CheckpointError(f"{sidecar} was written by an unknown algorithm {meta['algo']!r}")
    module = ALGOS[meta["algo"]]
    policy = module.load_policy(sidecar, meta, resolve_device(device))
    if stochastic:
        policy.sample_actions(seed)
    config = module.config_from_dict(meta["config"], source=str(sidecar))
    return LoadedAgent(policy, config, meta, sidecar, run_dir_of(sidecar))
