"""What this kernel's Python environment is, file by file, for ``setup`` to copy to the hosts.

Every host must run the same interpreter and packages at the same absolute path, so nothing is
relocated: the environment's directories are copied byte for byte. They are the venv
(``sys.prefix``), the interpreter's own tree (``sys.base_prefix``) when it is self-contained
(pyenv's, uv's python-build-standalone), and the source of an editable install of this package.
A base shared with the rest of the system (``/usr``, Homebrew's, a python.org framework) cannot
be copied safely, and is refused with what to do instead. ``__pycache__`` directories are left
out both ways: a host's python writes its own, and they are checked against the sources.
No IPython import.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MLXClusterError

#: Where a host stages what it receives, inside each environment directory (same filesystem,
#: so moving a file into place is a rename); a cut leaves files only under this name.
STAGING = ".mlx_cluster_setup.partial"
#: Caches a host's python writes for itself: never sent, never removed.
SKIPPED_NAMES = ("__pycache__",)
#: Prefixes an interpreter shares with the rest of the system: its base cannot be copied.
SHARED_PREFIXES = ("/usr", "/usr/local", "/opt/homebrew", "/opt/local", "/System")


class SetupRefused(MLXClusterError):
    """A host (or this kernel's environment) cannot be set up: one line per reason, each
    naming the host and the fix."""


@dataclass(frozen=True)
class Entry:
    """One file, link or directory of an environment, as both sides list it."""

    kind: str  # "f" file, "l" symlink, "d" directory
    size: int = 0
    mtime: int = 0
    mode: int = 0  # permission bits
    target: str = ""  # a link's target

    def same_as(self, other: Entry | None) -> bool:
        """Would a host with ``other`` here need nothing sent (size, whole-second mtime,
        permissions; a link's target)?"""
        if other is None or other.kind != self.kind:
            return False
        if self.kind == "l":
            return self.target == other.target
        if self.kind == "d":
            return True
        return (self.size, self.mtime, self.mode) == (other.size, other.mtime, other.mode)


@dataclass
class Root:
    """One directory of the environment: its absolute path, why it is copied, what it holds
    (relative path -> entry), and the sub-paths that are not part of the environment."""

    path: str
    role: str  # "venv", "interpreter" or "source"
    entries: dict[str, Entry] = field(default_factory=dict)
    pruned: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries.values() if e.kind == "f")


@dataclass
class Manifest:
    """This kernel's environment, and the platform it runs on."""

    roots: list[Root]
    python: str  # the interpreter path the hosts will run
    version: str  # e.g. "3.11.7"
    system: str  # uname -s
    machine: str  # uname -m
    macos: str | None  # macOS product version, e.g. "14.4.1"
    dists: dict[str, str]  # distribution name (normalised) -> version
    notes: list[str] = field(default_factory=list)  # said once in the cell (editable carried)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.roots)

    @property
    def files(self) -> int:
        return sum(1 for r in self.roots for e in r.entries.values() if e.kind == "f")


def interpreter_refusal(base_prefix: str, prefix: str, version: str) -> str | None:
    """Why the interpreter's base cannot be copied (one line with what to do), or None."""
    base = os.path.realpath(base_prefix)
    what = None
    if ".framework/" in base + "/":
        what = "a framework build (python.org's installer or Homebrew's)"
    elif "/Cellar/" in base or base.startswith("/opt/homebrew"):
        what = "Homebrew's"
    elif base in SHARED_PREFIXES or base.startswith("/System/"):
        what = "the system's"
    if what is None:
        return None
    return (
        f"this kernel's Python ({base}) is {what}: its base lies outside the venv "
        f"({prefix}) and is shared with the rest of the system, so it cannot be copied; "
        f"make the environment with a self-contained Python of the same version "
        f"(`uv python install {version}` then `uv venv --python {version}`), install the "
        "packages there and run setup from a kernel in it"
    )


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return "-".join(name.replace("_", "-").replace(".", "-").lower().split("-"))


def installed_dists(paths: list[str] | None = None) -> dict[str, str]:
    """Every distribution the environment holds: normalised name -> version."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=paths or sys.path):
        name = dist.metadata["Name"] if dist.metadata else None
        if name and normalise(name) not in found:
            found[normalise(name)] = dist.version
    return found


def _editable_sources(prefix: str) -> tuple[list[str], list[str]]:
    """The source directories of this package's editable install (carried to the hosts), and
    one refusal per other editable distribution."""
    carried, refusals = [], []
    for dist in importlib.metadata.distributions(path=[_site_packages(prefix)]):
        text = dist.read_text("direct_url.json")
        if not text:
            continue
        try:
            info = json.loads(text)
        except json.JSONDecodeError:
            continue
        if not (info.get("dir_info") or {}).get("editable"):
            continue
        name = dist.metadata["Name"]
        module = normalise(name).replace("-", "_")
        spec = importlib.util.find_spec(module) if module == "mlx_cluster_magic" else None
        places = list(spec.submodule_search_locations or []) if spec else []
        if places and not Path(places[0]).resolve().is_relative_to(Path(prefix).resolve()):
            carried.append(str(Path(places[0]).resolve()))
            continue
        url = str(info.get("url", "")).removeprefix("file://")
        refusals.append(
            f"{name} is an editable install from {url}, whose source setup does not carry: "
            f"install it normally (`pip install --no-editable {url}`) and run setup again"
        )
    return carried, refusals


def _site_packages(prefix: str) -> str:
    v = sys.version_info
    return os.path.join(prefix, "lib", f"python{v.major}.{v.minor}", "site-packages")


def walk(path: str, pruned: tuple[str, ...] = ()) -> dict[str, Entry]:
    """Every file, link and directory under ``path`` (relative paths), caches and ``pruned``
    sub-paths left out; links are not followed."""
    out: dict[str, Entry] = {}
    skip = set(pruned)
    for top, dirs, files in os.walk(path):
        rel_top = os.path.relpath(top, path)
        rel_top = "" if rel_top == "." else rel_top + "/"
        keep = []
        for d in dirs:
            rel = rel_top + d
            if d in SKIPPED_NAMES or rel in skip or (not rel_top and d == STAGING):
                continue
            st = os.lstat(os.path.join(top, d))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = Entry("l", target=os.readlink(os.path.join(top, d)))
                continue
            out[rel] = Entry("d", mode=stat.S_IMODE(st.st_mode))
            keep.append(d)
        dirs[:] = keep
        for f in files:
            full = os.path.join(top, f)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel_top + f] = Entry("l", target=os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                out[rel_top + f] = Entry(
                    "f", st.st_size, int(st.st_mtime), stat.S_IMODE(st.st_mode)
                )
    return out


def build_manifest(
    prefix: str | None = None,
    base_prefix: str | None = None,
    python: str | None = None,
    files: bool = True,
) -> Manifest:
    """This kernel's environment (or the one given), every file listed (``files=False``: the
    directories only, to be listed by :func:`list_files` while the hosts list theirs); raises
    SetupRefused with one line per reason it cannot be copied."""
    prefix = os.path.abspath(prefix or sys.prefix)
    base = os.path.abspath(base_prefix or sys.base_prefix)
    version = ".".join(str(v) for v in sys.version_info[:3])
    refusals = []
    if os.path.realpath(base) != os.path.realpath(prefix):
        why = interpreter_refusal(base, prefix, version)
        if why:
            refusals.append(why)
    carried, editable = _editable_sources(prefix)
    refusals += editable
    if refusals:
        raise SetupRefused("\n".join(refusals))
    roots = [Root(prefix, "venv")]
    if os.path.realpath(base) != os.path.realpath(prefix):
        # The venv does not see the base's own site-packages: not part of the environment.
        v = sys.version_info
        pruned = (f"lib/python{v.major}.{v.minor}/site-packages",)
        roots.append(Root(base, "interpreter", pruned=pruned))
    notes = []
    for src in carried:
        roots.append(Root(src, "source"))
        notes.append(f"mlx_cluster_magic is an editable install: its source {src} is carried too")
    manifest = Manifest(
        roots=roots,
        python=python or sys.executable,
        version=version,
        system=platform.system(),
        machine=platform.machine(),
        macos=platform.mac_ver()[0] or None,
        dists=installed_dists([_site_packages(prefix), *carried]),
        notes=notes,
    )
    return list_files(manifest) if files else manifest


def list_files(manifest: Manifest) -> Manifest:
    """Fill in every directory's files (about 1.5 s for a 1 GB venv of 27,000 files)."""
    for root in manifest.roots:
        root.entries = walk(root.path, root.pruned)
    return manifest


def record_hashes(root: Root) -> dict[str, str]:
    """sha256 (hex) of each file of ``root`` as the distributions' RECORD files state it
    (relative to the root), so ``--verify`` need not read them here."""
    out: dict[str, str] = {}
    for rel, entry in root.entries.items():
        if entry.kind != "f" or not rel.endswith(".dist-info/RECORD"):
            continue
        site = os.path.dirname(os.path.dirname(rel))
        for line in Path(root.path, rel).read_text(errors="replace").splitlines():
            path, _, rest = line.partition(",")
            algo, _, digest = rest.partition(",")[0].partition("=")
            if algo != "sha256" or not digest:
                continue
            full = os.path.normpath(os.path.join(site, path))
            raw = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4))
            out[full] = raw.hex()
    return out


def file_hash(path: str) -> str:
    """sha256 (hex) of a file, in 1 MiB reads."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
