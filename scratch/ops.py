"""The operations: one ``Function`` subclass per primitive, and plain functions that compose them.

Every ``backward`` below is written with Variables and the functions of this module, never with raw
arrays, so the backward pass is itself differentiable: ``backward(create_graph=True)`` followed by a
second ``backward`` gives second (and higher) derivatives for every operation here, including the
convolution and the max pooling, which are built from the linear maps ``im2col`` / ``col2im``.

Broadcasting: numpy broadcasts in the forward pass, so the backward pass sums the gradient back down to
each input's shape (``sum_to``), which is the adjoint of broadcasting.

Shapes in comments: N batch, C channels, H x W image, KH x KW kernel, OH x OW output image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scratch.core import Function, Variable, as_variable

Axis = int | tuple[int, ...] | None
Index = Any  # anything numpy accepts between [ ]: ints, slices, integer arrays, tuples of these


# ==================================================================================================
# Shape helpers (numpy only)
# ==================================================================================================


def keepdims_shape(shape: tuple[int, ...], axis: Axis) -> tuple[int, ...]:
    """The shape a reduction over ``axis`` has with ``keepdims=True``: reduced axes become 1."""
    if axis is None:
        return (1,) * len(shape)
    axes = {a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis)}
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def sum_to_array(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sums ``x`` down to ``shape``, undoing numpy broadcasting (extra leading axes, axes of size 1)."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1
    )
    return x.sum(axis=axes, keepdims=True).reshape(shape)


def operand(x: Variable, other: Any) -> Variable:
    """The other operand of ``x <op> other`` as a Variable; a number or array takes ``x``'s dtype."""
    return other if isinstance(other, Variable) else Variable(np.asarray(other, dtype=x.dtype))


def unbroadcast(gx: Variable, shape: tuple[int, ...]) -> Variable:
    """The gradient ``gx`` of a broadcast result, summed back to the input ``shape``."""
    return gx if gx.shape == shape else sum_to(gx, shape)


# ==================================================================================================
# Arithmetic
# ==================================================================================================


