"""scratch.optim and scratch.surfaces against torch.optim: trajectories, defaults, a trained network."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nets
from scratch import nn, ops, optim, surfaces
from scratch.nn import Parameter

torch.set_num_threads(1)


def torch_copy(model: nn.MLP) -> nets.MLP:
    """A float64 nets.MLP (its final Linear included) with the weights of a scratch MLP."""
    net = nets.MLP(model.in_dim, model.hidden, out_dim=model.out_dim, activation=model.activation).double()
    net.load_state_dict(nn.to_torch_state_dict(model), strict=True)
    return net


# ==================================================================================================
# Trajectories on the test surfaces
# ==================================================================================================


@pytest.mark.parametrize("optimizer", surfaces.OPTIMIZERS)
@pytest.mark.parametrize("surface", list(surfaces.SURFACES))
def test_trajectory_matches_torch_optim(surface: str, optimizer: str) -> None:
    ours = surfaces.run_trajectory(surface, optimizer, steps=200)
    theirs = surfaces.run_trajectory(surface, optimizer, steps=200, engine="torch")
    assert ours.shape == theirs.shape == (201, 2)
    np.testing.assert_array_equal(ours[0], surfaces.get_surface(surface).start)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("optimizer", surfaces.OPTIMIZERS)
@pytest.mark.parametrize("surface", list(surfaces.SURFACES))
def test_default_learning_rate_makes_progress(surface: str, optimizer: str) -> None:
    s = surfaces.get_surface(surface)
    path = surfaces.run_trajectory(s, optimizer, steps=200)
    gap = [float(s(*point)) - s.min_value for point in (path[0], path[-1])]
    assert gap[1] < 0.25 * gap[0], f"{optimizer} on {surface}: f - min went from {gap[0]:.3g} to {gap[1]:.3g}"
    distance = [min(np.hypot(*(point - m)) for m in s.minima) for point in (path[0], path[-1])]
    assert distance[1] < distance[0]


def test_explicit_learning_rate_and_start_are_used() -> None:
    a = surfaces.run_trajectory("quadratic", "sgd", steps=1, lr=0.1, start=(2.0, 1.0))
    # f = x^2 / 20 + y^2: gradient (x / 10, 2 y) = (0.2, 2); one step of lr 0.1.
    np.testing.assert_allclose(a, [[2.0, 1.0], [1.98, 0.8]], rtol=1e-15)


# ==================================================================================================
# Each optimiser on a bigger problem, with non-default settings
# ==================================================================================================

SETTINGS = [
    (optim.SGD, torch.optim.SGD, {"lr": 0.05}, {}),
    (optim.Momentum, torch.optim.SGD, {"lr": 0.02, "momentum": 0.8}, {"momentum": 0.8}),
    (optim.Nesterov, torch.optim.SGD, {"lr": 0.02, "momentum": 0.7}, {"momentum": 0.7, "nesterov": True}),
    (optim.AdaGrad, torch.optim.Adagrad, {"lr": 0.3, "eps": 1e-6}, {"eps": 1e-6}),
    (optim.RMSProp, torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.9, "eps": 1e-4}, {"alpha": 0.9, "eps": 1e-4}),
    (optim.Adam, torch.optim.Adam, {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-3}, {"betas": (0.8, 0.99), "eps": 1e-3}),
    (optim.AdamW, torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}, {"weight_decay": 0.1}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs", "torch_kwargs"), SETTINGS, ids=lambda v: getattr(v, "__name__", "")
)
def test_optimizer_matches_torch_on_matrix_parameters(
    ours: type[optim.Optimizer], theirs: type[torch.optim.Optimizer], kwargs: dict, torch_kwargs: dict
) -> None:
    # Least squares with two parameters of different shapes: loss = mean((X A + b - Y)^2).
    rng = np.random.default_rng(0)
    x, target = rng.normal(size=(20, 3)), rng.normal(size=(20, 2))
    a0, b0 = rng.normal(size=(3, 2)), rng.normal(size=(2,))
    a, b = Parameter(a0.copy()), Parameter(b0.copy())
    opt = ours([a, b], **kwargs)
    ta, tb = torch.tensor(a0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    topt = theirs([ta, tb], lr=kwargs["lr"], **torch_kwargs)
    for _ in range(60):
        opt.zero_grad()
        ops.mse(x @ a + b, target).backward()
        opt.step()
        topt.zero_grad()
        F.mse_loss(torch.tensor(x) @ ta + tb, torch.tensor(target)).backward()
        topt.step()
    np.testing.assert_allclose(a.data, ta.detach().numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(b.data, tb.detach().numpy(), rtol=0, atol=1e-10)
    assert not np.allclose(a.data, a0)  # it moved


@pytest.mark.parametrize(
    ("ours", "theirs", "names"),
    [(optim.SGD, torch.optim.SGD, ["lr"]), (optim.AdaGrad, torch.optim.Adagrad, ["lr", "eps"]),
     (optim.RMSProp, torch.optim.RMSprop, ["lr", "alpha", "eps"]),
     (optim.Adam, torch.optim.Adam, ["lr", "betas", "eps"]),
     (optim.AdamW, torch.optim.AdamW, ["lr", "betas", "eps", "weight_decay"])],
)  # fmt: skip
def test_default_hyper_parameters_are_torchs(ours: type, theirs: type, names: list[str]) -> None:
    defaults = theirs([torch.zeros(1, requires_grad=True)]).defaults
    signature = inspect.signature(ours).parameters
    for name in names:
        assert signature[name].default == pytest.approx(defaults[name]), name


def test_parameters_without_gradient_are_left_alone() -> None:
    used, unused = Parameter(np.array([1.0])), Parameter(np.array([2.0]))
    opt = optim.Adam([used, unused], lr=0.1)
    (used * used).sum().backward()
    opt.step()
    assert unused.data[0] == 2.0 and used.data[0] == pytest.approx(0.9)


def test_step_does_not_write_into_the_callers_array() -> None:
    start = np.array([1.0, 2.0])
    p = Parameter(start)
    opt = optim.SGD([p], lr=0.5)
    (p * p).sum().backward()
    opt.step()
    np.testing.assert_array_equal(start, [1.0, 2.0])
    np.testing.assert_array_equal(p.data, [0.0, 0.0])


def test_empty_parameter_list_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.Adam([])


# ==================================================================================================
# A whole network: scratch MLP + AdamW against nets.MLP + torch.optim.AdamW
# ==================================================================================================


def test_xor_training_follows_torch_step_for_step() -> None:
    x = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    labels = np.array([0, 1, 1, 0])
    model = nn.MLP(2, (8,), 2, activation="tanh", seed=0)
    torch_net = torch_copy(model)
    opt = optim.AdamW(model.parameters(), lr=0.05, weight_decay=1e-3)
    topt = torch.optim.AdamW(torch_net.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(150):
        loss = nn.train_step(model, opt, x, labels)
        topt.zero_grad()
        torch_loss = F.cross_entropy(torch_net(torch.tensor(x)), torch.tensor(labels))
        torch_loss.backward()
        topt.step()
        assert loss == pytest.approx(torch_loss.item(), rel=1e-8, abs=1e-12)
    assert nn.accuracy(model, x, labels) == 1.0
    state = nn.to_torch_state_dict(model)
    for key, value in torch_net.state_dict().items():
        np.testing.assert_allclose(state[key].numpy(), value.numpy(), rtol=0, atol=1e-8, err_msg=key)


# ==================================================================================================
# The surface registry
# ==================================================================================================


@pytest.mark.parametrize("name", list(surfaces.SURFACES))
def test_registry_minima_are_stationary_points_of_the_stated_value(name: str) -> None:
    s = surfaces.get_surface(name)
    assert s.name == name and s.minimum == s.minima[0]
    for m in s.minima:
        p = Parameter(np.array(m))
        value = s(p[0], p[1])
        value.backward()
        assert value.item() == pytest.approx(s.min_value, abs=1e-12)
        np.testing.assert_allclose(p.grad.data, [0.0, 0.0], atol=1e-12)
    # The start is not a minimum, and lies in the plot window.
    assert float(s(*s.start)) > s.min_value + 0.1
    assert s.x_range[0] < s.start[0] < s.x_range[1] and s.y_range[0] < s.start[1] < s.y_range[1]


def test_surfaces_run_on_torch_and_numpy_too() -> None:
    s = surfaces.get_surface("beale")
    point = (0.5, -1.0)
    expected = (1.5 - 0.5 - 0.5) ** 2 + (2.25 - 0.5 + 0.5) ** 2 + (2.625 - 0.5 - 0.5) ** 2
    assert s(*point) == pytest.approx(expected)
    assert s(torch.tensor(0.5), torch.tensor(-1.0)).item() == pytest.approx(expected)
    x, y, z = surfaces.grid(s, n=7)
    assert x.shape == y.shape == z.shape == (7, 7) and z[0, 0] == pytest.approx(s(s.x_range[0], s.y_range[0]))


def test_steps_to_minimum() -> None:
    s = surfaces.get_surface("saddle")  # minima (0, 1) and (0, -1)
    path = np.array([[1.0, 0.0], [0.5, -0.5], [0.05, -0.98], [0.0, -1.0]])
    assert surfaces.steps_to_minimum(path, s, tol=0.1) == 2
    assert surfaces.steps_to_minimum(path, "saddle", tol=1e-9) == 3
    assert surfaces.steps_to_minimum(path[:2], s, tol=0.1) is None
    quadratic = surfaces.run_trajectory("quadratic", "sgd", steps=200)
    k = surfaces.steps_to_minimum(quadratic, "quadratic", tol=1e-2)
    assert k is not None and np.hypot(*quadratic[k]) < 1e-2 <= np.hypot(*quadratic[k - 1])


def test_unknown_surface_optimizer_or_engine_is_a_one_line_value_error() -> None:
    with pytest.raises(
        ValueError, match=r"^unknown surface 'himmelblau'; valid: rosenbrock, beale, saddle, quadratic$"
    ):
        surfaces.get_surface("himmelblau")
    valid = "sgd, momentum, nesterov, adagrad, rmsprop, adam"
    with pytest.raises(ValueError, match=rf"^unknown optimizer 'lbfgs'; valid: {valid}$"):
        surfaces.run_trajectory("beale", "lbfgs", steps=3)
    with pytest.raises(ValueError, match=r"^unknown engine 'jax'; valid: scratch, torch$"):
        surfaces.run_trajectory("beale", "adam", steps=3, engine="jax")


def test_plot_trajectories_writes_a_png(tmp_path: Path) -> None:
    s = surfaces.get_surface("rosenbrock")
    paths = {name: surfaces.run_trajectory(s, name, steps=20) for name in ("sgd", "adam")}
    out = surfaces.plot_trajectories(s, paths, tmp_path / "plots" / "rosenbrock.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in out.parent.iterdir()] == ["rosenbrock.png"]


def test_animate_trajectories_writes_a_growing_gif(tmp_path: Path) -> None:
    import imageio.v3 as iio

    paths = {name: surfaces.run_trajectory("quadratic", name, 30) for name in ("sgd", "adam")}
    out = surfaces.animate_trajectories(
        surfaces.get_surface("quadratic"), paths, tmp_path / "a.gif", frames=7
    )
    frames = iio.imread(out, index=None)
    assert out == tmp_path / "a.gif" and sorted(p.name for p in tmp_path.iterdir()) == ["a.gif"]
    assert frames.shape[0] == 7 and frames.shape[1:] == (400, 480, 3)  # 6 x 5 inches at 80 dpi
    assert not np.array_equal(frames[0], frames[-1])  # the paths grow
