"""Arrows point one way: widgets -> plots -> lab model -> session -> workflows -> evaluator ->
state -> tensor math. Every import counts: module level, inside functions and type-only. The
only upward import allowed is a result's ``.plot()`` reaching the plots, inside the function.
Nothing outside ``widgets/`` imports the widgets package."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "prune_lab"

RANKS = {
    "_version": 0, "registry": 0, "formats": 0, "cache": 0, "devices": 0, "onnx_export": 0.5,
    "metrics": 0.5, "masks": 1, "datasets": 1, "quantize": 1, "compress": 1, "runtime": 1, "sparse_kernels": 1.5,
    "reconstruct": 1.5, "criteria": 2, "layers": 2, "export": 2, "patterns": 2.5,
    "measure": 3, "calibration": 3.2, "groups": 3.3, "heads": 3.35, "state": 3.4,
    "allocation": 4, "incremental": 4, "stats": 4, "recipes": 4, "channels": 4.5, "pruning": 4.6,
    "evaluate": 5,
    "workflows": 6.9, "workflows.sensitivity": 6, "workflows.finetune": 6, "workflows.compact": 6,
    "workflows.tradeoff": 6.5,
    "workflows.distributed": 6.8, "planner": 6.6,
    "session": 7, "models": 7, "slimming": 7.2, "granularity": 7.2, "checks": 7.5, "plan_checks": 7.6, "ticket_checks": 7.6,
    "lab_model": 8,
    "plots": 9,
    "widgets": 10.5, "widgets.lab": 10, "widgets.percent_slider": 9.5,
    "__init__": 11,
}
# (importer, imported): presentation reached lazily from a result's .plot()
SANCTIONED = {("workflows.sensitivity", "plots"), ("workflows.tradeoff", "plots")}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported prune_lab module, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me.split(".")[:-1] if path.name != "__init__.py" else me.split(".") if me != "__init__" else []
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)] if child.level > 1 else list(package)
                    target = ".".join(base + ([child.module] if child.module else []))
                    if child.module is None:  # from . import a, b
                        for alias in child.names:
                            found.append((".".join(base + [alias.name]), inside))
                        continue
                elif child.module and child.module.startswith("prune_lab"):
                    target = child.module.removeprefix("prune_lab").lstrip(".")
                else:
                    continue
                found.append((target or "__init__", inside))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("prune_lab"):
                        found.append((alias.name.removeprefix("prune_lab").lstrip(".") or "__init__", inside))
            visit(child, inside)

    visit(tree, False)
    return [(t, f) for t, f in found if t != me]


FILES = sorted(PKG.rglob("*.py"))


def test_every_module_has_a_rank():
    assert sorted(module_name(p) for p in FILES) == sorted(RANKS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    me = module_name(path)
    for target, in_function in imports(path):
        assert target in RANKS, f"{me} imports unknown module {target!r}"
        if RANKS[target] < RANKS[me] or me == "__init__":
            continue
        if (me, target) in SANCTIONED or (me, target.split(".")[0]) in SANCTIONED:
            assert in_function, f"{me} may import {target} only lazily, inside the function that needs it"
            continue
        pytest.fail(f"{me} (rank {RANKS[me]}) imports {target} (rank {RANKS[target]}): arrows must point down")


def test_no_import_cycles():
    graph = {module_name(p): {t for t, _ in imports(p)} for p in FILES}
    graph = {m: {t for t in ts if (m, t) not in SANCTIONED and (m, t.split(".")[0]) not in SANCTIONED} for m, ts in graph.items()}
    graph["__init__"] = set()  # the package's own re-exports
    state: dict[str, int] = {}

    def dfs(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                pytest.fail(f"import cycle: {' -> '.join(stack + [m, t])}")
            if t not in state:
                dfs(t, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            dfs(m, [])


def test_core_imports_no_widgets_or_matplotlib():
    import subprocess
    import sys

    code = ("import sys, prune_lab as pl; m, d = pl.demo(progress=False); s = pl.Session(m, d.test, device='cpu'); "
            "s.set_sparsity({'fc1': 0.5}); s.evaluate(); s.stats(); "
            "bad = [k for k in sys.modules if k.startswith(('ipywidgets', 'matplotlib'))]; print(bad); assert not bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout


WIDGET_LIBRARIES = ("ipywidgets", "ipympl", "traitlets")


@pytest.mark.parametrize("path", [p for p in FILES if "widgets" not in p.relative_to(PKG).parts], ids=module_name)
def test_only_the_widgets_package_imports_widget_libraries(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            assert not name.startswith(WIDGET_LIBRARIES), f"{module_name(path)} imports {name}: only prune_lab/widgets/ may"


# names by which a module could hold an object of another module (an attribute ``state`` holds a
# ``state.PruningState``): typed ``Any``, such a reference is invisible to the import checks above
HOLDER_NAMES = {"session": "session", "lab": "lab_model", "groups": "groups", "calibration": "calibration",
                "evaluator": "evaluate", "state": "state", "sizes": "stats", "stats": "stats"}


def _annotated_names(tree: ast.AST) -> list[tuple[str, ast.AST, int]]:
    """(name, annotation, line) of every annotated attribute, field and function parameter."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign):
            target = node.target
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            found.append((name, node.annotation, node.lineno))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in node.args.args + node.args.kwonlyargs:
                if a.annotation is not None:
                    found.append((a.arg, a.annotation, node.lineno))
    return found


@pytest.mark.parametrize("path", [p for p in FILES if RANKS[module_name(p)] < RANKS["session"]], ids=module_name)
def test_no_hidden_references_back_up(path):
    """Below the Session nothing is named after it or the Lab (whatever its type), and an object
    of another module held under that module's name is typed by its class, not ``Any``: so the
    import checks see every arrow."""
    me = module_name(path)
    for name, annotation, line in _annotated_names(ast.parse(path.read_text())):
        held = HOLDER_NAMES.get(name)
        if held is None or held == me:
            continue
        assert held not in ("session", "lab_model"), f"{me}:{line}: {name!r} refers up to the {held} (pass what it holds)"
        untyped = isinstance(annotation, ast.Name) and annotation.id == "Any"
        assert not untyped, f"{me}:{line}: {name!r} is typed Any; type it by its class so the layering test sees the arrow"


def test_no_function_is_longer_than_about_60_lines():
    long = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 62:
                long.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "split these: " + "; ".join(long)
