"""2-D test surfaces for a gradient-descent playground, and optimiser trajectories on both engines.

Each surface is a plain Python function of two numbers written only with operators (``+ - * / **``),
so the same function runs on scratch Variables, torch tensors and numpy arrays (for contour plots).
``run_trajectory`` starts an optimiser at the surface's start point and records where it goes, with
either the scratch engine or torch.optim; the two agree to rounding error (tests/test_scratch_optim.py).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scratch import optim
from scratch.nn import Parameter

Point = tuple[float, float]


@dataclass(frozen=True)
class Surface:
    """A function f(x, y) with what a playground needs to show it.

    Attributes:
        name: Registry key.
        fn: f(x, y), operators only.
        minima: Every global minimum (x, y); the first is ``minimum``.
        min_value: f at the minima.
        start: Default start point of the optimisers.
        x_range, y_range: Plot window.
        description: One line for menus.
    """

    name: str
    fn: Callable[[Any, Any], Any]
    minima: tuple[Point, ...]
    min_value: float
    start: Point
    x_range: Point
    y_range: Point
    description: str

    @property
    def minimum(self) -> Point:
        """The (first) global minimum."""
        return self.minima[0]

    def __call__(self, x: Any, y: Any) -> Any:
        return self.fn(x, y)


def rosenbrock(x: Any, y: Any) -> Any:
    """(1 - x)^2 + 100 (y - x^2)^2: a curved, flat-bottomed valley; minimum 0 at (1, 1)."""
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def beale(x: Any, y: Any) -> Any:
    """Beale's function: steep walls, flat plateaus; minimum 0 at (3, 0.5)."""
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def saddle(x: Any, y: Any) -> Any:
    """x^2 - y^2 + y^4 / 2: a saddle at the origin between two minima, -0.5 at (0, 1) and (0, -1).

    Near the origin it is the classic x^2 - y^2 saddle; the quartic term bounds it from below.
    """
    return x**2 - y**2 + y**4 / 2


def quadratic(x: Any, y: Any) -> Any:
    """x^2 / 20 + y^2: a bowl 20 times steeper across than along; minimum 0 at (0, 0).

    The ill-conditioned example of "Deep Learning from Scratch" (section 6.1), with its start (-7, 2).
    """
    return x**2 / 20 + y**2


SURFACES: dict[str, Surface] = {
    s.name: s
    for s in (
        Surface(
            name="rosenbrock",
            fn=rosenbrock,
            minima=((1.0, 1.0),),
            min_value=0.0,
            start=(-1.2, 1.0),
            x_range=(-2.0, 2.0),
            y_range=(-1.0, 3.0),
            description="banana valley: easy to reach, slow to follow",
        ),
        Surface(
            name="beale",
            fn=beale,
            minima=((3.0, 0.5),),
            min_value=0.0,
            start=(1.0, 1.5),
            x_range=(-4.5, 4.5),
            y_range=(-4.5, 4.5),
            description="plateaus and steep ridges",
        ),
        Surface(
            name="saddle",
            fn=saddle,
            minima=((0.0, 1.0), (0.0, -1.0)),
            min_value=-0.5,
            start=(1.5, 0.01),
            x_range=(-2.0, 2.0),
            y_range=(-2.0, 2.0),
            description="start almost on a saddle point: who escapes first?",
        ),
        Surface(
            name="quadratic",
            fn=quadratic,
            minima=((0.0, 0.0),),
            min_value=0.0,
            start=(-7.0, 2.0),
            x_range=(-10.0, 10.0),
            y_range=(-5.0, 5.0),
            description="ill-conditioned bowl (condition number 20): plain SGD zig-zags",
        ),
    )
}

OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")

# Learning rates that make visible progress in 200 steps without diverging, per surface and optimiser.
DEFAULT_LR: dict[str, dict[str, float]] = {
    "rosenbrock": {"sgd": 2e-3, "momentum": 1e-3, "nesterov": 1e-3, "adagrad": 0.5, "rmsprop": 0.1, "adam": 0.3},
    "beale": {"sgd": 1e-2, "momentum": 2e-3, "nesterov": 2e-3, "adagrad": 0.5, "rmsprop": 0.05, "adam": 0.1},
    "saddle": {"sgd": 0.05, "momentum": 0.01, "nesterov": 0.01, "adagrad": 0.5, "rmsprop": 0.02, "adam": 0.05},
    "quadratic": {"sgd": 0.95, "momentum": 0.1, "nesterov": 0.1, "adagrad": 1.5, "rmsprop": 0.1, "adam": 0.3},
}  # fmt: skip


