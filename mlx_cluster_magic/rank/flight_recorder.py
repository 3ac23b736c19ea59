"""The collective flight recorder: what every rank issued through ``mx.distributed``, always on.

``install()`` replaces the collectives in ``mlx.core.distributed`` (all_sum, all_gather, all_max,
all_min, sum_scatter, send, recv, recv_like) with thin wrappers that append one tuple to a
bounded ring buffer: a sequence number per group (per peer pair for send/recv), op, shape,
dtype, peer, the calling file and line, and the time. ``nn.average_gradients``, MLX's sharded
layers and mlx-lm look the functions up as ``mx.distributed.<op>`` when they run, so their
collectives are recorded too (the line recorded is the first frame outside MLX and
site-packages: the user's cell line). Inside ``mx.compile`` a collective is recorded when the
function is traced, not on each call.

What "blocked in a collective" means with lazy arrays: a collective only *runs* when something
evaluates its output (``mx.eval``, ``.item()``, ``print``, NumPy conversion ...), and MLX runs
it without the GIL, so the status thread can look at the main thread meanwhile. A rank is
*evaluating* when its main thread sits in such a call: ``snapshot()`` reads the call from the
main thread's innermost frame (the call expression at its bytecode offset, from the source).
Its *pending* collectives are those issued since it was last idle; the one it is *blocked* in
is taken as the latest of them. That is exact for ``all_sum(x).item()``; when one evaluation
covers many collectives (``nn.average_gradients`` then ``mx.eval``), the head's analysis picks
the exact one by comparing the ranks' sequence numbers. ``install(track_evaluation=True)``
also wraps ``mx.eval`` and the array methods that evaluate, which settles collectives as each
evaluation returns (more precise on one rank alone, at the cost of one more Python call per
evaluation; off by default).

``snapshot()`` is cheap and thread-safe: the status thread calls it twice a second while the
main thread runs a cell. No IPython import.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..contract import is_cell, location

#: How many records each rank keeps.
RING_SIZE = 256
#: How many recent records a snapshot carries.
RECENT = 16

COLLECTIVES = ("all_sum", "all_gather", "all_max", "all_min", "sum_scatter")
POINT_TO_POINT = ("send", "recv", "recv_like")
_ARRAY_EVALS = ("item", "tolist", "__repr__", "__float__", "__int__", "__bool__")

# One record: (index, group key, seq, op, shape, dtype, peer, code, bytecode offset, wall time).
# The line is worked out from (code, offset) only when a snapshot shows the record: computing
# ``f_lineno`` on every call would cost more than the rest of the record.
Record = tuple[int, str, int, str, Any, Any, "int | None", Any, int, float]

_ring: collections.deque[Record] = collections.deque(maxlen=RING_SIZE)
_seqs: dict[str, int] = {}
_count = 0  # records issued so far (the index of the latest)
_settled = 0  # records issued before the last evaluation that returned
_evaluating = -1  # while the main thread evaluates: _count when it began; else -1
_world_size = 1
_rank = 0
_originals: dict[tuple[Any, str], Any] = {}
_library: dict[str, bool] = {}
_lib_roots: tuple[str, ...] = ()
_blocked_seen: tuple[int, float] = (0, 0.0)
_tracking = False

#: Called before each collective runs with the new record (set by ``checks.enable``).
before_collective: Callable[[Record], None] | None = None
#: Whether checked collectives are on, and their timeout (set by ``checks``).
checks_info: dict[str, Any] = {"enabled": False}


def installed() -> bool:
    return bool(_originals)


def _is_library(filename: str) -> bool:
    lib = _library.get(filename)
    if lib is None:
        lib = (
            filename.startswith(_lib_roots)
            or "site-packages" in filename
            or (filename.startswith("<frozen"))
        )
        _library[filename] = lib
    return lib


def _caller(f: Any) -> tuple[Any, int]:
    """From frame ``f`` up, the first frame outside MLX, this package, the standard library
    and site-packages (the user's line); ``f`` itself when every frame is library code."""
    first = f
    while f is not None and _is_library(f.f_code.co_filename):
        f = f.f_back
    if f is None:
        f = first
    return f.f_code, f.f_lasti


_lines: dict[tuple[Any, int], int] = {}


def _line(code: Any, offset: int) -> int:
    """The source line of bytecode ``offset`` in ``code``."""
    line = _lines.get((code, offset))
    if line is None:
        line = code.co_firstlineno
        for start, end, ln in code.co_lines():
            if start <= offset < end:
                line = ln if ln is not None else line
                break
        if len(_lines) > 4096:
            _lines.clear()
        _lines[(code, offset)] = line
    return line


def _group_key(group: Any) -> str:
    if group is None:
        return "world"
    size = group.size()
    return "world" if size == _world_size else f"g{size}"


def _record(op: str, shape: Any, dtype: Any, group: Any, peer: int | None) -> Record:
    global _count
    __tracebackhide__ = True
    key = _group_key(group)
    if peer is not None:
        me = _rank if group is None else group.rank()
        key = f"{key}:{me}>{peer}" if op == "send" else f"{key}:{peer}>{me}"
    seq = _seqs.get(key, 0) + 1
    _seqs[key] = seq
    code, offset = _caller(sys._getframe(2))
    _count += 1
    rec: Record = (_count, key, seq, op, shape, dtype, peer, code, offset, time.time())
    _ring.append(rec)
    check = before_collective
    if check is not None:
        check(rec)
    return rec


def _wrapping(wrapper: Any, orig: Any) -> Any:
    """``wrapper`` with ``orig``'s docstring, and ``orig`` as its ``__wrapped__`` (``help()``
    and ``inspect`` show MLX's own function)."""
    wrapper.__doc__ = orig.__doc__
    wrapper.__wrapped__ = orig
    return wrapper


def _make_collective(op: str, orig: Any) -> Any:
    # The hot path, inlined: this costs well under a microsecond per call.
    ring_append, getframe, now, seqs, library = (
        _ring.append,
        sys._getframe,
        time.time,
        _seqs,
        _library,
    )

    def collective(x: Any, *, group: Any = None, stream: Any = None) -> Any:
        global _count
        __tracebackhide__ = True  # IPython shows the user's line, not this wrapper
        key = "world" if group is None else _group_key(group)
        seq = seqs[key] = seqs.get(key, 0) + 1
        f = getframe(1)
        code = f.f_code
        if library.get(code.co_filename, True):
            code, offset = _caller(f)
        else:
            offset = f.f_lasti
        try:
            shape, dtype = x.shape, x.dtype
        except AttributeError:  # MLX also takes Python scalars
            shape, dtype = (), None
        _count += 1
        rec = (_count, key, seq, op, shape, dtype, None, code, offset, now())
        ring_append(rec)
        if before_collective is not None:
            before_collective(rec)
        return orig(x, group=group, stream=stream)

    collective.__name__ = collective.__qualname__ = op
    return _wrapping(collective, orig)


def _make_send(orig: Any) -> Any:
    def send(x: Any, dst: int, *, group: Any = None, stream: Any = None) -> Any:
        __tracebackhide__ = True
        _record("send", getattr(x, "shape", ()), getattr(x, "dtype", None), group, dst)
        return orig(x, dst, group=group, stream=stream)

    return _wrapping(send, orig)


def _make_recv(orig: Any) -> Any:
    def recv(shape: Any, dtype: Any, src: int, *, group: Any = None, stream: Any = None) -> Any:
        __tracebackhide__ = True
        _record("recv", tuple(shape), dtype, group, src)
        return orig(shape, dtype, src, group=group, stream=stream)

    return _wrapping(recv, orig)


def _make_recv_like(orig: Any) -> Any:
    def recv_like(x: Any, src: int, *, group: Any = None, stream: Any = None) -> Any:
        __tracebackhide__ = True
        _record("recv_like", getattr(x, "shape", ()), getattr(x, "dtype", None), group, src)
        return orig(x, src, group=group, stream=stream)

    return _wrapping(recv_like, orig)


def _make_eval(orig: Any) -> Any:
    def evaluate(*args: Any, **kwargs: Any) -> Any:
        global _evaluating, _settled
        start = _count
        _evaluating = start
        try:
            return orig(*args, **kwargs)
        finally:
            _evaluating = -1
            if start > _settled:
                _settled = start

    evaluate.__name__ = evaluate.__qualname__ = getattr(orig, "__name__", "eval")
    return _wrapping(evaluate, orig)


def tracking_evaluation() -> bool:
    return _tracking


def install(group: Any = None, track_evaluation: bool = False) -> None:
    """Record every collective issued through ``mx.distributed`` on this rank; idempotent.

    ``group`` is the world group (``mx.distributed.init()`` by default): its size tells the
    world apart from subgroups and its rank names this rank in send/recv records.
    """
    global _world_size, _rank, _lib_roots, _tracking, _settled
    if _originals:
        return
    _settled = _count
    import mlx.core as mx

    world = group if group is not None else mx.distributed.init()
    _world_size, _rank = world.size(), world.rank()
    here = os.path.dirname(os.path.abspath(__file__))
    mlx_dir = os.path.dirname(os.path.dirname(os.path.abspath(mx.__file__)))
    stdlib = os.path.dirname(os.__file__) + os.sep
    _lib_roots = (here + os.sep, os.path.join(mlx_dir, "mlx") + os.sep, stdlib)
    _library.clear()
    dist = mx.distributed
    wrappers: dict[str, Any] = {op: _make_collective(op, getattr(dist, op)) for op in COLLECTIVES}
    wrappers["send"] = _make_send(dist.send)
    wrappers["recv"] = _make_recv(dist.recv)
    wrappers["recv_like"] = _make_recv_like(dist.recv_like)
    for name, fn in wrappers.items():
        _originals[(dist, name)] = getattr(dist, name)
        setattr(dist, name, fn)
    _tracking = track_evaluation
    if not track_evaluation:
        return
    _originals[(mx, "eval")] = mx.eval
    mx.eval = _make_eval(mx.eval)
    for name in _ARRAY_EVALS:
        orig = getattr(mx.array, name)
        _originals[(mx.array, name)] = orig
        setattr(mx.array, name, _make_eval(orig))


def uninstall() -> None:
    """Put MLX's own functions back (benchmarks compare with and without)."""
    global _tracking
    for (owner, name), orig in _originals.items():
        setattr(owner, name, orig)
    _originals.clear()
    _tracking = False


def reset() -> None:
    """Forget every record and sequence number (a fresh cluster starts from zero)."""
    global _count, _settled, _evaluating
    _ring.clear()
    _seqs.clear()
    _count = _settled = 0
    _evaluating = -1


def advance(key: str, seq: int) -> None:
    """Mark ``seq`` of ``key`` as used without issuing it: the other ranks gave up on a
    collective this rank never reached, so its next one must carry the next number."""
    if _seqs.get(key, 0) < seq:
        _seqs[key] = seq


def next_seq(key: str) -> int:
    return _seqs.get(key, 0) + 1


def rank() -> int:
    return _rank


def world_size() -> int:
    return _world_size


# ----------------------------------------------------------------------------- snapshot
def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1] if dtype is not None else "?"


