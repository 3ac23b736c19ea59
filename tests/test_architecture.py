"""The house rules, checked: where each package may import from (the layers the README's module
map draws), what a rank imports (rank/ and the contract only, read from the source and seen in a
real interpreter), no import circle, no two modules of one name, views and pure modules free of
IPython, every private ipyparallel name still where the adapter expects it (so an upgrade
that renames one fails here, loudly), no module of the package imported under another name, and
no function over 80 lines."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
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


PKG = "mlx_cluster_magic"

#: What each package may import of ours, besides itself. ``contract`` (the seam between head
#: and ranks) and ``errors`` import nothing of ours; rank/ is the bottom layer: the head imports
#: it only to ship its functions to the ranks. The top level (MLXCluster, %%px, the magics) may
#: import anything, and nothing below imports it.
LAYERS: dict[str, set[str]] = {
    "contract": set(),
    "errors": set(),
    "rank": {"contract"},
    "fabric": {"rank", "contract", "errors"},
    "observe": {"fabric", "rank", "contract", "errors"},
    "views": {"observe", "contract", "errors"},
    "launch": {"fabric", "observe", "rank", "contract", "errors"},
}

#: Libraries a rank must never import: the head's notebook machinery.
NOT_ON_RANKS = ("IPython.core.magic", "IPython.core.magics", "ipywidgets", "anywidget")


def _layer(module: str) -> str:
    """``mlx_cluster_magic.fabric.doctor.probe`` -> ``fabric``; top-level modules -> ``top``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if len(parts) == 2 and parts[1] not in LAYERS:
        return "top"
    return parts[1]


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for name, deps in graph.items():
        layer = _layer(name)
        if layer not in LAYERS:
            continue
        for dep in deps:
            other = _layer(dep)
            if other != layer and other not in LAYERS[layer]:
                wrong.append(f"{name} imports {dep} ({layer}/ may import {sorted(LAYERS[layer])})")
    return sorted(wrong)


def test_each_package_imports_only_the_layers_below_it() -> None:
    assert _layer_violations(_graph()) == []


def test_a_wrong_import_is_caught() -> None:
    """The rule bites: a rank module that imports the head's placement, or a fabric module
    that imports launch, is reported (the same check as above, on a graph with one bad edge)."""
    graph = _graph()
    graph[f"{PKG}.rank.bootstrap"] = graph[f"{PKG}.rank.bootstrap"] | {f"{PKG}.fabric.placement"}
    graph[f"{PKG}.fabric.links"] = graph[f"{PKG}.fabric.links"] | {f"{PKG}.launch.bringup"}
    assert _layer_violations(graph) == [
        f"{PKG}.fabric.links imports {PKG}.launch.bringup "
        "(fabric/ may import ['contract', 'errors', 'rank'])",
        f"{PKG}.rank.bootstrap imports {PKG}.fabric.placement (rank/ may import ['contract'])",
    ]


def test_rank_modules_import_no_notebook_machinery() -> None:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name, path in files.items():
        if _layer(name) != "rank":
            continue
        imported = _imports(path)
        bad = {i for i in imported if i.startswith(NOT_ON_RANKS) or ".doctor" in i}
        assert not bad, f"{name} imports {sorted(bad)}: ranks run none of the notebook's code"


def test_a_rank_loads_only_rank_modules_and_the_contract() -> None:
    """Seen in a real interpreter: importing every rank module (as the engines do) loads no
    module of the head's, and none of IPython's magics, ipywidgets or anywidget."""
    mods = sorted(
        _module_name(p) for p in (PACKAGE / "rank").rglob("*.py") if p.name != "__init__.py"
    )
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    ours = {m for m in out if m == PKG or m.startswith(PKG + ".")}
    allowed = {PKG, f"{PKG}.contract", f"{PKG}.rank"}
    assert {m for m in ours if m not in allowed and not m.startswith(f"{PKG}.rank.")} == set()
    assert not [m for m in out if m.startswith(NOT_ON_RANKS)]


def test_no_two_modules_share_a_name() -> None:
    seen: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            seen.setdefault(path.stem, []).append(_module_name(path))
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


