"""The scratch autograd engine against torch.autograd: values, gradients and second derivatives.

Every check builds the same computation in both engines on the same float64 inputs, reduces the output
to a scalar with random weights (so that the incoming gradient is not all ones), and compares:

- the value,
- the gradient of each input,
- a Hessian-vector product per input: the gradient of sum_i <grad_i, v_i> for random v_i, which
  needs the graph of the backward pass (``create_graph=True`` in both engines).
"""

from __future__ import annotations

import gc
import random
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scratch
from scratch import graph, ops
from scratch.core import Function, Variable, no_grad

torch.set_num_threads(1)

TOL = 1e-6


# ==================================================================================================
# Helpers: run a function in both engines and compare
# ==================================================================================================


def scratch_derivatives(
    fn: Callable[..., Variable], arrays: list[np.ndarray], w: np.ndarray, vs: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(value, gradients, Hessian-vector products) of ``sum(fn(*xs) * w)`` with the scratch engine."""
    xs = [Variable(a.copy()) for a in arrays]
    y = fn(*xs)
    ops.sum(y * w).backward(create_graph=True)
    grads = [x.grad for x in xs]
    for x in xs:
        x.cleargrad()
    inner = sum((ops.sum(g * v) for g, v in zip(grads, vs, strict=True)), start=Variable(0.0))
    inner.backward()
    hvps = [np.zeros_like(a) if x.grad is None else x.grad.data for a, x in zip(arrays, xs, strict=True)]
    return y.data, [g.data for g in grads], hvps


def torch_derivatives(
    fn: Callable[..., torch.Tensor], arrays: list[np.ndarray], w: np.ndarray, vs: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The same three things with torch.autograd."""
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    y = fn(*ts)
    loss = (y * torch.tensor(w)).sum()
    grads = torch.autograd.grad(loss, ts, create_graph=True, allow_unused=True, materialize_grads=True)
    inner = sum((g * torch.tensor(v)).sum() for g, v in zip(grads, vs, strict=True))
    if inner.requires_grad:
        hvps = torch.autograd.grad(inner, ts, allow_unused=True, materialize_grads=True)
    else:  # the gradient does not depend on the inputs: zero second derivative
        hvps = [torch.zeros_like(t) for t in ts]
    return y.detach().numpy(), [g.detach().numpy() for g in grads], [h.detach().numpy() for h in hvps]


def assert_same_derivatives(
    scratch_fn: Callable[..., Variable],
    torch_fn: Callable[..., torch.Tensor],
    arrays: list[np.ndarray],
    seed: int = 0,
    second_order: bool = True,
) -> None:
    """Compares value, gradients and (unless ``second_order`` is False) Hessian-vector products."""
    rng = np.random.default_rng(seed + 1000)
    with torch.no_grad():
        out_shape = torch_fn(*[torch.tensor(a) for a in arrays]).shape
    w = rng.normal(size=tuple(out_shape))
    vs = [rng.normal(size=a.shape) for a in arrays]
    value, grads, hvps = scratch_derivatives(scratch_fn, arrays, w, vs)
    t_value, t_grads, t_hvps = torch_derivatives(torch_fn, arrays, w, vs)
    np.testing.assert_allclose(value, t_value, rtol=TOL, atol=TOL, err_msg="value")
    assert value.shape == t_value.shape
    for i, (g, tg) in enumerate(zip(grads, t_grads, strict=True)):
        assert g.shape == arrays[i].shape, f"gradient {i} has shape {g.shape}, input {arrays[i].shape}"
        np.testing.assert_allclose(g, tg, rtol=TOL, atol=TOL, err_msg=f"gradient of input {i}")
    if second_order:
        for i, (h, th) in enumerate(zip(hvps, t_hvps, strict=True)):
            np.testing.assert_allclose(h, th, rtol=TOL, atol=TOL, err_msg=f"second derivative, input {i}")


def make_inputs(shapes: list[tuple[int, ...]], domain: str, seed: int) -> list[np.ndarray]:
    """Random float64 inputs: "any" normal, "pos" in [0.5, 2], "apart" normal with |x| > 0.1 (kinks)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for shape in shapes:
        if domain == "pos":
            arrays.append(rng.uniform(0.5, 2.0, size=shape))
        elif domain == "apart":
            a = rng.normal(size=shape)
            arrays.append(np.where(np.abs(a) < 0.1, a + np.sign(a + 1e-12) * 0.2, a))
        else:
            arrays.append(rng.normal(size=shape))
    return arrays


# ==================================================================================================
# Every operation
# ==================================================================================================

C34 = np.arange(12.0).reshape(3, 4) / 7  # a constant numpy array mixed into expressions

# name: (scratch fn, torch fn, input shapes, domain)
OP_CASES: dict[str, tuple[Callable[..., Any], Callable[..., Any], list[tuple[int, ...]], str]] = {
    "add": (lambda a, b: a + b, lambda a, b: a + b, [(2, 3), (2, 3)], "any"),
    "add (3,1)+(1,4)": (lambda a, b: a + b, lambda a, b: a + b, [(3, 1), (1, 4)], "any"),
    "add (2,3)+(3,)": (lambda a, b: a + b, lambda a, b: a + b, [(2, 3), (3,)], "any"),
    "add scalar both sides": (lambda a: 2.0 + a + 3, lambda a: 2.0 + a + 3, [(2, 3)], "any"),
    "add numpy array on the left": (lambda a: C34 + a, lambda a: torch.tensor(C34) + a, [(3, 1)], "any"),
    "sub (3,1)-(1,4)": (lambda a, b: a - b, lambda a, b: a - b, [(3, 1), (1, 4)], "any"),
    "rsub": (lambda a: 1.5 - a, lambda a: 1.5 - a, [(4,)], "any"),
    "mul (2,3)*(3,)": (lambda a, b: a * b, lambda a, b: a * b, [(2, 3), (3,)], "any"),
    "mul self": (lambda a: a * a * a, lambda a: a * a * a, [(5,)], "any"),
    "mul numpy scalar": (lambda a: np.float64(3.0) * a, lambda a: 3.0 * a, [(3,)], "any"),
    "mul numpy array": (lambda a: a * C34, lambda a: a * torch.tensor(C34), [(4,)], "any"),
    "div (2,3)/(3,)": (lambda a, b: a / b, lambda a, b: a / b, [(2, 3), (3,)], "pos"),
    "rdiv": (lambda a: 2.0 / a, lambda a: 2.0 / a, [(4,)], "pos"),
    "neg": (lambda a: -a, lambda a: -a, [(2, 3)], "any"),
    "pow 3": (lambda a: a**3, lambda a: a**3, [(2, 3)], "any"),
    "pow 2.5": (lambda a: a**2.5, lambda a: a**2.5, [(2, 3)], "pos"),
    "pow -1.5": (lambda a: a**-1.5, lambda a: a**-1.5, [(4,)], "pos"),
    "pow variable exponent": (lambda a, b: a**b, lambda a, b: a**b, [(2, 3), (3,)], "pos"),
    "rpow": (lambda a: 2.0**a, lambda a: torch.pow(2.0, a), [(4,)], "any"),
    "exp": (ops.exp, torch.exp, [(2, 3)], "any"),
    "log": (ops.log, torch.log, [(2, 3)], "pos"),
    "tanh": (ops.tanh, torch.tanh, [(2, 3)], "any"),
    "sigmoid": (ops.sigmoid, torch.sigmoid, [(2, 3)], "any"),
    "relu": (ops.relu, torch.relu, [(3, 4)], "apart"),
    "matmul": (lambda a, b: a @ b, lambda a, b: a @ b, [(3, 4), (4, 2)], "any"),
    "matmul array on the left": (lambda a: C34 @ a, lambda a: torch.tensor(C34) @ a, [(4, 2)], "any"),
    "sum all": (lambda a: a.sum(), lambda a: a.sum(), [(2, 3, 4)], "any"),
    "sum axis 1": (lambda a: ops.sum(a, 1), lambda a: a.sum(1), [(2, 3, 4)], "any"),
    "sum axes (0,2) keepdims": (
        lambda a: ops.sum(a, (0, 2), keepdims=True),
        lambda a: a.sum((0, 2), keepdim=True),
        [(2, 3, 4)],
        "any",
    ),
    "sum axis -1 keepdims": (
        lambda a: a.sum(axis=-1, keepdims=True),
        lambda a: a.sum(-1, keepdim=True),
        [(2, 3, 4)],
        "any",
    ),
    "mean all": (lambda a: a.mean(), lambda a: a.mean(), [(2, 3, 4)], "any"),
    "mean axis 0 keepdims": (
        lambda a: ops.mean(a, 0, keepdims=True),
        lambda a: a.mean(0, keepdim=True),
        [(2, 3, 4)],
        "any",
    ),
    "mean axes (1,2)": (lambda a: ops.mean(a, (1, 2)), lambda a: a.mean((1, 2)), [(2, 3, 4)], "any"),
    "reshape": (lambda a: a.reshape(6, 4) ** 2, lambda a: a.reshape(6, 4) ** 2, [(2, 3, 4)], "any"),
    "reshape -1": (lambda a: ops.reshape(a, (-1,)), lambda a: a.reshape(-1), [(2, 3, 4)], "any"),
    "transpose": (lambda a: a.T, lambda a: a.permute(2, 1, 0), [(2, 3, 4)], "any"),
    "transpose axes": (lambda a: a.transpose(1, 2, 0), lambda a: a.permute(1, 2, 0), [(2, 3, 4)], "any"),
    "broadcast_to": (
        lambda a: ops.broadcast_to(a, (2, 3, 4)),
        lambda a: a.broadcast_to((2, 3, 4)),
        [(3, 1)],
        "any",
    ),
    "sum_to": (lambda a: ops.sum_to(a, (3, 1)), lambda a: a.sum(0).sum(-1, keepdim=True), [(2, 3, 4)], "any"),
    "getitem int": (lambda a: a[1], lambda a: a[1], [(3, 4)], "any"),
    "getitem slices": (lambda a: a[:, 1:3], lambda a: a[:, 1:3], [(3, 4)], "any"),
    "getitem step": (lambda a: a[..., ::2], lambda a: a[..., ::2], [(2, 3, 4)], "any"),
    "getitem repeated rows": (lambda a: a[[0, 2, 2, 0]], lambda a: a[[0, 2, 2, 0]], [(3, 4)], "any"),
    "getitem pairs": (lambda a: a[[0, 1, 2, 2], [1, 0, 3, 3]], lambda a: a[[0, 1, 2, 2], [1, 0, 3, 3]], [(3, 4)], "any"),
    "max axis 1": (lambda a: ops.max(a, 1), lambda a: torch.amax(a, 1), [(3, 4)], "any"),
    "max axis 0 keepdims": (
        lambda a: a.max(axis=0, keepdims=True),
        lambda a: torch.amax(a, 0, keepdim=True),
        [(3, 4)],
        "any",
    ),
    "max all": (lambda a: a.max(), lambda a: torch.amax(a), [(3, 4)], "any"),
    "max axes (0,2)": (lambda a: ops.max(a, (0, 2)), lambda a: torch.amax(a, (0, 2)), [(2, 3, 4)], "any"),
    "softmax": (ops.softmax, lambda a: torch.softmax(a, -1), [(3, 5)], "any"),
    "softmax axis 0": (lambda a: ops.softmax(a, axis=0), lambda a: torch.softmax(a, 0), [(3, 5)], "any"),
    "log_softmax": (lambda a: ops.log_softmax(a, 1), lambda a: torch.log_softmax(a, 1), [(3, 5)], "any"),
    "log_softmax large logits": (
        lambda a: ops.log_softmax(a * 400.0, 1),
        lambda a: torch.log_softmax(a * 400.0, 1),
        [(3, 5)],
        "any",
    ),
    "cross_entropy": (
        lambda a: ops.cross_entropy(a, np.array([0, 3, 4, 3])),
        lambda a: F.cross_entropy(a, torch.tensor([0, 3, 4, 3])),
        [(4, 5)],
        "any",
    ),
    "mse": (ops.mse, F.mse_loss, [(3, 4), (3, 4)], "any"),
    "mse broadcast target": (lambda a: ops.mse(a, C34), lambda a: F.mse_loss(a.expand(3, 4), torch.tensor(C34)), [(3, 1)], "any"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_matches_torch_to_second_order(name: str) -> None:
    scratch_fn, torch_fn, shapes, domain = OP_CASES[name]
    for seed in range(2):
        assert_same_derivatives(scratch_fn, torch_fn, make_inputs(shapes, domain, seed), seed=seed)


# ==================================================================================================
# Random compositions, micrograd style: one expression, written once, evaluated by both engines
# ==================================================================================================


class ScratchLib:
    tanh, sigmoid, exp, log, relu = ops.tanh, ops.sigmoid, ops.exp, ops.log, ops.relu
    softmax = staticmethod(lambda x, axis: ops.softmax(x, axis))
    sum = staticmethod(lambda x, axis, keepdims: ops.sum(x, axis, keepdims))
    max = staticmethod(lambda x, axis, keepdims: ops.max(x, axis, keepdims))


class TorchLib:
    tanh, sigmoid, exp, log, relu = torch.tanh, torch.sigmoid, torch.exp, torch.log, torch.relu
    softmax = staticmethod(lambda x, axis: torch.softmax(x, axis))
    sum = staticmethod(lambda x, axis, keepdims: torch.sum(x, axis, keepdim=keepdims))
    max = staticmethod(lambda x, axis, keepdims: torch.amax(x, axis, keepdim=keepdims))


# Operations on (3, 4)-broadcastable values that stay finite and smooth enough on any input.
UNARY: dict[str, Callable[[Any, Any], Any]] = {
    "tanh": lambda x, L: L.tanh(x),
    "sigmoid": lambda x, L: L.sigmoid(x),
    "neg": lambda x, L: -x,
    "square": lambda x, L: x * x,
    "cube/3": lambda x, L: x**3 / 3,
    "log1p(x^2)": lambda x, L: L.log(1 + x**2),
    "exp(tanh)": lambda x, L: L.exp(L.tanh(x)),
    "relu": lambda x, L: L.relu(x),
    "softmax": lambda x, L: L.softmax(x, -1),
    "sum keepdims": lambda x, L: L.sum(x, -1, True),
    "max keepdims": lambda x, L: L.max(x, 0, True) if x.ndim == 2 else x,
    "scale": lambda x, L: 0.5 * x - 0.25,
}
BINARY: dict[str, Callable[[Any, Any, Any], Any]] = {
    "add": lambda a, b, L: a + b,
    "sub": lambda a, b, L: a - b,
    "mul": lambda a, b, L: a * b,
    "div": lambda a, b, L: a / (1 + b * b),
    "rdiv": lambda a, b, L: 2 / (1.5 + L.tanh(a) * b / (1 + b * b)),
}


def random_plan(seed: int) -> list[tuple[str, str, int, int]]:
    """A random program: steps ("u" or "b", op name, operand index, operand index) over a value pool."""
    rng = random.Random(seed)
    plan = []
    for step in range(10):
        size = 3 + step  # the pool starts with the 3 inputs and grows by one value per step
        i = rng.randrange(max(0, size - 4), size)  # mostly recent values, so the graph gets deep
        j = rng.randrange(size)
        if rng.random() < 0.5:
            plan.append(("u", rng.choice(list(UNARY)), i, j))
        else:
            plan.append(("b", rng.choice(list(BINARY)), i, j))
    return plan


def run_plan(plan: list[tuple[str, str, int, int]], lib: Any, *inputs: Any) -> Any:
    pool = list(inputs)
    for kind, name, i, j in plan:
        pool.append(UNARY[name](pool[i], lib) if kind == "u" else BINARY[name](pool[i], pool[j], lib))
    # Every value of the pool reaches the output, so every input gets a gradient.
    out = pool[-1]
    for k, value in enumerate(pool[:-1]):
        out = out + lib.sum(value, None, False) * (0.1 * (k + 1))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_random_composition_matches_torch(seed: int) -> None:
    plan = random_plan(seed)
    arrays = make_inputs([(3, 4), (3, 1), (4,)], "apart", seed)
    assert_same_derivatives(
        lambda *xs: run_plan(plan, ScratchLib, *xs), lambda *ts: run_plan(plan, TorchLib, *ts), arrays, seed
    )


# ==================================================================================================
# Convolution and pooling
# ==================================================================================================


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "stride", "padding"),
    [((2, 3, 7, 7), (4, 3, 3, 3), 1, 0), ((2, 3, 7, 7), (4, 3, 3, 3), 1, 1), ((2, 2, 8, 8), (3, 2, 3, 3), 2, 1),
     ((1, 2, 6, 7), (2, 2, 2, 3), 2, 0)],
)  # fmt: skip
def test_conv2d_matches_torch(
    x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: int, padding: int
) -> None:
    arrays = make_inputs([x_shape, w_shape, (w_shape[0],)], "any", seed=3)
    assert_same_derivatives(
        lambda x, w, b: ops.conv2d(x, w, b, stride=stride, padding=padding),
        lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=padding),
        arrays,
    )


@pytest.mark.parametrize(
    ("x_shape", "kernel", "stride", "padding"),
    [((2, 3, 6, 6), 2, None, 0), ((2, 2, 7, 7), 3, 2, 1), ((1, 2, 5, 5), 2, 1, 0), ((1, 1, 6, 8), (2, 3), None, 0)],
)  # fmt: skip
def test_max_pool2d_matches_torch(
    x_shape: tuple[int, ...], kernel: Any, stride: int | None, padding: int
) -> None:
    arrays = make_inputs([x_shape], "any", seed=4)
    assert_same_derivatives(
        lambda x: ops.max_pool2d(x, kernel, stride, padding),
        lambda x: F.max_pool2d(x, kernel, stride, padding),
        arrays,
    )


W3 = np.random.default_rng(9).normal(size=(3, 2, 3, 3))  # fixed kernels for the third-order conv check

# name: (scratch fn, torch fn, input shape); each is cubed before the sum, so no gradient is constant.
THIRD_ORDER_CASES: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any], tuple[int, ...]]] = {
    "conv2d": (lambda x: ops.conv2d(x, W3, padding=1), lambda x: F.conv2d(x, torch.tensor(W3), padding=1), (1, 2, 5, 5)),
    "max_pool2d": (lambda x: ops.max_pool2d(x, 2), lambda x: F.max_pool2d(x, 2), (1, 2, 4, 4)),
    "getitem": (lambda x: x[[0, 2, 2], [1, 0, 0]], lambda x: x[[0, 2, 2], [1, 0, 0]], (3, 4)),
    "log_softmax": (lambda x: ops.log_softmax(x, 1), lambda x: torch.log_softmax(x, 1), (3, 4)),
    "softmax": (lambda x: ops.softmax(x, 0), lambda x: torch.softmax(x, 0), (3, 4)),
    "tanh matmul": (lambda x: ops.tanh(x @ C34), lambda x: torch.tanh(x @ torch.tensor(C34)), (2, 3)),
    "sum_to broadcast_to": (
        lambda x: ops.broadcast_to(ops.sum_to(x, (1, 4)), (3, 4)),
        lambda x: x.sum(0, keepdim=True).expand(3, 4),
        (3, 4),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(THIRD_ORDER_CASES))
def test_third_derivative_matches_torch(name: str) -> None:
    # Three nested backward passes. The second loss is quadratic in the gradient (as in a gradient
    # penalty), so the gradients flowing through the backward functions depend on x, and the third
    # pass differentiates the backward of the backward (e.g. Col2im.backward, GetItemGrad.backward).
    scratch_fn, torch_fn, shape = THIRD_ORDER_CASES[name]
    rng = np.random.default_rng(8)
    x0, v, u = rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape)
    x = Variable(x0)
    ops.sum(scratch_fn(x) ** 3).backward(create_graph=True)
    g = x.grad
    x.cleargrad()
    ops.sum(g * g * v).backward(create_graph=True)
    h = x.grad
    x.cleargrad()
    ops.sum(h * u).backward()
    tx = torch.tensor(x0, requires_grad=True)
    (tg,) = torch.autograd.grad((torch_fn(tx) ** 3).sum(), tx, create_graph=True)
    (th,) = torch.autograd.grad((tg * tg * torch.tensor(v)).sum(), tx, create_graph=True)
    (tt,) = torch.autograd.grad((th * torch.tensor(u)).sum(), tx)
    np.testing.assert_allclose(x.grad.data, tt.numpy(), rtol=TOL, atol=TOL)


def test_im2col_and_col2im_are_adjoint() -> None:
    # <im2col(x), c> == <x, col2im(c)> for all x, c: the defining property of the backward pass.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 7, 6))
    col = ops.im2col_array(x, (3, 2), stride=2, pad=1)
    c = rng.normal(size=col.shape)
    back = ops.col2im_array(c, x.shape, (3, 2), stride=2, pad=1)
    assert back.shape == x.shape
    np.testing.assert_allclose(np.sum(col * c), np.sum(x * back), rtol=1e-12)


# ==================================================================================================
# Finite differences, independently of torch
# ==================================================================================================


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences (f(x + eps e_i) - f(x - eps e_i)) / 2 eps, one coordinate at a time."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        plus = f(x)
        x[i] = old - eps
        minus = f(x)
        x[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


FD_CASES: dict[str, tuple[Callable[[Any], Variable], tuple[int, ...]]] = {
    "tanh(x @ W)": (lambda x: ops.tanh(x @ C34), (2, 3)),
    "softmax weighted": (lambda x: ops.softmax(x, 1) * C34, (3, 4)),
    "div and log": (lambda x: ops.log(1 + x * x) / (2 + ops.sigmoid(x)), (3, 4)),
    "fancy getitem": (lambda x: x[[0, 0, 2], [1, 1, 3]] ** 2, (3, 4)),
    "conv2d": (lambda x: ops.conv2d(x, C34.reshape(1, 1, 3, 4), stride=1, padding=1), (1, 1, 5, 6)),
    "max_pool2d": (lambda x: ops.max_pool2d(x, 2), (1, 2, 4, 4)),
}


@pytest.mark.parametrize("name", list(FD_CASES))
def test_gradient_matches_finite_differences(name: str) -> None:
    fn, shape = FD_CASES[name]
    x0 = np.random.default_rng(6).normal(size=shape)
    with no_grad():
        weights = np.random.default_rng(7).normal(size=fn(Variable(x0)).shape)

    def f(a: np.ndarray) -> float:
        with no_grad():
            return float(np.sum(fn(Variable(a)).data * weights))

    x = Variable(x0.copy())
    ops.sum(fn(x) * weights).backward()
    np.testing.assert_allclose(x.grad.data, numerical_gradient(f, x0.copy()), rtol=1e-6, atol=1e-6)


# ==================================================================================================
# Engine behaviour
# ==================================================================================================


def test_higher_derivatives_of_a_polynomial() -> None:
    # f = x^4 - 2 x^2: f' = 4x^3 - 4x, f'' = 12x^2 - 4, f''' = 24x (DeZero step 33-34).
    x = Variable(np.array(1.5))
    y = x**4 - 2 * x**2
    expected = [4 * 1.5**3 - 4 * 1.5, 12 * 1.5**2 - 4, 24 * 1.5]
    for want in expected:
        y.backward(create_graph=True)
        y = x.grad
        x.cleargrad()
        assert y.item() == pytest.approx(want, rel=1e-12)


def test_backward_waits_for_every_branch_before_a_shared_node() -> None:
    # x -> a = square(x) -> (b = 2a, c = exp(a)) -> y = b + c: the square's backward must run once,
    # after both branches have added their gradient to a, which the generation order guarantees.
    calls = []

    class Square(Function):
        def forward(self, x: np.ndarray) -> np.ndarray:
            return x**2

        def backward(self, gy: Variable) -> Variable:
            calls.append(gy.data.copy())
            return 2 * self.inputs[0] * gy

    x = Variable(np.array(0.7))
    a = Square()(x)
    y = 2 * a + ops.exp(a) * ops.tanh(a + 1)
    y.backward()
    tx = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    ta = tx**2
    (2 * ta + torch.exp(ta) * torch.tanh(ta + 1)).backward()
    assert len(calls) == 1
    assert x.grad.item() == pytest.approx(tx.grad.item(), rel=1e-12)


def test_gradients_accumulate_until_cleared() -> None:
    x = Variable(np.array([1.0, 2.0]))
    (x * x).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_array_equal(x.grad.data, 2 * x.data + 3)
    x.cleargrad()
    (x * 3).sum().backward()
    np.testing.assert_array_equal(x.grad.data, [3.0, 3.0])


def test_intermediate_gradients_are_dropped_unless_retained() -> None:
    x = Variable(np.array(2.0))
    h = x * x
    (h * 3).backward()
    assert h.grad is None and x.grad.item() == 12.0
    x.cleargrad()
    h = x * x
    (h * 3).backward(retain_grad=True)
    assert h.grad.item() == 3.0


def test_no_grad_records_nothing() -> None:
    x = Variable(np.ones(3))
    with no_grad():
        y = ops.tanh(x) * 2
    assert y.creator is None and y.generation == 0
    assert scratch.Config.enable_backprop
    z = ops.tanh(x) * 2
    assert z.creator is not None and z.generation == 2


def test_create_graph_false_builds_no_graph_of_the_gradient() -> None:
    x = Variable(np.array(3.0))
    (x**3).backward()
    assert x.grad.creator is None
    x.cleargrad()
    (x**3).backward(create_graph=True)
    assert x.grad.creator is not None


def test_graph_is_freed_when_the_output_goes() -> None:
    # Functions hold their outputs weakly, so there is no cycle: refcounting frees the graph at once.
    gc.disable()
    try:
        x = Variable(np.ones(3))
        y = ops.exp(ops.tanh(x))
        creator = weakref.ref(y.creator)
        del y
        assert creator() is None
    finally:
        gc.enable()


def test_operators_with_numbers_and_arrays_return_variables() -> None:
    x = Variable(np.array([1.0, 2.0]))
    results = [
        np.float64(2) * x,
        np.array([1.0, 1.0]) + x,
        3 - x,
        1 / x,
        2**x,
        -x,
        x**2,
        x / 2,
        np.ones((1, 2)) @ x.reshape(2, 1),
    ]
    assert all(isinstance(r, Variable) for r in results)
    np.testing.assert_allclose((3 - x).data, [2.0, 1.0])
    np.testing.assert_allclose((2**x).data, [2.0, 4.0])
    assert Variable(3).dtype == np.float64  # integers become float64
    assert (Variable(np.ones(2, np.float32)) * 2.5).dtype == np.float32  # a number takes the Variable's dtype
    a, b = x  # iteration through __getitem__
    assert isinstance(a, Variable) and b.item() == 2.0


def test_max_shares_the_gradient_between_ties_like_amax() -> None:
    x = Variable(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]]))
    ops.sum(ops.max(x, axis=1) * np.array([1.0, 2.0])).backward()
    t = torch.tensor(x.data, requires_grad=True)
    (torch.amax(t, 1) * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum().backward()
    np.testing.assert_array_equal(x.grad.data, t.grad.numpy())
    np.testing.assert_array_equal(x.grad.data, [[0.0, 0.5, 0.5], [2.0, 0.0, 0.0]])


def test_matmul_rejects_non_matrices() -> None:
    with pytest.raises(ValueError, match=r"matmul takes two matrices"):
        ops.matmul(Variable(np.ones(3)), Variable(np.ones((3, 2))))


def test_unused_labels_get_no_gradient() -> None:
    labels = Variable(np.array([1, 0]))
    logits = Variable(np.array([[0.2, 0.3], [1.0, -1.0]]))
    ops.cross_entropy(logits, labels).backward()
    assert labels.grad is None and logits.grad.shape == (2, 2)


# ==================================================================================================
# Graph pictures
# ==================================================================================================


def small_graph() -> Variable:
    x = Variable(np.ones((2, 3)), name="x")
    w = Variable(np.ones((3, 4)), name="W")
    loss = ops.sum(ops.tanh(x @ w + 1.0))
    loss.name = "loss"
    return loss


def test_to_dot_lists_variables_functions_and_edges() -> None:
    dot = graph.to_dot(small_graph())
    lines = dot.strip().splitlines()
    assert lines[0] == "digraph g {" and lines[-1] == "}"
    boxes = [line for line in lines if "shape=box" in line]
    assert sorted(b.split('label="')[1].split('"')[0] for b in boxes) == ["Add", "MatMul", "Sum", "Tanh"]
    # x, W, x@W, the constant 1.0, the sum, tanh and loss: 7 variables; 4 functions: 4 + 2 + 2 + 1 + 1 edges.
    assert sum("color=orange" in line for line in lines) == 7
    assert sum("->" in line for line in lines) == 10
    assert 'label="x\\n(2, 3) float64"' in dot and 'label="loss\\n() float64"' in dot


def test_draw_graph_without_graphviz_uses_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = graph.draw_graph(small_graph(), tmp_path / "sub" / "graph.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["graph.png"]  # no temporary file left


def test_draw_graph_calls_dot_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run(cmd: list[str], input: str, text: bool, check: bool) -> None:
        seen["cmd"], seen["input"] = cmd, input
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"\x89PNG fake")

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/dot")
    monkeypatch.setattr(graph.subprocess, "run", fake_run)
    loss = small_graph()
    out = graph.draw_graph(loss, tmp_path / "graph.png")
    assert seen["cmd"][:2] == ["dot", "-Tpng"] and seen["input"] == graph.to_dot(loss)
    assert out.read_bytes() == b"\x89PNG fake"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.png"]


def test_layers_put_every_arrow_forward() -> None:
    loss = small_graph()
    column = {id(node): col for col, nodes in graph.layers(loss).items() for node in nodes}
    _, functions = graph.collect(loss)
    for f in functions:
        assert all(column[id(x)] < column[id(f)] for x in f.inputs)
        assert all(column[id(f)] < column[id(r())] for r in f.outputs)


def test_leaves_stand_just_before_their_first_use() -> None:
    x, w, b = Variable(np.ones((2, 3)), name="x"), Variable(np.ones((3, 4)), name="W"), Variable(np.ones(4))
    y = ops.tanh(x @ w) + b  # b is first used two functions after W
    column = {id(node): col for col, nodes in graph.layers(y).items() for node in nodes}
    assert column[id(x)] == column[id(w)] == 0
    assert column[id(b)] == column[id(y.creator)] - 1
