"""The package's structure: no import cycles, each package imports only what its docstring allows,
the library does not print, and the packaging lists every package."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "autotune"

# What each package may import (its __init__ docstring says the same): the data flow, in order.
ALLOWED = {
    "support": set(),
    "models": {"support"},
    "frontend": {"support", "models"},
    "kernels": {"support"},
    "passes": {"support", "frontend", "kernels"},
    "tuning": {"support", "frontend", "kernels", "passes"},
    "runtime": {"support"},
    "build": {"support", "frontend", "passes", "tuning", "runtime", "kernels"},
    "i2v": {"support", "models", "frontend", "build", "runtime"},
    "bench": {"support", "models", "frontend", "build", "runtime"},
    "cli": set(),  # anything
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every autotune module `path` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "autotune"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "autotune":
                continue
            found.add(module)
            for alias in node.names:  # `from autotune.x import submodule`
                if (ROOT / (module + "." + alias.name).replace(".", "/")).with_suffix(".py").exists():
                    found.add(f"{module}.{alias.name}")
    return found - {name}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"}
    graph = {}
    for name, path in modules.items():
        # importing a.b.c runs a and a.b first anyway: a module's own parent packages are no dependency
        graph[name] = {m for m in _imports(path) if m in modules and m != "autotune" and not name.startswith(m + ".")}
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_each_package_imports_only_what_it_may():
    bad = []
    for module, imports in _graph().items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in ALLOWED or parts[1] == "cli":
            continue
        own = parts[1]
        for imported in imports:
            other = imported.split(".")[1] if imported.count(".") else None
            if other and other != own and other in ALLOWED and other not in ALLOWED[own]:
                bad.append(f"{module} imports {imported}")
    assert not bad, "\n".join(bad)


def test_package_docstrings_say_what_they_may_import():
    for name, allowed in ALLOWED.items():
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"autotune/{name}/__init__.py: no 'May import' line"
        said = set(re.findall(r"\b(" + "|".join(ALLOWED) + r")\b", doc.split("May import", 1)[1]))
        assert allowed <= said, f"autotune/{name}: docstring does not list {sorted(allowed - said)}"


def test_library_code_logs_instead_of_printing():
    printing = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not printing, "library code prints (log through `logging`; the CLI renders it): " + ", ".join(printing)


def test_packaging_lists_every_package_and_the_shipped_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    packages = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, f"pyproject.toml lacks {sorted(packages - listed)}"
    assert config["package-dir"]["autotune._targets"] == "targets"
    assert config["package-dir"]["autotune._schedules"] == "schedules"