class Add(Function):
    def forward(self, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
        return x0 + x1

    def backward(self, gy: Variable) -> tuple[Variable, Variable]:
        x0, x1 = self.inputs
        return unbroadcast(gy, x0.shape), unbroadcast(gy, x1.shape)


class Sub(Function):
    def forward(self, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
        return x0 - x1

    def backward(self, gy: Variable) -> tuple[Variable, Variable]:
        x0, x1 = self.inputs
        return unbroadcast(gy, x0.shape), unbroadcast(-gy, x1.shape)


class Mul(Function):
    def forward(self, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
        return x0 * x1

    def backward(self, gy: Variable) -> tuple[Variable, Variable]:
        x0, x1 = self.inputs
        return unbroadcast(gy * x1, x0.shape), unbroadcast(gy * x0, x1.shape)


class Div(Function):
    def forward(self, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
        return x0 / x1

    def backward(self, gy: Variable) -> tuple[Variable, Variable]:
        x0, x1 = self.inputs
        gx0 = gy / x1
        gx1 = gy * (-x0 / x1**2)
        return unbroadcast(gx0, x0.shape), unbroadcast(gx1, x1.shape)


class Neg(Function):
    def forward(self, x: np.ndarray) -> np.ndarray:
        return -x

    def backward(self, gy: Variable) -> Variable:
        return -gy


class Pow(Function):
    """``x ** c`` for a constant exponent ``c`` (a number); d/dx = c x^(c-1)."""

    def __init__(self, c: float) -> None:
        self.c = c

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x**self.c

    def backward(self, gy: Variable) -> Variable:
        (x,) = self.inputs
        return gy * (self.c * x ** (self.c - 1))


def add(x0: Any, x1: Any) -> Variable:
    """``x0 + x1`` with broadcasting."""
    x0 = as_variable(x0)
    return Add()(x0, operand(x0, x1))


def sub(x0: Any, x1: Any) -> Variable:
    """``x0 - x1`` with broadcasting."""
    x0 = as_variable(x0)
    return Sub()(x0, operand(x0, x1))


def rsub(x0: Variable, x1: Any) -> Variable:
    """``x1 - x0``: Python calls ``x0.__rsub__(x1)`` for ``number - Variable``."""
    return Sub()(operand(x0, x1), x0)


def mul(x0: Any, x1: Any) -> Variable:
    """``x0 * x1`` with broadcasting."""
    x0 = as_variable(x0)
    return Mul()(x0, operand(x0, x1))


def div(x0: Any, x1: Any) -> Variable:
    """``x0 / x1`` with broadcasting."""
    x0 = as_variable(x0)
    return Div()(x0, operand(x0, x1))


def rdiv(x0: Variable, x1: Any) -> Variable:
    """``x1 / x0``, for ``number / Variable``."""
    return Div()(operand(x0, x1), x0)


def neg(x: Any) -> Variable:
    """``-x``."""
    return Neg()(x)


def pow(x: Any, c: Any) -> Variable:
    """``x ** c``: a constant number ``c`` is a primitive; a Variable exponent goes through exp and log."""
    if isinstance(c, Variable):
        return exp(c * log(x))  # x ** c = e^(c ln x), defined for x > 0
    return Pow(float(c))(x)


def rpow(x: Variable, base: Any) -> Variable:
    """``base ** x`` for a positive number ``base``: e^(x ln base)."""
    return exp(x * np.log(np.asarray(base, dtype=x.dtype)))


# ==================================================================================================
# Element-wise functions
# ==================================================================================================


class Exp(Function):
    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.exp(x)

    def backward(self, gy: Variable) -> Variable:
        y = self.outputs[0]()  # d/dx e^x = e^x: reuse the output instead of recomputing it
        return gy * y


class Log(Function):
    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.log(x)

    def backward(self, gy: Variable) -> Variable:
        (x,) = self.inputs
        return gy / x


class Tanh(Function):
    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x)

    def backward(self, gy: Variable) -> Variable:
        y = self.outputs[0]()
        return gy * (1 - y * y)


class Sigmoid(Function):
    def forward(self, x: np.ndarray) -> np.ndarray:
        # 1 / (1 + e^-x) overflows for very negative x; this identity does not.
        return np.tanh(x * 0.5) * 0.5 + 0.5

    def backward(self, gy: Variable) -> Variable:
        y = self.outputs[0]()
        return gy * y * (1 - y)


class ReLU(Function):
    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0.0)

    def backward(self, gy: Variable) -> Variable:
        (x,) = self.inputs
        # The slope is a constant 0/1 mask (0 at x == 0, as in torch), so the second derivative is 0.
        return gy * (x.data > 0).astype(gy.dtype)


def exp(x: Any) -> Variable:
    """e^x, element-wise."""
    return Exp()(x)


def log(x: Any) -> Variable:
    """Natural logarithm, element-wise."""
    return Log()(x)


def tanh(x: Any) -> Variable:
    """Hyperbolic tangent, element-wise."""
    return Tanh()(x)


def sigmoid(x: Any) -> Variable:
    """1 / (1 + e^-x), element-wise."""
    return Sigmoid()(x)


def relu(x: Any) -> Variable:
    """max(x, 0), element-wise."""
    return ReLU()(x)


# ==================================================================================================
# Linear algebra
# ==================================================================================================


class MatMul(Function):
    def forward(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or w.ndim != 2:
            raise ValueError(f"matmul takes two matrices, got shapes {x.shape} and {w.shape}")
        return x @ w  # (N, D) @ (D, H) -> (N, H)

    def backward(self, gy: Variable) -> tuple[Variable, Variable]:
        x, w = self.inputs
        return gy @ w.T, x.T @ gy  # (N, H) @ (H, D) -> (N, D);  (D, N) @ (N, H) -> (D, H)


def matmul(x: Any, w: Any) -> Variable:
    """Matrix product of two 2-D variables ``(N, D) @ (D, H) -> (N, H)``."""
    return MatMul()(x, w)


def rmatmul(w: Variable, x: Any) -> Variable:
    """``x @ w`` for an array ``x`` on the left."""
    return MatMul()(operand(w, x), w)


# ==================================================================================================
# Shapes: reshape, transpose, broadcast_to, sum_to, reductions, indexing
# ==================================================================================================


class Reshape(Function):
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(self.shape)

    def backward(self, gy: Variable) -> Variable:
        return reshape(gy, self.inputs[0].shape)


class Transpose(Function):
    def __init__(self, axes: tuple[int, ...] | None) -> None:
        self.axes = axes

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x.transpose(self.axes)

    def backward(self, gy: Variable) -> Variable:
        # The inverse permutation puts every axis back where it came from.
        return transpose(gy, None if self.axes is None else tuple(np.argsort(self.axes)))


class BroadcastTo(Function):
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.broadcast_to(x, self.shape).copy()

    def backward(self, gy: Variable) -> Variable:
        return sum_to(gy, self.inputs[0].shape)


class SumTo(Function):
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        return sum_to_array(x, self.shape)

    def backward(self, gy: Variable) -> Variable:
        return broadcast_to(gy, self.inputs[0].shape)


class Sum(Function):
    def __init__(self, axis: Axis, keepdims: bool) -> None:
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy: Variable) -> Variable:
        # Every input element contributed once to its sum: copy the gradient back over the summed axes.
        shape = self.inputs[0].shape
        return broadcast_to(reshape(gy, keepdims_shape(shape, self.axis)), shape)


class Max(Function):
    def __init__(self, axis: Axis, keepdims: bool) -> None:
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x.max(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy: Variable) -> Variable:
        (x,) = self.inputs
        shape = keepdims_shape(x.shape, self.axis)
        # The gradient goes to the arg-max; ties share it equally, as torch.amax does.
        mask = x.data == self.outputs[0]().data.reshape(shape)
        mask = mask / mask.sum(axis=self.axis, keepdims=True)
        return broadcast_to(reshape(gy, shape), x.shape) * mask


class GetItem(Function):
    def __init__(self, index: Index) -> None:
        self.index = index

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x[self.index])

    def backward(self, gy: Variable) -> Variable:
        return GetItemGrad(self.index, self.inputs[0].shape)(gy)


class GetItemGrad(Function):
    """The adjoint of ``x[index]``: scatters a gradient into zeros of the input's shape."""

    def __init__(self, index: Index, shape: tuple[int, ...]) -> None:
        self.index, self.shape = index, shape

    def forward(self, gy: np.ndarray) -> np.ndarray:
        gx = np.zeros(self.shape, dtype=gy.dtype)
        # add.at, not gx[index] = gy: an element picked twice (x[[0, 0]]) must get both gradients.
        np.add.at(gx, self.index, gy)
        return gx

    def backward(self, ggx: Variable) -> Variable:
        return get_item(ggx, self.index)


def reshape(x: Any, shape: tuple[int, ...]) -> Variable:
    """``x`` with a new shape (one entry may be -1); returns ``x`` itself when the shape is unchanged."""
    x = as_variable(x)
    return x if x.shape == tuple(shape) else Reshape(tuple(shape))(x)


def transpose(x: Any, axes: tuple[int, ...] | None = None) -> Variable:
    """Permutes the axes like ``np.transpose``; ``axes=None`` reverses them."""
    return Transpose(None if axes is None else tuple(axes))(x)


def broadcast_to(x: Any, shape: tuple[int, ...]) -> Variable:
    """Repeats ``x`` along new or size-1 axes to ``shape``; its gradient is ``sum_to``."""
    x = as_variable(x)
    return x if x.shape == tuple(shape) else BroadcastTo(tuple(shape))(x)


def sum_to(x: Any, shape: tuple[int, ...]) -> Variable:
    """Sums ``x`` down to ``shape`` (the reverse of broadcasting); its gradient is ``broadcast_to``."""
    x = as_variable(x)
    return x if x.shape == tuple(shape) else SumTo(tuple(shape))(x)


def sum(x: Any, axis: Axis = None, keepdims: bool = False) -> Variable:
    """Sum over ``axis`` (None: all axes)."""
    return Sum(axis, keepdims)(x)


def mean(x: Any, axis: Axis = None, keepdims: bool = False) -> Variable:
    """Average over ``axis`` (None: all axes), as the sum times (output size / input size)."""
    x = as_variable(x)
    y = sum(x, axis, keepdims)
    return y * (y.size / x.size)


def max(x: Any, axis: Axis = None, keepdims: bool = False) -> Variable:
    """Maximum over ``axis`` (None: all axes), like ``torch.amax``."""
    return Max(axis, keepdims)(x)


def plain_index(index: Index) -> Index:
    """Replaces Variables inside an index by integer arrays (labels often arrive as Variables)."""
    if isinstance(index, tuple):
        return tuple(plain_index(i) for i in index)
    return index.data.astype(np.intp) if isinstance(index, Variable) else index


def get_item(x: Any, index: Index) -> Variable:
    """``x[index]`` with numpy's rules: ints, slices, integer arrays (fancy indexing), tuples."""
    return GetItem(plain_index(index))(x)


# ==================================================================================================
# Softmax and losses
# ==================================================================================================


class Softmax(Function):
    def __init__(self, axis: int) -> None:
        self.axis = axis

    def forward(self, x: np.ndarray) -> np.ndarray:
        # Subtracting the max changes nothing mathematically and keeps exp from overflowing.
        e = np.exp(x - x.max(axis=self.axis, keepdims=True))
        return e / e.sum(axis=self.axis, keepdims=True)

    def backward(self, gy: Variable) -> Variable:
        # dy_i/dx_j = y_i (delta_ij - y_j)  =>  gx = y * gy - y * sum(y * gy)
        y = self.outputs[0]()
        gx = y * gy
        return gx - y * sum(gx, axis=self.axis, keepdims=True)


class LogSoftmax(Function):
    def __init__(self, axis: int) -> None:
        self.axis = axis

    def forward(self, x: np.ndarray) -> np.ndarray:
        # log softmax(x) = (x - m) - log sum exp(x - m) for any m; m = max keeps exp in range.
        z = x - x.max(axis=self.axis, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=self.axis, keepdims=True))

    def backward(self, gy: Variable) -> Variable:
        # d(log y_i)/dx_j = delta_ij - softmax_j  =>  gx = gy - softmax * sum(gy), softmax = e^y
        y = self.outputs[0]()
        return gy - exp(y) * sum(gy, axis=self.axis, keepdims=True)


