"""Truthful rank states on a real cluster: whatever a cell blocks in, its ranks are ``busy``;
a C call holding the GIL makes them ``unresponsive``, never ``dead``; the cluster survives."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from conftest import shared_cluster

BLOCKING = {
    # several times the old 3 s silence threshold, all in one C call holding the GIL
    "gil": "x = sum(range(300_000_000))",
    "event": "import threading\nthreading.Event().wait(3)",
    "queue": "import queue\ntry:\n    queue.Queue().get(timeout=3)\nexcept queue.Empty:\n    pass",
    "socket": (
        "import socket\na, b = socket.socketpair()\na.settimeout(3)\n"
        "try:\n    a.recv(1)\nexcept TimeoutError:\n    pass\na.close(); b.close()"
    ),
    "subprocess": "import subprocess\nsubprocess.run(['sleep', '3'], check=True)",
}


@pytest.fixture(scope="module")
def px() -> Iterator[tuple[object, object]]:
    with shared_cluster("start -n 2") as pair:
        yield pair


class Recorder(threading.Thread):
    """Records every distinct rank-state tuple the cluster reports while a cell runs."""

    def __init__(self, cluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.seen: list[tuple[str, ...]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            states = tuple(n["state"] for n in self.cluster.nodes())
            if not self.seen or self.seen[-1] != states:
                self.seen.append(states)
            self.halt.wait(0.05)


@pytest.mark.parametrize("kind", list(BLOCKING))
def test_a_blocking_cell_is_busy_never_dead_and_the_cluster_lives(px, kind) -> None:
    shell, cluster = px
    rec = Recorder(cluster)
    rec.start()
    try:
        shell.run_cell_magic("px", "--no-stream", BLOCKING[kind])
        ended = time.monotonic()
    finally:
        rec.halt.set()
        rec.join()
    assert cluster.running, f"{kind}: the cluster was stopped"
    states = {s for row in rec.seen for s in row}
    assert "dead" not in states, rec.seen
    assert "busy" in states, f"{kind}: never busy: {rec.seen}"
    if kind == "gil":
        assert "unresponsive" in states, f"GIL held but never unresponsive: {rec.seen}"
    else:  # busy from the first report of the request to its end, whatever it waits in
        first = next(i for i, row in enumerate(rec.seen) if "busy" in row)
        assert all("idle" not in row for row in rec.seen[first + 1 : -1]), rec.seen
    while any(n["state"] != "idle" for n in cluster.nodes()):
        assert time.monotonic() - ended < 1.0, cluster.nodes()
        time.sleep(0.02)
    shell.run_cell_magic("px", "", "ok = mx.distributed.all_sum(mx.array(1.0)).item()")
    assert cluster.view["ok"] == [2.0, 2.0]


def test_busy_counts_from_the_start_of_the_request(px) -> None:
    _shell, cluster = px
    ar = cluster.view.execute("import time\ntime.sleep(2.5)", block=False)
    deadline = time.monotonic() + 5
    while not all(n["state"] == "busy" for n in cluster.nodes()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    time.sleep(1.0)
    busy = [n["busy_s"] for n in cluster.nodes()]
    assert all(0.9 <= b <= 1.0 + (time.monotonic() - t0) + 0.5 for b in busy), busy
    ar.get()


def test_unresponsive_rows_say_since_when_and_that_the_process_lives(px) -> None:
    _shell, cluster = px
    ar = cluster.view.execute("x = sum(range(200_000_000))", block=False)
    deadline = time.monotonic() + 20
    row = None
    while not ar.done() and time.monotonic() < deadline:
        rows = [n for n in cluster.nodes() if n["state"] == "unresponsive"]
        if rows:
            row = rows[0]
            text = cluster._repr_mimebundle_()["text/plain"]
            break
        time.sleep(0.05)
    ar.get()
    assert row is not None, "never unresponsive"
    assert row["silent_s"] >= 2.0 and "process alive" in row["why"]
    assert "unresponsive" in text