PURE = [
    "mlx_cluster_magic.observe.snapshot",
    "mlx_cluster_magic.launch.processes",
    "mlx_cluster_magic.observe.status_receiver",
    "mlx_cluster_magic.launch.spec",
    "mlx_cluster_magic.fabric.placement",
    "mlx_cluster_magic.launch.mpi_job",
    "mlx_cluster_magic.views.text",
    "mlx_cluster_magic.views.gather_view",
    "mlx_cluster_magic.fabric.doctor",
    "mlx_cluster_magic.observe.hang_verdict",
    "mlx_cluster_magic.contract",
    "mlx_cluster_magic.cluster.pipeline_plan",
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
                "mlx_cluster_magic.cluster.px",
                "mlx_cluster_magic.observe.status_receiver",
            }, name


def test_px_knows_the_cluster_only_by_protocol() -> None:
    assert "mlx_cluster_magic.cluster" not in _transitive("mlx_cluster_magic.cluster.px", _graph())


def test_private_ipyparallel_names_live_in_the_adapter_and_still_exist() -> None:
    from ipyparallel.client.asyncresult import AsyncResult
    from ipyparallel.client.magics import ParallelMagics
    from ipyparallel.controller import heartmonitor

    from mlx_cluster_magic.launch.ipp_adapter import PRIVATE_NAMES

    kinds = {
        "AsyncResult": AsyncResult,
        "ParallelMagics": ParallelMagics,
        "heartmonitor": heartmonitor,
    }
    for kind, attr in PRIVATE_NAMES:
        cls = kinds[kind]
        # instance attributes are set in __init__: look in its source as well
        import inspect

        source = inspect.getsource(cls)
        assert hasattr(cls, attr) or f"self.{attr} =" in source, f"{kind}.{attr} is gone"
    # and no other module of ours touches them
    names = {attr for _, attr in PRIVATE_NAMES}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "ipp_adapter.py":
            continue
        text = path.read_text()
        used = {n for n in names if f".{n}" in text}
        assert not used, f"{path.name} uses ipyparallel's private {used}: go through ipp_adapter"


