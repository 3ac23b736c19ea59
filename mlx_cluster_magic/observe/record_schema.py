"""What a status record may hold, checked before the head keeps any of it.

The status channel listens on the network (the control address), and its token travels with
every record: whoever can send to it, or has seen one record, may send anything. So the head
checks a message's size and nesting before it parses it (``nesting_ok``: no ``RecursionError``,
no deep C recursion on a thread's small stack), and every field's type and range after
(``checked``): a record with one wrong field is dropped whole, a field nobody sends is left
out. What the sidecar sends (``rank.status_sidecar``, ``rank.host_usage``,
``rank.flight_recorder``) is described here once. Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..rank.host_usage import HOST_FIELDS, RANK_FIELDS

#: Deepest nesting of lists and objects a record may have (the sidecar's is 5).
MAX_DEPTH = 12
#: Longest text in any field (host names, devices, code lines, file paths).
MAX_TEXT = 4096
#: Largest integer a count, a size or an id may be (a process's bytes, requests, pids).
MAX_INT = 1 << 62
#: Largest magnitude of a real number (seconds, percentages, watts).
MAX_REAL = 1e15
#: Longest list (a message's metric points, the recorder's recent collectives).
MAX_ITEMS = 10_000

Check = Callable[[Any], Any]


class BadField(ValueError):
    """A field of the wrong type or out of range: the record is dropped."""


# Backslash pairs, then escaped quotes: what is left of a quote delimits a string.
_BRACKETS_ONLY = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STRING = re.compile(rb'"[^"]*"')


def nesting_ok(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``raw``'s lists and objects (outside strings) nest at most ``limit`` deep and
    balance; anything else is refused before ``json.loads`` sees it. Linear in C: escapes and
    strings are cut out, then the innermost pairs removed ``limit`` times."""
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    text = _STRING.sub(b"", text).translate(_BRACKETS_ONLY, _NOT_BRACKETS)
    for _ in range(limit):
        shorter = text.replace(b"[]", b"")
        if shorter == text:
            break
        text = shorter
    return not text


def _integer(lo: int = 0, hi: int = MAX_INT) -> Check:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise BadField(v)
        return v

    return check


def _real(lo: float = -MAX_REAL, hi: float = MAX_REAL, finite: bool = True) -> Check:
    """A number in [lo, hi]; with ``finite=False`` also NaN and the infinities (a loss that
    diverged is still a loss to show)."""

    def check(v: Any) -> float:
        if type(v) not in (int, float):
            raise BadField(v)
        if not (lo <= v <= hi if math.isfinite(v) else not finite):
            raise BadField(v)
        return v  # type: ignore[no-any-return]

    return check


def _text(limit: int = MAX_TEXT, pattern: str | None = None) -> Check:
    shape = re.compile(pattern) if pattern else None

    def check(v: Any) -> str:
        if type(v) is not str or len(v) > limit or (shape and not shape.fullmatch(v)):
            raise BadField(v)
        return v

    return check


def _flag(v: Any) -> bool:
    if type(v) is not bool:
        raise BadField(v)
    return v


def _optional(inner: Check) -> Check:
    return lambda v: None if v is None else inner(v)


def _one_of(*values: str) -> Check:
    def check(v: Any) -> str:
        if v not in values:
            raise BadField(v)
        return str(v)

    return check


def _items(inner: Check, limit: int = MAX_ITEMS) -> Check:
    def check(v: Any) -> list[Any]:
        if type(v) is not list or len(v) > limit:
            raise BadField(v)
        return [inner(x) for x in v]

    return check


def _tuple(*parts: Check) -> Check:
    def check(v: Any) -> list[Any]:
        if type(v) is not list or len(v) != len(parts):
            raise BadField(v)
        return [p(x) for p, x in zip(parts, v)]

    return check


def _mapping(key: Check, value: Check, limit: int = 256) -> Check:
    def check(v: Any) -> dict[Any, Any]:
        if type(v) is not dict or len(v) > limit:
            raise BadField(v)
        return {key(k): value(x) for k, x in v.items()}

    return check


def _fields(spec: Mapping[str, Check]) -> Check:
    """An object with these fields (each optional); others are left out."""

    def check(v: Any) -> dict[str, Any]:
        if type(v) is not dict:
            raise BadField(v)
        return {k: spec[k](x) for k, x in v.items() if k in spec}

    return check


def _scalar(v: Any) -> Any:
    if v is None or type(v) is bool:
        return v
    return _text()(v) if type(v) is str else _real()(v)


_COLLECTIVE = _fields(
    {
        "i": _integer(),
        "group": _text(256),
        "seq": _integer(),
        "op": _text(64),
        "shape": _items(_integer(), 64),
        "dtype": _text(64),
        "peer": _optional(_integer()),
        "file": _text(),
        "line": _optional(_integer()),
        "where": _text(),
        "cell": _flag,
        "t": _optional(_real()),
    }
)

_WHERE = _fields(
    {
        "file": _text(),
        "line": _optional(_integer()),
        "func": _text(256),
        "where": _text(),
        "cell": _flag,
        "text": _text(),
        "call": _text(256),
        "innermost": _text(),
    }
)

_RECORDER = _fields(
    {
        "v": _integer(),
        "rank": _integer(),
        "installed": _flag,
        "count": _integer(),
        "seq": _mapping(_text(256), _integer()),
        "recent": _items(_COLLECTIVE, 256),
        "pending": _integer(-MAX_INT),
        "busy": _flag,
        "evaluating": _flag,
        "blocked": _optional(_COLLECTIVE),
        "blocked_s": _real(0.0),
        "where": _optional(_WHERE),
        "main_thread": _text(32, "0x[0-9a-fA-F]{1,30}"),
        "stack_file": _optional(_text()),
        "checks": _mapping(_text(64), _scalar, 16),
        "pid": _integer(),
    }
)

#: One metric point: (name, value, step or None, time).
_POINT = _tuple(_text(256), _real(finite=False), _optional(_real()), _real())

#: Every field a record or a notice may carry, and what it must be.
RECORD: dict[str, Check] = {
    "rank": _integer(),
    "host": _text(255),
    "pid": _integer(1),
    "time": _real(),
    "state": _one_of("busy", "idle"),
    "busy_s": _real(0.0),
    "requests": _integer(0, 1 << 53),
    "rss_bytes": _integer(),
    "mlx_active_bytes": _integer(),
    "mlx_peak_bytes": _integer(),
    "device": _text(256),
    "metrics": _items(_POINT),
    "recorder": _optional(_RECORDER),
    "links_down": _items(_tuple(_text(64), _text(64)), 256),
    "samples_host": _flag,
    "usage_hint": _text(256),
    **{name: _real() for name in (*HOST_FIELDS, *RANK_FIELDS)},
}


def checked(msg: Any) -> dict[str, Any]:
    """The record's fields the head keeps (``token`` left out: it was checked already);
    raises ``BadField`` for a record that is not an object or has a field of the wrong type,
    so it is dropped whole."""
    if type(msg) is not dict:
        raise BadField(msg)
    return {k: RECORD[k](v) for k, v in msg.items() if k in RECORD}
