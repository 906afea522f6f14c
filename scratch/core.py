"""The heart of the engine: ``Variable``, ``Function`` and reverse-mode differentiation.

A ``Variable`` wraps a numpy array. Calling a ``Function`` on Variables computes the result with numpy
and, while backprop is enabled, links the result to the function that made it ("define-by-run"): the
graph is the record of what actually ran. ``Variable.backward`` walks that record from the output back
to the inputs, newest functions first, and each function turns the gradient of its outputs into the
gradient of its inputs.

The backward methods of the functions are written with Variables, not raw arrays. Ordinarily they run
with backprop disabled, so they build no graph; with ``backward(create_graph=True)`` they run with it
enabled, the gradients themselves become nodes of a graph, and calling ``backward`` on a gradient gives
second derivatives.

The operators (``+``, ``*``, ``@``, ``x[i]``, ...) and the methods ``reshape``, ``transpose``, ``T``,
``sum``, ``mean`` and ``max`` are attached to ``Variable`` by ``scratch.ops``, which defines the
operations (as DeZero's ``setup_variable`` does); importing ``scratch`` loads both.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np


class Config:
    """Global switches. ``enable_backprop`` False: functions remember nothing (inference, no_grad)."""

    enable_backprop: bool = True


@contextlib.contextmanager
def using_config(name: str, value: Any) -> Iterator[None]:
    """Sets ``Config.<name>`` to ``value`` inside the ``with`` block and restores it afterwards."""
    old = getattr(Config, name)
    setattr(Config, name, value)
    try:
        yield
    finally:
        setattr(Config, name, old)


def no_grad() -> contextlib.AbstractContextManager[None]:
    """``with no_grad():`` runs functions without recording the graph, like ``torch.no_grad``."""
    return using_config("enable_backprop", False)


def as_array(x: Any) -> np.ndarray:
    """Any number or array-like -> an ndarray; integers and bools become float64, floats keep their dtype."""
    array = np.asarray(x)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    return array


def as_variable(x: Any) -> Variable:
    """Wraps a number or array in a (constant) Variable; a Variable passes through."""
    return x if isinstance(x, Variable) else Variable(x)


class Variable:
    """A node holding data: an ndarray, its gradient, and the function that created it.

    Attributes:
        data: The value, an ndarray (float64 unless given a float32 array).
        grad: The gradient of the last ``backward`` output with respect to this variable, a Variable of
            the same shape, or None before any backward.
        creator: The Function whose output this is; None for leaves (inputs and parameters).
        generation: 0 for leaves, else 1 + the generation of the creator's newest input. Backward
            processes functions newest generation first, so a function runs only after every
            function that uses its outputs has added its share of the gradient.
        name: An optional label for graph pictures.
    """

    # Makes numpy defer to our reflected operators: ndarray + Variable -> Variable.__radd__.
    __array_priority__ = 200

    def __init__(self, data: Any, name: str | None = None) -> None:
        if isinstance(data, Variable):
            raise TypeError("Variable(data) takes an array, not a Variable")
        self.data: np.ndarray = as_array(data)
        self.name = name
        self.grad: Variable | None = None
        self.creator: Function | None = None
        self.generation = 0

    # --- array-like conveniences -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        body = str(self.data).replace("\n", "\n" + " " * 9)
        return f"variable({body})"

    def item(self) -> float:
        """The value of a one-element variable as a Python float."""
        return float(self.data.item())

    # --- graph -------------------------------------------------------------------------------------
    def set_creator(self, func: Function) -> None:
        """Records ``func`` as the maker of this variable, one generation after it."""
        self.creator = func
        self.generation = func.generation + 1

    def cleargrad(self) -> None:
        """Forgets the gradient, so that the next backward starts from zero instead of accumulating."""
        self.grad = None

    def backward(self, retain_grad: bool = False, create_graph: bool = False) -> None:
        """Back-propagates from this variable: every variable upstream gets ``.grad`` added to.

        The output's own gradient starts as ones (of its shape) unless ``self.grad`` was set before.
        Gradients accumulate (``x.grad = x.grad + gx``), as in torch: call ``cleargrad`` (or the
        module's ``zero_grad``) between independent backward passes.

        Args:
            retain_grad: Keep the gradients of intermediate variables too; by default only leaves
                (variables without a creator) keep theirs, which frees memory early.
            create_graph: Record the backward computation itself, so that the resulting ``.grad``
                Variables can be differentiated again (second derivatives, Hessian-vector products).
        """
        if self.grad is None:
            self.grad = Variable(np.ones_like(self.data))
        if self.creator is None:
            return
        # A max-heap on generation; the counter breaks ties so functions are never compared.
        heap: list[tuple[int, int, Function]] = []
        seen: set[int] = set()
        counter = itertools.count()

        def push(func: Function) -> None:
            if id(func) not in seen:
                seen.add(id(func))
                heapq.heappush(heap, (-func.generation, next(counter), func))

        push(self.creator)
        while heap:
            func = heapq.heappop(heap)[2]
            outputs = [ref() for ref in func.outputs]
            # An output that no later function used (or that was dropped) contributes a zero gradient.
            gys = [
                Variable(np.zeros(shape, dtype)) if y is None or y.grad is None else y.grad
                for y, (shape, dtype) in zip(outputs, func.output_specs, strict=True)
            ]
            with using_config("enable_backprop", create_graph):
                gxs = func.backward(*gys)
                if not isinstance(gxs, tuple):
                    gxs = (gxs,)
                for x, gx in zip(func.inputs, gxs, strict=True):
                    if gx is None:  # no gradient for this input (e.g. integer labels)
                        continue
                    x.grad = gx if x.grad is None else x.grad + gx
                    if x.creator is not None:
                        push(x.creator)
            if not retain_grad:
                for y in outputs:
                    if y is not None:
                        y.grad = None


class Function:
    """Base class of every operation: subclasses write ``forward`` on arrays, ``backward`` on Variables.

    ``f(*inputs)`` converts the inputs to Variables, runs ``forward`` on their arrays, wraps the results
    and, while backprop is enabled, remembers inputs and outputs so that ``backward`` can be called.
    Outputs are held through weak references: a function keeps its inputs alive (they are needed for
    the gradient), but the outputs keep the function alive, not the other way round, so no reference
    cycle holds a graph in memory after the last output is dropped.
    """

    generation: int = 0
    inputs: tuple[Variable, ...] = ()
    outputs: tuple[weakref.ref[Variable], ...] = ()
    output_specs: tuple[tuple[tuple[int, ...], np.dtype], ...] = ()  # (shape, dtype) of each output

    def __call__(self, *inputs: Any) -> Any:
        variables = tuple(as_variable(x) for x in inputs)
        ys = self.forward(*(x.data for x in variables))
        ys = ys if isinstance(ys, tuple) else (ys,)
        outputs = [Variable(y) for y in ys]
        if Config.enable_backprop:
            self.generation = max((x.generation for x in variables), default=0)
            for output in outputs:
                output.set_creator(self)
            self.inputs = variables
            self.outputs = tuple(weakref.ref(output) for output in outputs)
            self.output_specs = tuple((y.shape, y.dtype) for y in outputs)
        return outputs if len(outputs) > 1 else outputs[0]

    def forward(self, *xs: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """Computes the outputs from the input arrays."""
        raise NotImplementedError

    def backward(self, *gys: Variable) -> Variable | None | tuple[Variable | None, ...]:
        """Gradient of the inputs from the gradient of the outputs, written with Variables."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
