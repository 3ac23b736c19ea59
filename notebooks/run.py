"""Execute a notebook headless (nbclient) and print its text outputs: ``make demo`` uses this.

python notebooks/run.py notebooks/01-quickstart.ipynb [--kernel NAME] [--timeout S]
python notebooks/run.py --save notebooks/*.ipynb

Without --kernel it runs on the kernel the notebook declares, or ``python3`` where that one is
not installed. ``--save`` (``make notebooks``) writes each executed notebook back with its
outputs and the digest of the code they came from: the documentation site shows these stored
outputs, and a test checks they belong to the cells as they are now.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def kernel_for(nb: nbformat.NotebookNode) -> str:
    """The kernel the notebook declares ("Python 3 (MLX cluster)") where it is installed, else
    the plain ``python3``: the notebooks load the extension themselves, so both run them."""
    declared = nb.metadata.get("kernelspec", {}).get("name", "python3")
    try:
        KernelSpecManager().get_kernel_spec(declared)
    except NoSuchKernel:
        return "python3"
    return str(declared)


#: Where a saved notebook records which code its outputs came from.
DIGEST_KEY = "mlx_cluster_magic"


def code_digest(nb: nbformat.NotebookNode) -> str:
    """SHA-256 of the notebook's code cells, in order: stored outputs belong to these cells."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode() + b"\0")
    return h.hexdigest()


def clear_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("widgets", None)
    nb.metadata.pop(DIGEST_KEY, None)
    return nb


def save(path: Path, kernel: str | None = None, timeout: int = 600) -> None:
    """Execute ``path`` afresh and write it back with its outputs and their code's digest."""
    nb = run(path, kernel, timeout)
    nb.metadata[DIGEST_KEY] = {"outputs_of": code_digest(nb)}
    nbformat.write(nb, path)


def run(path: Path, kernel: str | None = None, timeout: int = 600) -> nbformat.NotebookNode:
    nb = clear_outputs(nbformat.read(path, as_version=4))
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel or kernel_for(nb),
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return nb


def text_outputs(nb: nbformat.NotebookNode) -> list[str]:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text.rstrip("\n"))
            elif o.output_type in ("execute_result", "display_data") and "text/plain" in o.data:
                out.append(o.data["text/plain"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", type=Path, nargs="+", metavar="notebook")
    parser.add_argument("--kernel", default=None)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument(
        "--save", action="store_true", help="write each notebook back with its outputs"
    )
    args = parser.parse_args()
    for path in args.notebooks:
        try:
            if args.save:
                save(path, args.kernel, args.timeout)
                print(f"{path}: outputs saved")
            else:
                print("\n".join(text_outputs(run(path, args.kernel, args.timeout))))
        except CellExecutionError as e:
            print(f"{path}: a cell failed:\n{e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
