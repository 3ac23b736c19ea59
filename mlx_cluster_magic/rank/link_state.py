"""Rank side: which of this host's network interfaces lost their link since the rank started.

A cable pulled between two Macs leaves both hosts reporting (the management network is up)
while a collective waits on the cable forever. The link state on either end is the evidence:

- Linux: ``/sys/class/net/<iface>/carrier`` reads ``0`` (or cannot be read: the interface is
  administratively down), as the kernel documents in ``Documentation/ABI/testing/sysfs-class-net``.
- macOS: ``ifconfig <iface>`` prints ``status: inactive`` (captured real output:
  ``tests/fixtures/macos/ifconfig-a_*.txt``). Its flags keep ``RUNNING`` with no cable, so
  psutil's ``isup`` cannot tell.

Only interfaces that had an IPv4 address and a link when the rank started are watched; the
head decides which of them are cables of the cluster.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time
from pathlib import Path

#: On macOS ``ifconfig`` runs at most this often (a process per look).
MACOS_EVERY_S = 2.0


def ifconfig_inactive(output: str) -> bool:
    """Whether one interface's ``ifconfig`` output says its link is down."""
    return any(line.strip() == "status: inactive" for line in output.splitlines())


def _has_link(iface: str) -> bool:
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["/sbin/ifconfig", iface], capture_output=True, text=True, timeout=2
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return True  # no evidence either way
        return bool(out) and not ifconfig_inactive(out)
    try:
        return Path(f"/sys/class/net/{iface}/carrier").read_text().strip() == "1"
    except OSError:  # EINVAL when the interface is down, ENOENT when it is gone
        return False


class LinkWatch:
    """The interfaces worth watching, chosen at start, and which of them are down now."""

    def __init__(self) -> None:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        self.watched: dict[str, str] = {}  # iface -> address/prefix
        for iface, addrs in psutil.net_if_addrs().items():
            for a in addrs:
                if a.family != socket.AF_INET or not a.netmask:
                    continue
                address = ipaddress.ip_interface(f"{a.address}/{a.netmask}")
                if not address.is_loopback:
                    self.watched[iface] = str(address)
        self.watched = {i: a for i, a in self.watched.items() if _has_link(i)}
        self._last: list[list[str]] = []
        self._at = 0.0

    def down(self) -> list[list[str]]:
        """``[iface, address/prefix]`` for each watched interface without a link now."""
        now = time.monotonic()
        if sys.platform == "darwin" and now - self._at < MACOS_EVERY_S:
            return self._last
        self._at = now
        self._last = [[i, a] for i, a in self.watched.items() if not _has_link(i)]
        return self._last