def site(code: Any, line: int) -> str:
    """``cell line 18 in step()``, or ``cell line 3`` for a cell's top level."""
    where = location(code.co_filename, line)
    name = code.co_name
    return where if name.startswith("<") else f"{where} in {name}()"


def as_dict(rec: Record) -> dict[str, Any]:
    """One record as JSON-able data."""
    index, key, seq, op, shape, dtype, peer, code, offset, t = rec
    file, line = code.co_filename, _line(code, offset)
    return {
        "i": index,
        "group": key,
        "seq": seq,
        "op": op,
        "shape": [int(s) for s in shape],
        "dtype": _dtype_name(dtype),
        "peer": peer,
        "file": file,
        "line": line,
        "where": site(code, line),
        "cell": is_cell(file),
        "t": t,
    }


#: Calls that evaluate MLX arrays (and so run the collectives in their graphs).
EVAL_CALLS = frozenset(
    {
        "eval",
        "mx.eval",
        "item",
        "tolist",
        "print",
        "float",
        "int",
        "bool",
        "str",
        "repr",
        "format",
        "array",
        "np.array",
        "asarray",
        "np.asarray",
        "synchronize",
        "mx.synchronize",
        "save",
        "savez",
        "save_safetensors",
        "display",
    }
)
_IDLE_FUNCS = frozenset({"select", "poll", "_poll", "_run_once", "wait"})
_calls: dict[tuple[Any, int], str] = {}