def get_surface(name: str) -> Surface:
    """The registered surface called ``name``.

    Raises:
        ValueError: Unknown name; the one-line message lists the valid ones.
    """
    if name not in SURFACES:
        raise ValueError(f"unknown surface '{name}'; valid: {', '.join(SURFACES)}")
    return SURFACES[name]


def check_optimizer(name: str) -> None:
    """Raises ValueError (one line, listing the valid names) unless ``name`` is in ``OPTIMIZERS``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")


def scratch_optimizer(name: str, params: list[Parameter], lr: float) -> optim.Optimizer:
    """The scratch optimiser called ``name`` (momentum 0.9 for the two momentum methods)."""
    check_optimizer(name)
    classes = {
        "sgd": optim.SGD,
        "momentum": optim.Momentum,
        "nesterov": optim.Nesterov,
        "adagrad": optim.AdaGrad,
        "rmsprop": optim.RMSProp,
        "adam": optim.Adam,
    }
    return classes[name](params, lr=lr)


def torch_optimizer(name: str, params: list[Any], lr: float) -> Any:
    """The torch.optim optimiser equivalent to ``scratch_optimizer(name, ...)``."""
    import torch

    check_optimizer(name)
    makers = {
        "sgd": lambda: torch.optim.SGD(params, lr=lr),
        "momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9),
        "nesterov": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=lr),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr),
        "adam": lambda: torch.optim.Adam(params, lr=lr),
    }
    return makers[name]()


def run_trajectory(
    surface: Surface | str,
    optimizer_name: str,
    steps: int = 200,
    lr: float | None = None,
    engine: str = "scratch",
    start: Point | None = None,
) -> np.ndarray:
    """Runs an optimiser on a surface and returns the visited points.

    Args:
        surface: A Surface or its registry name.
        optimizer_name: One of ``OPTIMIZERS``.
        steps: Gradient steps.
        lr: Learning rate; None takes ``DEFAULT_LR`` for this surface and optimiser.
        engine: "scratch" (this package) or "torch" (torch.optim on a float64 tensor).
        start: Start point; None takes the surface's.

    Returns:
        (steps + 1, 2): the start point, then the point after each step.
    """
    surface = get_surface(surface) if isinstance(surface, str) else surface
    check_optimizer(optimizer_name)
    if lr is None:
        lr = DEFAULT_LR.get(surface.name, {}).get(optimizer_name, 1e-3)
    point = np.array(surface.start if start is None else start, dtype=np.float64)
    if engine == "scratch":
        return _scratch_trajectory(surface, optimizer_name, steps, lr, point)
    if engine == "torch":
        return _torch_trajectory(surface, optimizer_name, steps, lr, point)
    raise ValueError(f"unknown engine '{engine}'; valid: scratch, torch")


def _scratch_trajectory(surface: Surface, name: str, steps: int, lr: float, point: np.ndarray) -> np.ndarray:
    p = Parameter(point)
    opt = scratch_optimizer(name, [p], lr)
    path = [p.data.copy()]
    for _ in range(steps):
        opt.zero_grad()
        surface(p[0], p[1]).backward()
        opt.step()
        path.append(p.data.copy())
    return np.stack(path)


def _torch_trajectory(surface: Surface, name: str, steps: int, lr: float, point: np.ndarray) -> np.ndarray:
    import torch

    p = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    opt = torch_optimizer(name, [p], lr)
    path = [point.copy()]
    for _ in range(steps):
        opt.zero_grad()
        surface(p[0], p[1]).backward()
        opt.step()
        path.append(p.detach().numpy().copy())
    return np.stack(path)


def steps_to_minimum(trajectory: np.ndarray, surface: Surface | str, tol: float = 1e-2) -> int | None:
    """The first step at which the trajectory is within ``tol`` (Euclidean) of a minimum; None if never."""
    surface = get_surface(surface) if isinstance(surface, str) else surface
    minima = np.array(surface.minima)  # (M, 2)
    with np.errstate(all="ignore"):  # a diverged trajectory is far away, not an error
        distance = np.linalg.norm(trajectory[:, None, :] - minima[None], axis=-1).min(axis=1)  # (T,)
    hits = np.flatnonzero(distance < tol)
    return int(hits[0]) if hits.size else None


def grid(surface: Surface, n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, Y, Z)`` on an n x n grid over the plot window, for contour plots; Z = f(X, Y)."""
    xs = np.linspace(*surface.x_range, n)
    ys = np.linspace(*surface.y_range, n)
    x, y = np.meshgrid(xs, ys)
    return x, y, surface(x, y)