def softmax(x: Any, axis: int = -1) -> Variable:
    """e^x / sum(e^x) along ``axis``, computed without overflow."""
    return Softmax(axis)(x)


def log_softmax(x: Any, axis: int = -1) -> Variable:
    """log(softmax(x)) along ``axis``, computed without overflow or log(0)."""
    return LogSoftmax(axis)(x)


def cross_entropy(logits: Any, labels: Any) -> Variable:
    """Mean negative log-likelihood of integer ``labels`` (N,) under ``softmax(logits)`` (N, C).

    Same value as ``torch.nn.functional.cross_entropy(logits, labels)``.
    """
    logits = as_variable(logits)
    labels = np.asarray(labels.data if isinstance(labels, Variable) else labels).astype(np.intp)
    log_p = log_softmax(logits, axis=1)  # (N, C)
    return -mean(log_p[np.arange(len(labels)), labels])  # pick log p[n, label_n]: (N,)


def mse(x0: Any, x1: Any) -> Variable:
    """Mean squared error over all elements, like ``torch.nn.functional.mse_loss``."""
    diff = sub(x0, x1)
    return mean(diff * diff)


# ==================================================================================================
# Convolution and pooling via im2col
# ==================================================================================================
# A convolution is a matrix product once every receptive field is copied out as a row ("im2col"):
# (N, C, H, W) -> (N*OH*OW, C*KH*KW). "col2im" is its adjoint: it adds every row back onto the
# pixels it came from. Both are linear, each is the other's gradient, so any graph built from them
# (and matmul, reshape, max) is differentiable to any order.


