"""Optimisers with torch.optim's exact update rules and default hyper-parameters.

Each class writes out, for one parameter p with gradient g, the arithmetic of torch's single-tensor
implementation (``torch/optim/*.py``), in the same order, so that a trajectory agrees with torch to
rounding error. Weight decay, ``maximize`` and the other options are left out, except AdamW's
decoupled decay.

Usage, as with torch::

    opt = Adam(model.parameters(), lr=1e-3)
    model.zero_grad(); loss.backward(); opt.step()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from scratch.core import Variable


class Optimizer:
    """Holds the parameters and a per-parameter ``state`` dict; subclasses write ``update``."""

    def __init__(self, params: Iterable[Variable], lr: float) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.lr = lr
        self.state: dict[int, dict[str, Any]] = {id(p): {} for p in self.params}

    def zero_grad(self) -> None:
        """Clears the gradients of the parameters."""
        for p in self.params:
            p.cleargrad()

    def step(self) -> None:
        """Updates every parameter that has a gradient (parameters without one are skipped, as in torch)."""
        for p in self.params:
            if p.grad is not None:
                # A new array rather than an in-place update: arrays the caller passed in stay untouched.
                p.data = self.update(p.data, p.grad.data, self.state[id(p)])

    def update(self, p: np.ndarray, g: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        """The new value of one parameter ``p`` given its gradient ``g``; may update ``state``."""
        raise NotImplementedError


class SGD(Optimizer):
    """p <- p - lr g."""

    def __init__(self, params: Iterable[Variable], lr: float = 1e-3) -> None:
        super().__init__(params, lr)

    def update(self, p: np.ndarray, g: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        return p - self.lr * g


class Momentum(Optimizer):
    """torch's SGD with momentum: b <- momentum b + g (b = g at the first step); p <- p - lr b.

    The textbook form v <- momentum v - lr g; p <- p + v is the same trajectory with v = -lr b.
    """

    def __init__(self, params: Iterable[Variable], lr: float = 1e-3, momentum: float = 0.9) -> None:
        super().__init__(params, lr)
        self.momentum = momentum

    def velocity(self, g: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        """The momentum buffer after this step's gradient."""
        buf = state.get("momentum_buffer")
        state["momentum_buffer"] = g.copy() if buf is None else self.momentum * buf + g
        return state["momentum_buffer"]

    def update(self, p: np.ndarray, g: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        return p - self.lr * self.velocity(g, state)


class Nesterov(Momentum):
    """torch's SGD with ``nesterov=True``: b as in Momentum; p <- p - lr (g + momentum b).

    The step looks ahead along the momentum: it uses the gradient plus the velocity it is about to add.
    """

    def update(self, p: np.ndarray, g: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        buf = self.velocity(g, state)
        return p - self.lr * (g + self.momentum * buf)


class AdaGrad(Optimizer):
    """torch's Adagrad: s <- s + g^2; p <- p - lr g / (sqrt(s) + eps).

    Each coordinate's step shrinks with the total squared gradient it has seen so far.
    """

    def __init__(self, params: Iterable[Variable], lr: float = 1e-2, eps: float = 1e-10) -> None:
        super().__init__(params, lr)
        self.eps = eps

    def update(self, p: np.ndarray, g: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        state["sum"] = state.get("sum", 0.0) + g * g
        return p - self.lr * (g / (np.sqrt(state["sum"]) + self.eps))


class RMSProp(Optimizer):
    """torch's RMSprop: v <- alpha v + (1 - alpha) g^2; p <- p - lr g / (sqrt(v) + eps).

    Like AdaGrad, but with a moving average instead of a sum, so old gradients are forgotten.
    """

    def __init__(
        self, params: Iterable[Variable], lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8
    ) -> None:
        super().__init__(params, lr)
        self.alpha, self.eps = alpha, eps

    def update(self, p: np.ndarray, g: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        state["square_avg"] = self.alpha * state.get("square_avg", 0.0) + (1 - self.alpha) * (g * g)
        return p - self.lr * (g / (np.sqrt(state["square_avg"]) + self.eps))


class Adam(Optimizer):
    """torch's Adam: moving averages m of g and v of g^2, corrected for their start at zero.

    t <- t + 1; m <- m + (1 - b1)(g - m); v <- b2 v + (1 - b2) g^2;
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    (eps is added after the bias correction of v, where torch adds it.)
    """

    def __init__(
        self,
        params: Iterable[Variable],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, lr)
        self.betas, self.eps = betas, eps

    def update(self, p: np.ndarray, g: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        beta1, beta2 = self.betas
        t = state["step"] = state.get("step", 0) + 1
        m = state.get("exp_avg", np.zeros_like(p))
        v = state.get("exp_avg_sq", np.zeros_like(p))
        m = state["exp_avg"] = m + (1 - beta1) * (g - m)  # torch's lerp form of b1 m + (1 - b1) g
        v = state["exp_avg_sq"] = beta2 * v + (1 - beta2) * (g * g)
        step_size = self.lr / (1 - beta1**t)
        denom = np.sqrt(v) / (1 - beta2**t) ** 0.5 + self.eps
        return p - step_size * (m / denom)


class AdamW(Adam):
    """torch's AdamW: Adam plus decoupled weight decay, p <- p (1 - lr wd) before the Adam step."""

    def __init__(
        self,
        params: Iterable[Variable],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr, betas, eps)
        self.weight_decay = weight_decay

    def update(self, p: np.ndarray, g: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        return super().update(p * (1 - self.lr * self.weight_decay), g, state)
