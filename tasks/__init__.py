"""Tasks run by ``lab fit TASK``: xor, playground, digits, sequence, sentiment, ssl, lm, optim.

Each task is one module with a config dataclass (every field carries ``help`` and, where they apply,
``min``/``max``/``choices`` metadata, so ``--set key=value`` is validated), a ``run(config, run_dir,
progress)`` that trains through the shared loop in :mod:`tasks.loop`, and the names of the nets it can
use. This registry is what the command line sees::

    spec = tasks.get("digits")
    config = apply_overrides(spec.config_class(net="impala", epochs=5), ["shift=0"])
    metrics = spec.run(config, Path("runs/digits-1"))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tasks import digits, lm, optim, playground, sentiment, sequence, ssl, xor
from tasks.loop import TaskError

__all__ = ["TaskError", "TaskSpec", "describe", "get", "names", "run"]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: the name ``lab fit`` takes.
        description: one line for ``lab list tasks``.
        config_class: the task's config dataclass; fields ``net, epochs, seed, lr, batch_size, device``
            exist in every one.
        default_net: the net used when ``--net`` is not given (also the config's default).
        nets: the valid net names for this task.
        run: ``run(config, run_dir, progress=True, resume=False) -> metrics dict``; writes into the
            existing run_dir; ``resume`` continues it from its newest epoch checkpoint.
    """

    name: str
    description: str
    config_class: type
    default_net: str
    nets: tuple[str, ...]
    run: Callable[..., dict[str, Any]]


def _spec(module: ModuleType, config_class: type) -> TaskSpec:
    return TaskSpec(
        name=module.NAME,
        description=module.DESCRIPTION,
        config_class=config_class,
        default_net=config_class().net,
        nets=tuple(module.NETS),
        run=module.run,
    )


_REGISTRY: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _spec(xor, xor.XorConfig),
        _spec(playground, playground.PlaygroundConfig),
        _spec(digits, digits.DigitsConfig),
        _spec(sequence, sequence.SequenceConfig),
        _spec(sentiment, sentiment.SentimentConfig),
        _spec(ssl, ssl.SSLConfig),
        _spec(lm, lm.LMConfig),
        _spec(optim, optim.OptimConfig),
    )
}


def names() -> list[str]:
    """The registered task names, in teaching order (xor first)."""
    return list(_REGISTRY)


def get(name: str) -> TaskSpec:
    """The task called ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid tasks.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def describe(name: str) -> str:
    """One-line description of a task (for ``lab list tasks``)."""
    return get(name).description


def run(
    name: str,
    run_dir: str | Path,
    overrides: list[str] | None = None,
    progress: bool = False,
    resume: bool = False,
    **fields: Any,
):
    """Convenience for scripts and tests: builds the config from ``fields`` and ``--set`` style overrides.

    Args:
        name: task name.
        run_dir: directory to write into (created if missing).
        overrides: ``["key=value", ...]`` validated by ``lab.config.apply_overrides``.
        progress: show a progress bar.
        resume: continue the run in ``run_dir`` from its newest epoch checkpoint (same config,
            ``epochs`` may be raised).
        **fields: config fields set directly (``epochs=3``).

    Returns:
        The metrics dict.
    """
    from core.config import apply_overrides, validate

    spec = get(name)
    config = apply_overrides(spec.config_class(**fields), overrides)
    validate(config)
    if config.net not in spec.nets:
        raise ValueError(f"unknown net {config.net!r} for task {name}; valid nets: {', '.join(spec.nets)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return spec.run(config, run_dir, progress=progress, resume=resume)