IntPair = int | tuple[int, int]


def pair(v: IntPair) -> tuple[int, int]:
    """3 -> (3, 3); a pair passes through."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a sliding window: floor((size + 2 pad - kernel) / stride) + 1."""
    return (size + 2 * pad - kernel) // stride + 1


def im2col_array(
    img: np.ndarray, kernel: IntPair, stride: IntPair = 1, pad: IntPair = 0, pad_value: float = 0.0
) -> np.ndarray:
    """(N, C, H, W) -> (N*OH*OW, C*KH*KW): row ``(n, oh, ow)`` is the patch under the kernel there."""
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(pad)
    n, c, h, w = img.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    img = np.pad(img, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    col = np.empty((n, c, kh, kw, oh, ow), dtype=img.dtype)
    # One strided slice per kernel offset (KH*KW copies) instead of one copy per output pixel.
    for i in range(kh):
        for j in range(kw):
            col[:, :, i, j] = img[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, c * kh * kw)


def col2im_array(
    col: np.ndarray, shape: tuple[int, ...], kernel: IntPair, stride: IntPair = 1, pad: IntPair = 0
) -> np.ndarray:
    """(N*OH*OW, C*KH*KW) -> (N, C, H, W), adding up every copy of a pixel (the adjoint of im2col)."""
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(pad)
    n, c, h, w = shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    col = col.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)  # (N, C, KH, KW, OH, OW)
    img = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=col.dtype)
    for i in range(kh):
        for j in range(kw):
            img[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw] += col[:, :, i, j]
    return img[:, :, ph : ph + h, pw : pw + w]


class Im2col(Function):
    def __init__(self, kernel: IntPair, stride: IntPair, pad: IntPair, pad_value: float = 0.0) -> None:
        self.kernel, self.stride, self.pad, self.pad_value = kernel, stride, pad, pad_value

    def forward(self, x: np.ndarray) -> np.ndarray:
        return im2col_array(x, self.kernel, self.stride, self.pad, self.pad_value)

    def backward(self, gy: Variable) -> Variable:
        # The padding value is a constant: it shifts the output but not the gradient.
        return Col2im(self.inputs[0].shape, self.kernel, self.stride, self.pad)(gy)


