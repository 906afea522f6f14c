"""A define-by-run autograd engine on numpy, in the spirit of DeZero and micrograd.

Small enough to read in one sitting, and checked against torch.autograd to the last digit
(tests/test_scratch_*.py):

- ``scratch.core``: ``Variable``, ``Function``, ``backward`` (with ``create_graph`` for higher
  derivatives), ``no_grad``;
- ``scratch.ops``: the operations, from ``add`` to ``conv2d``, and the operators of ``Variable``;
- ``scratch.nn``: ``Module``, ``Linear``, ``Conv2d``, ``MLP``, ``SmallCNN``, ``ConvNet``, the slide's XOR
  network, torch state-dict bridges;
- ``scratch.optim``: SGD, Momentum, Nesterov, AdaGrad, RMSProp, Adam, AdamW with torch's formulas;
- ``scratch.graph``: the computational graph as DOT text or a PNG;
- ``scratch.surfaces``: 2-D test functions, optimiser trajectories on both engines, their pictures.

``lab fit xor|playground|digits --engine scratch`` trains the lab's tasks with this engine
(``tasks/scratch_fit.py``), and ``lab fit optim`` races its optimisers (``tasks/optim.py``).

Example::

    import numpy as np
    import scratch
    from scratch import ops

    x = scratch.Variable(np.array(2.0))
    y = x**3
    y.backward(create_graph=True)   # x.grad = 3 x^2 = 12, itself a graph
    gx = x.grad
    x.cleargrad()
    gx.backward()                   # x.grad = 6 x = 12
"""

from scratch import ops
from scratch.core import Config, Function, Variable, as_array, as_variable, no_grad, using_config

__all__ = ["Config", "Function", "Variable", "as_array", "as_variable", "no_grad", "ops", "using_config"]