def _is_idle(frame: Any) -> bool:
    """The main thread waits for work in the kernel's event loop."""
    code = frame.f_code
    return code.co_name in _IDLE_FUNCS and (
        code.co_filename.endswith(("selectors.py", "base_events.py", "threading.py"))
        or "zmq" in code.co_filename
        or "tornado" in code.co_filename
    )


def call_name(code: Any, offset: int) -> str:
    """What the call at bytecode ``offset`` calls, from its source: ``time.sleep``,
    ``mx.eval``, ``item``; "" when the source is not available."""
    key = (code, offset)
    name = _calls.get(key)
    if name is not None:
        return name
    import ast
    import linecache

    name = ""
    try:
        positions = list(code.co_positions())[offset // 2]
        first, last, col, end_col = positions
        lines = [linecache.getline(code.co_filename, n) for n in range(first, last + 1)]
        if lines and all(lines) and col is not None and end_col is not None:
            lines[-1] = lines[-1][:end_col]
            lines[0] = lines[0][col:]
            node = ast.parse("".join(lines).strip(), mode="eval").body
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Attribute):
                    inner = func.value
                    name = f"{inner.id}.{func.attr}" if isinstance(inner, ast.Name) else func.attr
                elif isinstance(func, ast.Name):
                    name = func.id
    except (SyntaxError, ValueError, IndexError, TypeError):
        name = ""
    if len(_calls) > 4096:
        _calls.clear()
    _calls[key] = name
    return name


