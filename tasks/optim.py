"""A gradient-descent playground: six optimisers racing on a 2-D surface, on both engines.

``lab fit optim`` starts SGD, momentum, Nesterov, AdaGrad, RMSProp and Adam from the same point of a
test surface (Rosenbrock's banana valley, Beale's plateaus, a saddle, an ill-conditioned bowl; see
``scratch.surfaces``) and records where each one goes. Nothing is learnt from data: the parameters
are the point (x, y) itself and the loss is the surface's height there.

Every optimiser runs twice, with the scratch engine (``scratch.optim``, gradients by the scratch
autograd) and with ``torch.optim`` (gradients by torch.autograd), the reference; the two paths must
agree within ``AGREEMENT`` at every step. ``engine`` picks the one that is drawn and counted.

The run writes ``trajectories.png`` (contours and every path), ``trajectories.gif`` (the paths
growing step by step), ``distance.png`` (distance to the nearest minimum per step, one line per
optimiser, log scale), ``trajectories.csv`` and ``metrics.json``, which holds for each optimiser the
first step within ``tol`` of a minimum.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import option
from core.files import atomic_write_bytes
from core.plots import Panel, plot_history
from core.runs import write_run_config
from scratch import surfaces
from tasks import distributed
from tasks.loop import TaskError, write_metrics

NAME = "optim"
DESCRIPTION = "gradient-descent playground: SGD ... Adam racing on 2-D surfaces, scratch vs torch.optim"
NETS = ("point",)  # nothing to build: the parameters are the point (x, y) itself
ENGINES = ("scratch", "torch")
# The largest engine difference (see ``engine_difference``), at any step, that counts as agreeing.
AGREEMENT = 1e-6


@dataclass
class OptimConfig:
    """Settings of ``lab fit optim``."""

    net: str = option("point", "what is trained: the point (x, y) itself, no network", choices=NETS)
    surface: str = option("quadratic", "the function to minimise", choices=tuple(surfaces.SURFACES))
    optimizers: tuple[str, ...] = option(surfaces.OPTIMIZERS, "optimisers to race, comma-separated")
    steps: int = option(200, "gradient steps of each optimiser", min=1, max=100_000)
    lr: float | None = option(
        None, "learning rate of every optimiser; none: tuned per surface and optimiser", min=1e-9, max=1e3
    )
    tol: float = option(1e-2, "distance to a minimum that counts as reaching it", min=1e-12, max=10.0)
    start: tuple[float, ...] | None = option(None, "start point x,y; none: the surface's", min=-1e3, max=1e3)
    engine: str = option("scratch", "the engine drawn and counted; the other checks it", choices=ENGINES)
    gif: bool = option(True, "also write trajectories.gif")
    device: str = option(
        "cpu", "where torch.optim runs: a 2-D point gains nothing from a GPU", choices=("cpu",)
    )

    def check(self) -> None:
        if not self.optimizers:
            raise ValueError(f"optimizers is empty; choose from: {', '.join(surfaces.OPTIMIZERS)}")
        for name in self.optimizers:
            surfaces.check_optimizer(name)
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"optimizers names one twice: {','.join(self.optimizers)}")
        if self.start is not None and len(self.start) != 2:
            raise ValueError(f"start takes two numbers x,y; got {len(self.start)}")


@dataclass(frozen=True)
class OptimizerResult:
    """How one optimiser did.

    Attributes:
        lr: the learning rate it ran with.
        steps_to_minimum: the first step within ``tol`` of a minimum; None if it never came that close.
        final_point: where it stood after the last step (NaN or inf once it diverged).
        final_value: the surface's height there.
        final_distance: the distance from there to the nearest minimum.
        engine_difference: the largest difference between the two engines' paths over all steps
            (see ``engine_difference``).
    """

    lr: float
    steps_to_minimum: int | None
    final_point: tuple[float, float]
    final_value: float
    final_distance: float
    engine_difference: float


def engine_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest |ours - theirs| / max(1, |theirs|) over two ``(T, 2)`` paths, where both are finite.

    The absolute difference wherever the coordinates are within 1 of the origin, the relative one
    beyond: a path that runs off to 1e300 cannot agree to 1e-6 absolutely, only in its digits. inf
    where one path is finite and the other is not.
    """
    finite = np.isfinite(ours)
    if not np.array_equal(finite, np.isfinite(theirs)):
        return math.inf
    scale = np.maximum(1.0, np.abs(theirs[finite]))
    return float((np.abs(ours[finite] - theirs[finite]) / scale).max(initial=0.0))


def distances(path: np.ndarray, surface: surfaces.Surface) -> np.ndarray:
    """Distance of every point of a ``(T, 2)`` path to the nearest minimum: ``(T,)``."""
    minima = np.array(surface.minima)  # (M, 2)
    with np.errstate(all="ignore"):  # a diverged path is inf or NaN far away, without a warning
        return np.linalg.norm(path[:, None, :] - minima[None], axis=-1).min(axis=1)


