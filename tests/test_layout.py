"""The package's shape (docs/architecture.md, "The tree"): sub-packages in layers,
imports that only go down, no import circle, modules a newcomer can read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sparkops"

#: Bottom to top: a layer imports only from layers before it in this list.
LAYERS = ["core", "config", "storage", "board", "jobs", "net", "meters", "engine", "watch", "sprint", "remote", "demo",
          "runner", "control", "ui", "app", "cli", "__main__"]
#: The longest a module may be, in lines; the settings table is one declaration.
MAX_LINES = 600
LONG_ON_PURPOSE = {"config.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def runtime_imports(path: Path) -> set[str]:
    """The sparkops modules ``path`` imports when it runs (inside functions too; not
    those under ``if TYPE_CHECKING:``, which are for the type checker only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparkops"):
            if node.module == "sparkops":
                found.update(f"sparkops.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sparkops"))
    return found


def test_every_subpackage_says_its_job():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(ROOT)} has no docstring saying what the package is for"
    assert {p.parent.name for p in PACKAGE.glob("*/__init__.py")} <= set(LAYERS)


def test_imports_only_go_down_the_layers():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        me = layer_of(module_name(path))
        if me is None:
            continue
        assert me in LAYERS, f"{path}: not in a known layer"
        for target in runtime_imports(path):
            other = layer_of(target)
            if other in LAYERS and LAYERS.index(other) > LAYERS.index(me):
                upward.append(f"{module_name(path)} -> {target}")
    assert upward == []


def test_no_import_circle():
    tool = ROOT.parent / "shared" / "tools" / "import_cycles.py"
    if not tool.exists():  # the shared tool sits beside the checkout; check its own way too
        graph = {module_name(p): runtime_imports(p) for p in PACKAGE.rglob("*.py")}
        assert not _has_cycle(graph)
        return
    result = subprocess.run([sys.executable, str(tool), str(PACKAGE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_modules_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES and p.name not in LONG_ON_PURPOSE}
    assert long == {}


def _has_cycle(graph: dict[str, set[str]]) -> bool:
    state: dict[str, int] = {}

    def visit(node: str) -> bool:
        state[node] = 1
        for nxt in graph.get(node, ()):
            nxt = next((m for m in (nxt, nxt.rpartition(".")[0]) if m in graph), None)
            if nxt is None or nxt == node:
                continue
            if state.get(nxt) == 1 or (nxt not in state and visit(nxt)):
                return True
        state[node] = 2
        return False

    return any(node not in state and visit(node) for node in graph)


def test_every_module_imports():
    """Every module of the package imports (the app's pages are scripts, run by Streamlit)."""
    import importlib
    import pkgutil

    import sparkops

    failed = {}
    for info in pkgutil.walk_packages(sparkops.__path__, "sparkops."):
        if info.name.endswith("__main__") or info.name.startswith(("sparkops.app.pages", "sparkops.app.Home")):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # noqa: BLE001 - collect them all
            failed[info.name] = f"{type(exc).__name__}: {exc}"
    assert failed == {}
