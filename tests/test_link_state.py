"""The link state a rank reports, and the cable the head names from it: macOS's ``ifconfig``
on real captured output, Linux's carrier on this machine."""

from __future__ import annotations

import re
from pathlib import Path

from mlx_cluster_magic.rank.link_state import LinkWatch, ifconfig_inactive

FIXTURES = Path(__file__).parent / "fixtures" / "macos"
#: Captured ``ifconfig -a`` of a MacBook Pro (macOS 14.5); its source is in fixtures/macos/README.
CAPTURE = FIXTURES / "ifconfig-a_macbook-pro-m1-pro-2021_macos-14.5.txt"


def interfaces(text: str) -> dict[str, str]:
    """``ifconfig -a`` split into each interface's own output, as ``ifconfig IFACE`` prints it."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"^([a-z0-9]+): flags=", line)
        if m:
            name = m.group(1)
        if name:
            out[name] = out.get(name, "") + line + "\n"
    return out


def test_macos_status_inactive_is_a_link_down_and_active_is_not() -> None:
    found = interfaces(CAPTURE.read_text())
    assert not ifconfig_inactive(found["en0"])  # Wi-Fi, "status: active"
    assert ifconfig_inactive(found["en1"])  # a Thunderbolt port with no cable
    assert ifconfig_inactive(found["en5"])
    # flags keep RUNNING with no cable: the flags cannot tell, only the status line
    assert "RUNNING" in found["en1"].splitlines()[0]
    assert not ifconfig_inactive(found["lo0"])  # no status line at all: not down


def test_linux_watch_sees_this_machines_links_and_none_down() -> None:
    watch = LinkWatch()
    assert "lo" not in watch.watched
    assert all("/" in cidr for cidr in watch.watched.values())
    assert watch.down() == []
