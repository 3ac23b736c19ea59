"""setup's pure parts: which interpreters can be copied, the listing's parser on this machine's
real ``stat`` output, the plan (what to send, move, remove) and macOS major versions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_cluster_magic.fabric.env_manifest import (
    STAGING,
    Root,
    SetupRefused,
    build_manifest,
    interpreter_refusal,
    walk,
)
from mlx_cluster_magic.fabric.env_setup import (
    apply_script,
    listing_script,
    macos_major,
    moves,
    parse_listing,
    plan_root,
)

# Where each kind of interpreter keeps its base: Homebrew's python@3.11 formula (a framework
# inside its keg), python.org's installer, Debian's system python, pyenv and uv.
HOMEBREW = "/opt/homebrew/Cellar/python@3.11/3.11.7/Frameworks/Python.framework/Versions/3.11"
PYTHON_ORG = "/Library/Frameworks/Python.framework/Versions/3.11"


@pytest.mark.parametrize("base", [HOMEBREW, PYTHON_ORG, "/usr"])
def test_a_shared_interpreter_is_refused_in_one_line_with_what_to_do(base: str) -> None:
    why = interpreter_refusal(base, "/Users/me/venv", "3.11.7")
    assert why is not None and "\n" not in why
    assert "cannot be copied" in why and "uv python install 3.11.7" in why


def test_a_self_contained_interpreter_is_copied() -> None:
    assert interpreter_refusal("/root/.pyenv/versions/3.11.7", "/x/.venv", "3.11.7") is None
    home = "/Users/me/.local/share/uv/python/cpython-3.11.7-macos-aarch64-none"
    assert interpreter_refusal(home, "/x/.venv", "3.11.7") is None


def test_build_manifest_refuses_a_framework_base_before_listing_anything() -> None:
    with pytest.raises(SetupRefused) as e:
        build_manifest(base_prefix=PYTHON_ORG)
    assert len(str(e.value).splitlines()) == 1


def test_this_kernels_manifest() -> None:
    m = build_manifest()
    roles = {r.role: r for r in m.roots}
    assert roles["venv"].path == sys.prefix
    if os.path.realpath(sys.base_prefix) != os.path.realpath(sys.prefix):
        base = roles["interpreter"]
        assert base.pruned and not any(k.startswith(base.pruned[0]) for k in base.entries)
    assert not any("__pycache__" in k for r in m.roots for k in r.entries)
    assert m.dists["mlx-cluster-magic"]


def _tree(root: Path) -> None:
    (root / "lib" / "pkg").mkdir(parents=True)
    (root / "lib" / "pkg" / "a.py").write_text("a = 1\n")
    (root / "lib" / "pkg" / "__pycache__").mkdir()
    (root / "lib" / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"x")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "bin" / "link").symlink_to("tool")
    (root / "empty").mkdir()


def _host_listing(root: Path) -> str:
    """The listing script run here, as a host runs it (this machine's GNU find and stat)."""
    res = subprocess.run(
        ["sh", "-s", "--", "0", str(root), "-"],
        input=listing_script(),
        capture_output=True,
        text=True,
        check=True,
    )
    return res.stdout


def test_the_listing_of_a_real_tree_matches_the_heads_walk(tmp_path: Path) -> None:
    _tree(tmp_path)
    found = parse_listing("here", _host_listing(tmp_path))
    assert found.values["os"] == os.uname().sysname
    have = found.roots[str(tmp_path)]
    assert have.writable and have.free and have.free > 0
    assert have.final == walk(str(tmp_path))
    assert have.final["bin/link"].target == "tool"
    assert have.final["bin/tool"].mode == 0o755


def test_the_plan_sends_what_differs_moves_new_dirs_whole_and_removes_extras(
    tmp_path: Path,
) -> None:
    head, host = tmp_path / "head", tmp_path / "host"
    head.mkdir()
    host.mkdir()
    _tree(head)
    (host / "lib" / "pkg").mkdir(parents=True)
    (host / "lib" / "pkg" / "a.py").write_text("a = 2\n")  # same size, other mtime
    os.utime(host / "lib" / "pkg" / "a.py", (1, 1))
    (host / "lib" / "stray").mkdir()
    (host / "lib" / "stray" / "x").write_text("x")
    (host / "bin").write_text("a file where a folder belongs")
    root = Root(str(head), "venv", walk(str(head)))
    have = parse_listing("h", _host_listing(host)).roots[str(host)]
    plan = plan_root(root, have)
    assert sorted(plan.remove) == ["bin", "lib/stray"]
    assert "lib/pkg/a.py" in plan.send and "lib/pkg" not in plan.send
    assert moves(plan) == ["bin", "empty", "lib/pkg/a.py"]
    script = apply_script(plan)
    assert script.index("rm -rf -- bin") < script.index(f"mv -f -- {STAGING}/bin bin")
    assert script.rstrip().endswith(f"rm -rf -- {STAGING}")


@pytest.mark.parametrize(
    ("version", "major"), [("10.13.1", "10.13"), ("10.3", "10.3"), ("14.4.1", "14"), ("26.2", "26")]
)
def test_macos_major(version: str, major: str) -> None:
    # 10.13.1: sw_vers -productVersion as shown by scriptingosx.com; 10.3: the sw_vers(1) man
    # page's example; from Big Sur (11) on the first number alone is the major version.
    assert macos_major(version) == major


def test_the_check_table_keeps_its_columns_apart() -> None:
    """A long list of differences widens its column instead of running into the next one."""
    from mlx_cluster_magic.fabric.env_rollout import HostRow, SetupReport

    rows = [
        HostRow("mac1", "3.11.2", matching=120),
        HostRow(
            "mac2-with-a-long-name",
            "3.11.2",
            differ={"mlx": ("0.31.0", "0.32.4"), "mlx-lm": (None, "0.32.2")},
            extra=["torch"],
            to_send=812,
            bytes=912_345_678,
        ),
    ]
    report = SetupReport(rows, "3.11.2", 120, checked_only=True, elapsed=1.0)
    lines = repr(report).splitlines()
    header = next(ln for ln in lines if ln.startswith("host"))
    at = header.index("to send")
    for line in lines[lines.index(header) + 1 : lines.index(header) + 3]:
        assert line[at - 2 : at] == "  " and line[at] != " ", (header, line)
    assert "3 differ: mlx 0.31.0 (head 0.32.4), mlx-lm missing (head 0.32.2), torch" in lines[3]
    assert lines[3].endswith("812 files, 912.3 MB")