class Col2im(Function):
    def __init__(self, shape: tuple[int, ...], kernel: IntPair, stride: IntPair, pad: IntPair) -> None:
        self.shape, self.kernel, self.stride, self.pad = shape, kernel, stride, pad

    def forward(self, col: np.ndarray) -> np.ndarray:
        return col2im_array(col, self.shape, self.kernel, self.stride, self.pad)

    def backward(self, gy: Variable) -> Variable:
        return Im2col(self.kernel, self.stride, self.pad)(gy)


def im2col(
    x: Any, kernel: IntPair, stride: IntPair = 1, pad: IntPair = 0, pad_value: float = 0.0
) -> Variable:
    """Differentiable im2col: (N, C, H, W) -> (N*OH*OW, C*KH*KW); padding filled with ``pad_value``."""
    return Im2col(kernel, stride, pad, pad_value)(x)


def conv2d(x: Any, w: Any, b: Any = None, stride: IntPair = 1, padding: IntPair = 0) -> Variable:
    """2-D cross-correlation, like ``torch.nn.functional.conv2d`` (no dilation or groups).

    Args:
        x: Images (N, C, H, W).
        w: Kernels (OC, C, KH, KW), torch's layout.
        b: Bias (OC,) or None.
        stride: Step of the window, an int or (vertical, horizontal).
        padding: Zeros added on each side, an int or (vertical, horizontal).

    Returns:
        (N, OC, OH, OW). Differentiable to any order (it is im2col, matmul, add and reshapes).
    """
    x, w = as_variable(x), as_variable(w)
    n, _, h, wd = x.shape
    oc, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(wd, kw, sw, pw)
    col = im2col(x, (kh, kw), stride, padding)  # (N*OH*OW, C*KH*KW)
    y = col @ reshape(w, (oc, -1)).T  # (N*OH*OW, OC)
    if b is not None:
        y = y + b
    return transpose(reshape(y, (n, oh, ow, oc)), (0, 3, 1, 2))  # (N, OC, OH, OW)


def max_pool2d(x: Any, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0) -> Variable:
    """Max over each window, like ``torch.nn.functional.max_pool2d``; ``stride`` defaults to the kernel.

    Each channel is pooled on its own, so the channels are folded into the batch before im2col. Padding
    is -inf, which never wins a max. The gradient goes to the arg-max of each window; where a window
    has several equal maxima they share it (torch gives all of it to one of them).
    """
    x = as_variable(x)
    n, c, h, w = x.shape
    (kh, kw) = pair(kernel_size)
    (sh, sw), (ph, pw) = pair(kernel_size if stride is None else stride), pair(padding)
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    col = im2col(reshape(x, (n * c, 1, h, w)), (kh, kw), (sh, sw), (ph, pw), -np.inf)  # (N*C*OH*OW, KH*KW)
    return reshape(max(col, axis=1), (n, c, oh, ow))


# ==================================================================================================
# Operators and methods of Variable
# ==================================================================================================


def _reshape_method(x: Variable, *shape: Any) -> Variable:
    """``x.reshape(2, 3)`` or ``x.reshape((2, 3))``, as in numpy."""
    return reshape(x, tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape)


def _transpose_method(x: Variable, *axes: Any) -> Variable:
    """``x.transpose()`` reverses the axes; ``x.transpose(1, 0, 2)`` or ``x.transpose((1, 0, 2))`` permutes."""
    if len(axes) == 1 and not isinstance(axes[0], int):
        axes = tuple(axes[0])
    return transpose(x, axes or None)


def _install_operators() -> None:
    """Attaches the operators and array-style methods to ``Variable`` (DeZero's ``setup_variable``)."""
    Variable.__add__ = add
    Variable.__radd__ = add
    Variable.__sub__ = sub
    Variable.__rsub__ = rsub
    Variable.__mul__ = mul
    Variable.__rmul__ = mul
    Variable.__truediv__ = div
    Variable.__rtruediv__ = rdiv
    Variable.__neg__ = neg
    Variable.__pow__ = pow
    Variable.__rpow__ = rpow
    Variable.__matmul__ = matmul
    Variable.__rmatmul__ = rmatmul
    Variable.__getitem__ = get_item
    Variable.reshape = _reshape_method
    Variable.transpose = _transpose_method
    Variable.T = property(lambda x: transpose(x))
    Variable.sum = sum
    Variable.mean = mean
    Variable.max = max


_install_operators()
