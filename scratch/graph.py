"""Pictures of the computational graph: DOT text for graphviz, or a PNG.

Variables are ellipses labelled with their name and shape; functions are boxes labelled with their
class. Arrows follow the forward pass: input -> function -> output. The graph is what backward
walks, in reverse.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from scratch.core import Function, Variable


def collect(output: Variable) -> tuple[list[Variable], list[Function]]:
    """Every variable and function the graph of ``output`` contains, each once, outputs first."""
    variables: dict[int, Variable] = {id(output): output}
    functions: dict[int, Function] = {}
    todo = [output.creator] if output.creator is not None else []
    while todo:
        func = todo.pop()
        if id(func) in functions:
            continue
        functions[id(func)] = func
        for y in (ref() for ref in func.outputs):
            if y is not None:
                variables.setdefault(id(y), y)
        for x in func.inputs:
            variables.setdefault(id(x), x)
            if x.creator is not None:
                todo.append(x.creator)
    return list(variables.values()), list(functions.values())


def variable_label(v: Variable) -> str:
    """ "name\\n(2, 3) float64", or just the shape and dtype for an unnamed variable."""
    shape = f"{v.shape} {v.dtype}"
    return f"{v.name}\n{shape}" if v.name else shape


def function_label(f: Function) -> str:
    """The class name: Add, MatMul, ..."""
    return type(f).__name__


def to_dot(output: Variable) -> str:
    """The graph of ``output`` in graphviz's DOT language (``dot -Tpng`` renders it)."""
    variables, functions = collect(output)
    lines = ["digraph g {"]
    for v in variables:
        label = variable_label(v).replace("\n", "\\n")
        lines.append(f'  {id(v)} [label="{label}", color=orange, style=filled]')
    for f in functions:
        lines.append(f'  {id(f)} [label="{function_label(f)}", color=lightblue, style=filled, shape=box]')
        lines += [f"  {id(x)} -> {id(f)}" for x in f.inputs]
        lines += [f"  {id(f)} -> {id(y)}" for y in (ref() for ref in f.outputs) if y is not None]
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_graph(output: Variable, path: str | Path) -> Path:
    """Writes a PNG of the graph: with graphviz's ``dot`` when installed, else with matplotlib."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        if shutil.which("dot"):
            subprocess.run(["dot", "-Tpng", "-o", tmp], input=to_dot(output), text=True, check=True)
        else:
            _draw_with_matplotlib(output, tmp)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half a PNG
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def layers(output: Variable) -> dict[int, list[Variable | Function]]:
    """Nodes by column: variable of generation g -> 2g, function of generation g -> 2g + 1.

    A function's inputs have generation <= its own and its outputs one more, so every arrow points
    to a later column. A leaf (an input or a parameter) stands just before the first function that
    uses it, not in column 0, so that its arrow does not cross the functions in between.
    """
    variables, functions = collect(output)
    first_use: dict[int, int] = {}
    for f in functions:
        for x in f.inputs:
            if x.creator is None:
                first_use[id(x)] = min(first_use.get(id(x), f.generation), f.generation)
    columns: dict[int, list[Any]] = {}
    for v in variables:
        columns.setdefault(2 * first_use.get(id(v), v.generation), []).append(v)
    for f in functions:
        columns.setdefault(2 * f.generation + 1, []).append(f)
    return dict(sorted(columns.items()))


def _draw_with_matplotlib(output: Variable, filename: str) -> None:
    from matplotlib.figure import Figure

    columns = layers(output)
    position: dict[int, tuple[float, float]] = {}
    for col, nodes in columns.items():
        for i, node in enumerate(nodes):
            position[id(node)] = (float(col), (len(nodes) - 1) / 2 - i)  # centred vertically
    height = max(len(nodes) for nodes in columns.values())
    fig = Figure(figsize=(1.6 * len(columns) + 1, 1.0 * height + 1))
    ax = fig.add_subplot()
    ax.set_axis_off()
    artists = {}
    for nodes in columns.values():
        for node in nodes:
            is_var = isinstance(node, Variable)
            text = variable_label(node) if is_var else function_label(node)
            box = {"boxstyle": "ellipse" if is_var else "square", "fc": "orange" if is_var else "lightblue"}
            artists[id(node)] = ax.text(
                *position[id(node)], text, ha="center", va="center", fontsize=7, bbox=box
            )
    _, functions = collect(output)
    for f in functions:
        ends = [(x, f) for x in f.inputs] + [(f, y) for y in (r() for r in f.outputs) if y is not None]
        for a, b in ends:
            # Clipping the arrow to both boxes makes it start and end on their outlines.
            patches = {"patchA": artists[id(a)].get_bbox_patch(), "patchB": artists[id(b)].get_bbox_patch()}
            ax.annotate(
                "", xy=position[id(b)], xytext=position[id(a)], arrowprops={"arrowstyle": "->", **patches}
            )
    xs = [p[0] for p in position.values()]
    ys = [p[1] for p in position.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    fig.savefig(filename, dpi=100)