def race(config: OptimConfig) -> tuple[dict[str, np.ndarray], dict[str, OptimizerResult]]:
    """Runs every optimiser of ``config`` on both engines.

    Returns:
        The paths of ``config.engine`` (``{name: (steps + 1, 2)}``) and each optimiser's result.
    """
    surface = surfaces.get_surface(config.surface)
    start = surface.start if config.start is None else (float(config.start[0]), float(config.start[1]))
    paths: dict[str, np.ndarray] = {}
    results: dict[str, OptimizerResult] = {}
    for name in config.optimizers:
        lr = surfaces.DEFAULT_LR[surface.name][name] if config.lr is None else config.lr
        with np.errstate(all="ignore"):  # a learning rate too large overflows: the path shows it
            runs = {
                engine: surfaces.run_trajectory(surface, name, config.steps, lr, engine=engine, start=start)
                for engine in ENGINES
            }
        path = paths[name] = runs[config.engine]
        with np.errstate(all="ignore"):
            final_value = float(surface(*path[-1]))
        results[name] = OptimizerResult(
            lr=lr,
            steps_to_minimum=surfaces.steps_to_minimum(path, surface, config.tol),
            final_point=(float(path[-1, 0]), float(path[-1, 1])),
            final_value=final_value,
            final_distance=float(distances(path[-1:], surface)[0]),
            engine_difference=engine_difference(runs["scratch"], runs["torch"]),
        )
    return paths, results


def report_lines(
    config: OptimConfig, start: tuple[float, float], results: dict[str, OptimizerResult]
) -> list[str]:
    """The table ``lab fit optim`` prints: one row per optimiser."""
    worst = max(r.engine_difference for r in results.values())
    lines = [
        f"{config.surface} from ({start[0]:g}, {start[1]:g}), {config.steps} steps on the {config.engine} "
        f"engine; within {config.tol:g} of a minimum counts as reached",
        f"  {'optimizer':<10} {'lr':>8} {'reached at':>10}   {'final (x, y)':<20} {'f(x, y)':>10} "
        f"{'scratch vs torch':>18}",
    ]
    for name, r in results.items():
        reached = "-" if r.steps_to_minimum is None else str(r.steps_to_minimum)
        point = f"({r.final_point[0]:.3g}, {r.final_point[1]:.3g})"
        lines.append(
            f"  {name:<10} {r.lr:>8.3g} {reached:>10}   {point:<20} {r.final_value:>10.3g} "
            f"{r.engine_difference:>18.1e}"
        )
    verdict = "agree" if worst <= AGREEMENT else "DISAGREE"
    lines.append(
        f"scratch and torch.optim {verdict} within {AGREEMENT:g} at every step (largest: {worst:.1e})"
    )
    return lines


def trajectories_csv(paths: dict[str, np.ndarray]) -> bytes:
    """The paths as CSV text, one row per optimiser and step: ``optimizer,step,x,y``."""
    out = io.StringIO()
    out.write("optimizer,step,x,y\n")
    for name, path in paths.items():
        for step, (x, y) in enumerate(path):
            out.write(f"{name},{step},{float(x)!r},{float(y)!r}\n")  # repr: every digit
    return out.getvalue().encode()


def run(config: OptimConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Races the optimisers and writes the pictures, the paths and the metrics.

    Args:
        config: the task settings.
        run_dir: existing directory receiving the outputs.
        progress: unused (a race takes seconds); there for the task interface.
        resume: refused: a race keeps no checkpoints, run it again instead.

    Returns:
        The metrics dict written to ``run_dir/metrics.json``.

    Raises:
        TaskError: ``resume``, or settings ``OptimConfig.check`` refuses.
    """
    if resume:
        raise TaskError(f"{NAME} runs keep no checkpoints (a race takes seconds): start a new run")
    if distributed.ranks().world > 1:
        raise TaskError(f"{NAME} runs in one process (a race takes seconds); drop --procs")
    try:
        config.check()
    except ValueError as error:
        raise TaskError(str(error)) from None
    started = time.perf_counter()
    run_dir = Path(run_dir)
    surface = surfaces.get_surface(config.surface)
    start = surface.start if config.start is None else (float(config.start[0]), float(config.start[1]))
    write_run_config(run_dir, "task", NAME, config)

    paths, results = race(config)
    distance = {name: distances(path, surface) for name, path in paths.items()}  # {name: (steps + 1,)}
    history = [
        {"step": step, **{name: float(d[step]) for name, d in distance.items()}}
        for step in range(config.steps + 1)
    ]
    title = f"{surface.name} from ({start[0]:g}, {start[1]:g}), {config.engine} engine"
    surfaces.plot_trajectories(surface, paths, run_dir / "trajectories.png")
    if config.gif:
        surfaces.animate_trajectories(surface, paths, run_dir / "trajectories.gif")
    panel = Panel(tuple(paths), "distance to the nearest minimum", legend=tuple(paths), log=True)
    plot_history(history, "step", [panel], run_dir / "distance.png", title=title)
    atomic_write_bytes(run_dir / "trajectories.csv", trajectories_csv(paths))

    reached = [name for name, r in results.items() if r.steps_to_minimum is not None]
    worst = max(r.engine_difference for r in results.values())
    metrics: dict[str, Any] = {
        "task": NAME,
        "net": config.net,
        "surface": surface.name,
        "start": list(start),
        "steps": config.steps,
        "tol": config.tol,
        "engine": config.engine,
        "metric": "reached",  # the share of the optimisers that came within tol of a minimum
        "test_metric": len(reached) / len(results),
        # The lowest final height: the loss of this "training".
        "train_loss": min(
            (r.final_value for r in results.values() if math.isfinite(r.final_value)), default=math.nan
        ),
        "fastest": min(reached, key=lambda name: results[name].steps_to_minimum, default=None),
        "optimizers": {name: dataclasses.asdict(r) for name, r in results.items()},
        "max_engine_difference": worst,
        "engines_agree": worst <= AGREEMENT,
        "seconds": round(time.perf_counter() - started, 3),
        "run_dir": str(run_dir),
        "report": report_lines(config, start, results),
        "history": history,
    }
    write_metrics(run_dir, metrics)
    return metrics
