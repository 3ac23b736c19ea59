"""The house rules, checked: no import circle between the package's modules, views and pure
modules free of IPython, and every private ipyparallel name still where the adapter expects it
(so an upgrade that renames one fails here, loudly)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_cluster_magic"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    base = PACKAGE.parent
    return (base / rel).with_suffix(".py").exists() or (base / rel / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, at any depth of its code (lazy
    imports inside functions and TYPE_CHECKING blocks count too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` depends on the submodule; ``from mod import name`` on mod
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if _is_module(sub) else mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = {d for d in _imports(path) if d in files and d != name}
        # importing a subpackage's module implies its __init__ ran; the package's own
        # __init__ (the public surface) is not a dependency edge of its modules
        graph[name] = {d for d in deps if d != "mlx_cluster_magic"}
    return graph


def test_no_import_circle() -> None:
    graph = _graph()
    circles = []

    def visit(node: str, path: list[str]) -> None:
        for dep in graph.get(node, ()):
            if dep in path:
                circles.append([*path[path.index(dep) :], dep])
            elif len(path) < 12:
                visit(dep, [*path, dep])

    for start in graph:
        visit(start, [start])
    assert not circles, f"import circle(s): {sorted({' -> '.join(c) for c in circles})[:5]}"


def _transitive(name: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        n = todo.pop()
        for d in graph.get(n, ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


PURE = [
    "mlx_cluster_magic.snapshot",
    "mlx_cluster_magic.procs",
    "mlx_cluster_magic.status",
    "mlx_cluster_magic.options",
    "mlx_cluster_magic.hosts",
    "mlx_cluster_magic.launch",
    "mlx_cluster_magic.views.text",
    "mlx_cluster_magic.pipeline_plan",
    "mlx_cluster_magic.lm",
]


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_import_no_ipython(name: str) -> None:
    graph = _graph()
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    for mod in {name} | _transitive(name, graph):
        external = {i.split(".")[0] for i in _imports(files[mod])}
        assert not external & {"IPython", "ipyparallel", "ipykernel", "ipywidgets"}, mod


def test_views_render_data_and_do_not_import_the_cluster() -> None:
    graph = _graph()
    for name in graph:
        if name.startswith("mlx_cluster_magic.views"):
            assert not _transitive(name, graph) & {
                "mlx_cluster_magic.cluster",
                "mlx_cluster_magic.px",
                "mlx_cluster_magic.status",
            }, name


def test_px_knows_the_cluster_only_by_protocol() -> None:
    assert "mlx_cluster_magic.cluster" not in _transitive("mlx_cluster_magic.px", _graph())


def test_private_ipyparallel_names_live_in_the_adapter_and_still_exist() -> None:
    from ipyparallel.client.asyncresult import AsyncResult
    from ipyparallel.client.magics import ParallelMagics

    from mlx_cluster_magic.engines import PRIVATE_NAMES

    kinds = {"AsyncResult": AsyncResult, "ParallelMagics": ParallelMagics}
    for kind, attr in PRIVATE_NAMES:
        cls = kinds[kind]
        # instance attributes are set in __init__: look in its source as well
        import inspect

        source = inspect.getsource(cls)
        assert hasattr(cls, attr) or f"self.{attr} =" in source, f"{kind}.{attr} is gone"
    # and no other module of ours touches them
    names = {attr for _, attr in PRIVATE_NAMES}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "engines.py":
            continue
        text = path.read_text()
        used = {n for n in names if f".{n}" in text}
        assert not used, f"{path.name} uses ipyparallel's private {used}: go through engines.py"