def contour_axes(surface: Surface, dpi: int = 100) -> tuple[Any, Any]:
    """A 6 x 5 inch matplotlib ``(figure, axes)``: log-spaced contours of the surface, its minima marked."""
    from matplotlib.figure import Figure

    x, y, z = grid(surface)
    fig = Figure(figsize=(6, 5), dpi=dpi)
    ax = fig.add_subplot()
    # Log-spaced levels: the interesting structure sits near the minimum, far below the walls.
    levels = surface.min_value + np.logspace(-3, np.log10(z.max() - surface.min_value + 1e-12), 30)
    ax.contour(x, y, z, levels=levels, cmap="viridis", linewidths=0.6)
    ax.plot(*np.array(surface.minima).T, "r*", markersize=12, label="minimum")
    ax.set(xlim=surface.x_range, ylim=surface.y_range, title=surface.name, xlabel="x", ylabel="y")
    return fig, ax


def plot_trajectories(surface: Surface, trajectories: dict[str, np.ndarray], path: str | Path) -> Path:
    """Writes a PNG: log-spaced contours of the surface, its minima, and one line per trajectory."""
    fig, ax = contour_axes(surface)
    for name, points in trajectories.items():
        ax.plot(points[:, 0], points[:, 1], ".-", markersize=2, linewidth=1, label=name)
    ax.legend(fontsize=8)
    return _save_png(fig, Path(path))


def animate_trajectories(
    surface: Surface,
    trajectories: dict[str, np.ndarray],
    path: str | Path,
    frames: int = 50,
    dpi: int = 80,
) -> Path:
    """Writes an animated GIF of the trajectories growing step by step over the contour plot.

    Args:
        surface: The surface drawn underneath.
        trajectories: ``{name: (T + 1, 2) points}``, all of the same length.
        path: The .gif to write (through a temporary file and a rename).
        frames: About this many frames, evenly spaced over the steps; the last one is held longer.
        dpi: Resolution: the picture is 6 x 5 inches.

    Returns:
        ``path``.
    """
    import imageio.v3 as iio
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig, ax = contour_axes(surface, dpi)
    canvas = FigureCanvasAgg(fig)  # renders into memory: each frame becomes an array
    lines, heads = {}, {}
    for name in trajectories:
        lines[name] = ax.plot([], [], ".-", markersize=2, linewidth=1, label=name)[0]
        heads[name] = ax.plot([], [], "o", markersize=5, color=lines[name].get_color())[0]
    ax.legend(fontsize=8, loc="upper right")
    steps = len(next(iter(trajectories.values()))) - 1
    images = []
    for k in np.unique(np.linspace(0, steps, frames).round().astype(int)):
        for name, points in trajectories.items():
            lines[name].set_data(points[: k + 1, 0], points[: k + 1, 1])
            heads[name].set_data(points[k : k + 1, 0], points[k : k + 1, 1])
        ax.set_title(f"{surface.name}, step {k}")
        canvas.draw()
        images.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())  # (H, W, 3) uint8
    durations = [80] * (len(images) - 1) + [1500]

    def write(tmp: str) -> None:
        iio.imwrite(tmp, np.stack(images), extension=".gif", duration=durations, loop=0)

    return _save_file(Path(path), write)


def _save_png(fig: Any, path: Path) -> Path:
    """Saves a figure as a PNG through a temporary file and a rename, so a reader never sees half a PNG."""
    return _save_file(path, lambda tmp: fig.savefig(tmp, dpi=100))


def _save_file(path: Path, write: Callable[[str], Any]) -> Path:
    """Calls ``write(temporary path)`` in ``path``'s folder, then renames the file to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
