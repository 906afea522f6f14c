"""The layering of ARCHITECTURE.md, checked on every import statement of the lab's packages."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "core",
    "nets",
    "envs",
    "scratch",
    "agents",
    "tasks",
    "explain",
    "compress",
    "sweep",
    "lab",
    "benchmarks",
)
BOTTOM = {"core", "nets", "envs", "scratch"}
# What each package may import besides itself (function-level imports count too).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "nets": set(),
    "envs": set(),
    "scratch": set(),
    "agents": BOTTOM - {"scratch"},
    "tasks": BOTTOM,
    "explain": BOTTOM | {"agents", "tasks"},
    "compress": BOTTOM | {"agents", "tasks"},
    "sweep": BOTTOM | {"agents", "tasks"},
    "benchmarks": BOTTOM | {"agents", "tasks", "explain", "compress", "sweep"},
    "lab": set(PACKAGES),
}


def project_imports(path: Path) -> set[str]:
    """The lab modules a file imports (dotted names), at any depth of the file. ``from pkg import
    sub`` counts as an import of ``pkg.sub`` when that is a module, else of ``pkg``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                names.add(dotted if dotted in MODULES else node.module)
    return {name for name in names if name.split(".")[0] in PACKAGES}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_files() -> list[Path]:
    return [
        path for package in PACKAGES if (ROOT / package).is_dir() for path in (ROOT / package).rglob("*.py")
    ]


MODULES = {module_name(path) for path in all_files()}


def test_lower_layers_never_import_upper_ones():
    wrong = []
    for path in all_files():
        package = path.relative_to(ROOT).parts[0]
        for name in project_imports(path):
            target = name.split(".")[0]
            if target != package and target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    graph = {module_name(path): project_imports(path) & MODULES for path in all_files()}
    cycles = []
    for start, targets in graph.items():
        # Depth-first from each module: reaching it again is a cycle.
        stack, seen = [(target, [start, target]) for target in targets if target != start], set()
        while stack:
            node, trail = stack.pop()
            if node == start:
                cycles.append(" -> ".join(trail))
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.extend((nxt, [*trail, nxt]) for nxt in graph.get(node, ()) if nxt != node)
    assert not cycles, "\n".join(sorted(set(cycles))[:10])


def test_no_code_cites_the_old_blueprint():
    cited = [str(path.relative_to(ROOT)) for path in all_files() if "DESIGN.md" in path.read_text()]
    assert not cited, cited
