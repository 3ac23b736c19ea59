"""Execute a notebook headless (nbclient) and print its text outputs: ``make demo`` uses this.

python notebooks/run.py notebooks/01-quickstart.ipynb [--kernel NAME] [--timeout S]

Without --kernel it runs on the kernel the notebook declares, or ``python3`` where that one is
not installed.
"""

from __future__ import annotations

import argparse
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


def run(path: Path, kernel: str | None = None, timeout: int = 600) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
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
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--kernel", default=None)
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args()
    try:
        nb = run(args.notebook, args.kernel, args.timeout)
    except CellExecutionError as e:
        print(f"{args.notebook}: a cell failed:\n{e}", file=sys.stderr)
        return 1
    print("\n".join(text_outputs(nb)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