def test_no_test_replaces_a_step_of_the_cluster() -> None:
    """A test starts clusters as a user does: none assigns to an attribute or method of
    ``MLXCluster`` (``cluster._preflight = lambda: None`` once hid a start-up bug on the very
    topology the test claimed to run, and ``cluster.spec = ...`` would skip the spec's checks)."""
    from mlx_cluster_magic.cluster import MLXCluster

    source = (PACKAGE / "cluster" / "life_cycle.py").read_text()
    names = {n for n in dir(MLXCluster)} | set(
        re.findall(r"self\.(\w+)\s*(?::[^=]+)?=", source)
    )
    names -= {"__class__", "__doc__"}
    found = []
    for path in sorted((PACKAGE.parent / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in names:
                    obj = ast.unparse(t.value)
                    if "cluster" in obj.lower() or obj in ("c", "cl"):
                        found.append(f"{path.name}:{node.lineno}: {ast.unparse(t)} = ...")
    assert found == [], found


# --------------------------------------------------------------------------- naming and size
def _aliased_modules(source: str, name: str, is_init: bool = False) -> list[str]:
    """``import x as y`` / ``from . import x as y`` where ``x`` is a module of the package and
    ``y`` is not its own name: the reader would meet a second name for a module they know."""
    package = name if is_init else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            pairs = [(f"{base}.{a.name}", a.name, a.asname) for a in node.names]
        elif isinstance(node, ast.Import):
            pairs = [(a.name, a.name.rsplit(".", 1)[-1], a.asname) for a in node.names]
        else:
            continue
        for module, own, asname in pairs:
            if asname and asname != own and module.startswith(PKG) and _is_module(module):
                found.append(f"{name}:{node.lineno}: {module} imported as {asname}")
    return found


def test_no_module_of_the_package_is_imported_under_another_name() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += _aliased_modules(
            path.read_text(), _module_name(path), is_init=path.name == "__init__.py"
        )
    assert found == [], found


def test_an_aliased_module_is_caught() -> None:
    source = (
        "from .launch import spec as opts\n"
        "from . import errors\n"
        "from .fabric.placement import Placement as P\n"  # a class, not a module: allowed
        "import mlx_cluster_magic.launch.mpi_job as launch\n"
    )
    assert _aliased_modules(source, f"{PKG}.cluster") == [
        f"{PKG}.cluster:1: {PKG}.launch.spec imported as opts",
        f"{PKG}.cluster:4: {PKG}.launch.mpi_job imported as launch",
    ]


MAX_FUNCTION_LINES = 80


def _function_lengths(source: str, name: str) -> dict[str, int]:
    """Every function and method (nested ones too) by qualified name: its lines from ``def`` to
    its last line."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}.{child.name}"
                out[qual] = (child.end_lineno or child.lineno) - child.lineno + 1
                visit(child, qual)
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}.{child.name}")
            else:
                visit(child, prefix)

    visit(ast.parse(source), name)
    return out


def test_no_function_is_over_80_lines() -> None:
    lengths: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lengths |= _function_lengths(path.read_text(), _module_name(path))
    long = {f: n for f, n in lengths.items() if n > MAX_FUNCTION_LINES}
    assert long == {}


def test_a_long_function_is_caught() -> None:
    source = "def short():\n    pass\n\nclass C:\n    def m(self):\n" + "".join(
        f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES)
    )
    lengths = _function_lengths(source, "mod")
    assert lengths == {"mod.short": 2, "mod.C.m": MAX_FUNCTION_LINES + 1}


#: At most this many modules at the package's top level: the head's side lives in ``cluster/``.
MAX_TOP_LEVEL_MODULES = 9
#: What the head's package holds (MLXCluster and what a person drives from the notebook).
HEAD_MODULES = {
    "life_cycle", "tools", "displays", "px", "magics", "broadcast_sender", "sync_sender",
    "pipeline_plan", "environment", "attached", "runtime_server", "farm", "sweep",
}


def test_the_top_level_is_small_and_the_heads_modules_have_a_room() -> None:
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    assert set(top) == {"__init__", "contract", "errors"}, top
    assert {p.stem for p in (PACKAGE / "cluster").glob("*.py")} - {"__init__"} == HEAD_MODULES


def test_the_deprecated_engine_module_is_gone() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import mlx_cluster_magic.engine"], capture_output=True, text=True
    )
    assert "No module named 'mlx_cluster_magic.engine'" in out.stderr


def _start_option_names() -> set[str]:
    """``start``'s options as Python names (``--no-live-status`` -> ``live_status``)."""
    from mlx_cluster_magic.cluster.magics import PARSERS

    names = set()
    for action in PARSERS["start"]._actions:
        flags = [o for o in action.option_strings if o.startswith("--")] or action.option_strings
        if not flags or flags[0] == "--help":
            continue
        name = flags[0].lstrip("-").replace("-", "_")
        names.add(name.removeprefix("no_"))
    return names


def test_start_and_mlxcluster_name_every_option_alike() -> None:
    import inspect

    from mlx_cluster_magic.cluster import MLXCluster

    params = set(inspect.signature(MLXCluster.__init__).parameters) - {"self"}
    assert _start_option_names() == params


def test_every_package_folder_is_in_the_distribution() -> None:
    import tomllib

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert found == listed


#: Modules that start, watch or stop the cluster's processes (the runtime's side).
PROCESS_OWNERS = {
    f"{PKG}.launch.processes", f"{PKG}.launch.bringup", f"{PKG}.launch.controller",
    f"{PKG}.observe.status_receiver", f"{PKG}.observe.liveness", f"{PKG}.cluster.runtime_server",
}
#: The notebook's side: the magics, %%px, what a cluster shows and does, the link to a kept
#: cluster's runtime, the views.
CLIENT_MODULES = {f"{PKG}.cluster.{m}" for m in ("magics", "px", "displays", "tools", "attached")}


def test_the_client_imports_no_process_owning_module() -> None:
    graph = _graph()
    client = CLIENT_MODULES | {m for m in graph if m.startswith(f"{PKG}.views")}
    wrong = sorted(f"{m} imports {d}" for m in client for d in graph[m] & PROCESS_OWNERS)
    assert wrong == []
    # the link to a runtime reaches none of them, however deep
    assert _transitive(f"{PKG}.cluster.attached", graph) & PROCESS_OWNERS == set()
    # the runtime's wire and record import nothing of the head's
    for module in (f"{PKG}.runtime.channel", f"{PKG}.runtime.records"):
        assert _transitive(module, graph) <= {f"{PKG}.errors"}, module

