"""Every example notebook executes on 2 local ranks; the kernel spec pre-loads the extension."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def execute(nb: nbformat.NotebookNode, kernel: str, cwd: Path) -> nbformat.NotebookNode:
    NotebookClient(
        nb, timeout=600, kernel_name=kernel, resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                parts.append(o.text)
            elif "data" in o and "text/plain" in o.data:
                parts.append(o.data["text/plain"])
    return "\n".join(parts)


def _runner() -> Any:
    """notebooks/run.py, which ``make demo`` and ``make notebooks`` run."""
    spec = importlib.util.spec_from_file_location("notebook_runner", NOTEBOOKS[0].parent / "run.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_outputs_are_those_of_the_cells_as_they_are(path: Path) -> None:
    """The site shows the outputs stored in the repository: every code cell ran, and the code
    is the code they came from (``make notebooks`` runs them again after a change)."""
    nb = nbformat.read(path, as_version=4)
    runner = _runner()
    stored = nb.metadata.get(runner.DIGEST_KEY, {}).get("outputs_of")
    assert stored == runner.code_digest(nb), (
        f"{path.name}: its code changed after its outputs were made: run make notebooks"
    )
    unrun = [c.source[:40] for c in nb.cells if c.cell_type == "code" and not c.execution_count]
    assert unrun == [], f"{path.name}: cells without outputs: {unrun}; run make notebooks"


#: Each example notebook is executed once per session; every test reads its outputs from here.
_EXECUTED: dict[Path, nbformat.NotebookNode] = {}


def executed(path: Path) -> nbformat.NotebookNode:
    if path not in _EXECUTED:
        nb = _runner().clear_outputs(nbformat.read(path, as_version=4))
        _EXECUTED[path] = execute(nb, "python3", path.parent)
    return _EXECUTED[path]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, no_leaks: None) -> None:
    nb = executed(path)
    # a cell tagged raises-exception shows a deliberate failure (notebook 05): it must fail,
    # and no other cell may
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        errors = [o.get("ename", "") for o in c.get("outputs", []) if o.output_type == "error"]
        if "raises-exception" in c.get("metadata", {}).get("tags", []):
            assert errors, f"{path.name}: a cell meant to fail did not:\n{c.source}"
        else:
            assert not errors, f"{path.name}: {errors} in\n{c.source}"


def test_quickstart_prints_the_collective_result(no_leaks: None) -> None:
    path = next(p for p in NOTEBOOKS if p.stem == "01-quickstart")
    text = outputs_text(executed(path))
    assert "rank 0 of 2: all_sum = [3.0, 3.0, 3.0, 3.0]" in text
    assert "rank 1 of 2: all_sum = [3.0, 3.0, 3.0, 3.0]" in text
    assert "identical on 2/2 ranks" in text


def test_kernel_spec_is_installed_and_preloads_the_extension(
    tmp_path: Path, no_leaks: None
) -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "jupyter_client.kernelspecapp", "list", "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    specs = json.loads(listing.stdout)["kernelspecs"]
    assert "mlx-cluster" in specs
    assert specs["mlx-cluster"]["spec"]["display_name"] == "Python 3 (MLX cluster)"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("c = %mlx_cluster start -n 2"),  # no %load_ext
        nbformat.v4.new_code_cell(
            "%%px\nv = mx.distributed.all_sum(mx.array(world.rank() + 1)).item()"
        ),
        nbformat.v4.new_code_cell("print('SUM', c.view['v'])"),
        nbformat.v4.new_code_cell("%mlx_cluster stop"),
    ]
    assert "SUM [3, 3]" in outputs_text(execute(nb, "mlx-cluster", tmp_path))
