"""How long a Mac's owner has left its keyboard and mouse alone: macOS's HID idle time.

macOS keeps it as the ``HIDIdleTime`` property of the ``IOHIDSystem`` service, in nanoseconds
since the last key press, click or pointer move (reset by any input, kept across the display's
sleep). ``ioreg -c IOHIDSystem`` prints it inside that service's property block, drawn with the
registry tree's ``|`` margins::

    | | |   "HIDIdleTime" = 40165394

(``tests/fixtures/macos/ioreg-c-IOHIDSystem_*.txt`` is a real capture). A farm started with
``--when-idle`` asks each Mac over ssh, as its login user, and lends a Mac only while it reads at
least that long. No IPython.
"""

from __future__ import annotations

import re
import shlex
import subprocess

#: The command, as a login shell on the Mac finds it (``/usr/sbin`` is on macOS's default PATH).
IOREG_COMMAND = "ioreg -c IOHIDSystem"
#: Seconds an ssh reading may take before the Mac counts as unread (its owner's state unknown).
READ_TIMEOUT_S = 8.0

_IDLE = re.compile(r'"HIDIdleTime"\s*=\s*(\d+)')


def parse_idle_seconds(text: str) -> float | None:
    """Seconds since the owner last touched keyboard or mouse, from ``ioreg -c IOHIDSystem``'s
    output; None when no ``HIDIdleTime`` is in it. A Mac with several HID systems (rare) has
    been idle for the shortest of them."""
    found = [int(m.group(1)) for m in _IDLE.finditer(text)]
    return min(found) / 1e9 if found else None


def read_idle_seconds(host: str, ssh: str | None, local: bool = False) -> float | None:
    """``host``'s HID idle time, read over ssh (here when ``local``); None when it could not be
    read (no answer, no ``ioreg``, or output without the property): the farm then counts the
    Mac as in use by its owner."""
    argv = shlex.split(IOREG_COMMAND)
    if not local:
        argv = [
            *shlex.split(ssh or "ssh"),
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=3",
            host,
            IOREG_COMMAND,
        ]  # fmt: skip
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=READ_TIMEOUT_S, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_idle_seconds(out)


def parse_duration(text: str) -> float:
    """``5m``, ``90s``, ``1h``, ``30`` (seconds) -> seconds; ``ValueError`` naming the form."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a duration: give seconds or 90s, 5m, 1h")
    value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if value <= 0:
        raise ValueError(f"{text!r}: the idle time must be more than zero")
    return value