def _main_where(frame: Any) -> dict[str, Any]:
    """Where the main thread is: its innermost frame outside library code, and what the
    innermost frame calls."""
    import linecache

    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back  # called by the main thread itself
    innermost = frame
    f: Any = frame
    while f is not None and _is_library(f.f_code.co_filename):
        f = f.f_back
    if f is None:
        f = innermost
    file, line = f.f_code.co_filename, f.f_lineno
    text = linecache.getline(file, line).strip() if line else ""
    call = call_name(innermost.f_code, innermost.f_lasti)
    inner_where = location(innermost.f_code.co_filename, innermost.f_lineno)
    return {
        "file": file,
        "line": line,
        "func": f.f_code.co_name,
        "where": site(f.f_code, line),
        "cell": is_cell(file),
        "text": text[:120],
        "call": call,
        "innermost": f"{innermost.f_code.co_name} ({inner_where})",
    }


def snapshot(recent: int = RECENT, busy: bool | None = None) -> dict[str, Any]:
    """This rank's recorder state as small JSON-able data (safe from any thread).

    ``busy``: the main thread runs a request; ``evaluating``: it is inside an evaluation
    (tracked, or seen from its call site: ``mx.eval``, ``.item()``, ``print`` ...);
    ``blocked``: the collective it waits in, with ``blocked_s``, how long the status thread has
    seen it there; ``pending``: how many collectives were issued since the rank was last idle
    (or, when evaluations are tracked, not yet settled by one); ``where``: its current line.
    ``busy`` may be given by the caller (the engine's request hooks know it); else it is read
    from the main thread's stack. About 50 us; 4 KB of JSON with 16 records.
    """
    global _blocked_seen, _settled
    from . import stack_dump

    records = _ring.copy()
    count, evaluating = _count, _evaluating
    seqs = dict(_seqs)
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    if busy is None:
        busy = frame is not None and not _is_idle(frame)
    if not busy and not tracking_evaluation():
        _settled = count
    settled = _settled
    where = _main_where(frame) if busy and frame is not None else None
    first: Record | None = None
    if evaluating > settled:
        first = next((r for r in records if settled < r[0] <= evaluating), None)
    elif where is not None and where["call"] in EVAL_CALLS and records and records[-1][0] > settled:
        first = records[-1]
    blocked, blocked_s = None, 0.0
    if first is not None:
        blocked = as_dict(first)
        now = time.monotonic()
        if _blocked_seen[0] != first[0]:
            _blocked_seen = (first[0], now)
        blocked_s = now - _blocked_seen[1]
    else:
        _blocked_seen = (0, 0.0)
    return {
        "v": 1,
        "rank": _rank,
        "installed": installed(),
        "count": count,
        "seq": seqs,
        "recent": [as_dict(r) for r in list(records)[-recent:]],
        "pending": count - settled,
        "busy": busy,
        "evaluating": evaluating >= 0 or (where is not None and where["call"] in EVAL_CALLS),
        "blocked": blocked,
        "blocked_s": blocked_s,
        "where": where,
        "main_thread": f"0x{threading.main_thread().ident or 0:016x}",
        "stack_file": stack_dump.STACK_FILE,
        "checks": dict(checks_info),
        "pid": os.getpid(),
    }
