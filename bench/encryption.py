"""What encrypting and authenticating the control traffic costs, side by side in one run: the
``%%px pass`` round trip with ipyparallel's sockets on CurveZMQ (the default) against the same
cluster with it off; a request's start and end notices with their HMAC against the same
datagrams bare; a status record over the CurveZMQ channel against a plain PUSH socket.

    python bench/encryption.py [reps]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from typing import Any

import benchlib
from benchlib import compare, median_interval

ROUNDS = 300  # %%px pass rounds per repetition (one call on each cluster)
NOTICES = 20_000  # notice pairs per repetition
RECORDS = 5_000  # status records per repetition


def _px_rounds(shell: Any, reps: int) -> tuple[list[float], list[float], list[float]]:
    """Two live clusters of 2 local ranks, CurveZMQ on and off, their ``%%px pass`` alternated
    round by round (noise hits both alike): per-run medians of each, and per-round ratios."""
    from mlx_cluster_magic import MLXCluster
    from mlx_cluster_magic.cluster.px import MLXParallelMagics

    clusters = []
    for encrypt in (True, False):
        cluster = MLXCluster(n=2)
        cluster.spec = dataclasses.replace(cluster.spec, encrypt=encrypt)
        clusters.append(cluster.start())
    on_t: list[float] = []
    off_t: list[float] = []
    ratios: list[float] = []
    try:
        on, off = (MLXParallelMagics(shell, c.view, c) for c in clusters)
        for f in (on, off):
            for _ in range(20):  # warm-up
                f.cell_px("", "pass")
        for _ in range(max(reps, 1)):
            o: list[float] = []
            b: list[float] = []
            for i in range(ROUNDS):
                for mine, f in (
                    ((True, on), (False, off)) if i % 2 == 0 else ((False, off), (True, on))
                ):
                    t = time.perf_counter()
                    f.cell_px("", "pass")
                    (o if mine else b).append((time.perf_counter() - t) * 1e3)
                ratios.append(o[-1] / b[-1])
            on_t.append(statistics.median(o))
            off_t.append(statistics.median(b))
    finally:
        for c in clusters:
            c.stop()
    return on_t, off_t, ratios


def _notices(receiver: Any, signed: bool) -> float:
    """Microseconds per start+end notice pair sent as ``Activity`` sends them (its bytes, its
    connected socket), with the HMAC that opens each (ours) or bare (as before); the same loop
    otherwise, so the difference is the MAC."""
    import hmac

    from mlx_cluster_magic.rank.status_sidecar import Activity

    activity = Activity()
    activity.connect(receiver.credentials, 0)
    udp, key = activity._udp, activity._mac_key
    assert udp is not None
    prefix = activity._prefix
    t = time.perf_counter()
    for i in range(NOTICES):
        for state in (b"busy", b"idle"):
            notice = b'%s, "state": "%s", "requests": %d}' % (prefix, state, i)
            if signed:
                notice = hmac.digest(key, notice, "sha256") + notice
            udp.send(notice)
    elapsed = time.perf_counter() - t
    udp.close()
    receiver.nodes()  # drain
    return elapsed / NOTICES * 1e6


def _records(curve: bool) -> float:
    """Microseconds per 2 KiB status record sent and received, over CurveZMQ (as the sidecar's
    ``curve_push`` sets it up) or a plain PUSH/PULL pair."""
    import zmq

    from mlx_cluster_magic.rank.status_sidecar import curve_push

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    if curve:
        pull.setsockopt(zmq.CURVE_SERVER, 1)
        pull.setsockopt(zmq.CURVE_SECRETKEY, server_secret)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    url = f"tcp://127.0.0.1:{port}"
    if curve:
        keys = {"server_key": server_public, "public_key": client_public}
        keys["secret_key"] = client_secret
        push = curve_push(ctx, {"url": url, **{k: v.decode() for k, v in keys.items()}})
    else:
        push = ctx.socket(zmq.PUSH)
        push.connect(url)
    record = json.dumps({"token": "0" * 32, "rank": 0, "pad": "x" * 2000}).encode()
    push.send(record)  # the handshake first
    pull.recv()
    t = time.perf_counter()
    for _ in range(RECORDS):
        push.send(record)
        pull.recv()
    elapsed = time.perf_counter() - t
    push.close(0)
    pull.close(0)
    ctx.term()
    return elapsed / RECORDS * 1e6


def bench_encryption(reps: int) -> list[dict[str, Any]]:
    from IPython.core.interactiveshell import InteractiveShell

    from mlx_cluster_magic.fabric.placement import local
    from mlx_cluster_magic.observe.status_receiver import StatusReceiver

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mlx_cluster_magic")
    on_t, off_t, ratios = _px_rounds(shell, reps)
    m: dict[str, list[float]] = {k: [] for k in ("n on", "n off", "r on", "r off")}
    receiver = StatusReceiver("127.0.0.1", local(1))
    try:
        for i in range(reps):
            for signed in (True, False) if i % 2 == 0 else (False, True):
                m["n on" if signed else "n off"].append(_notices(receiver, signed))
                m["r on" if signed else "r off"].append(_records(signed))
    finally:
        receiver.close()
    lo, hi = median_interval(ratios)
    return [
        compare(
            f"%%px pass, ipyparallel on CurveZMQ, alternating with a second live cluster with it "
            f"off (2 local ranks each): per-round ratio ({len(ratios)} rounds; ~95% interval "
            f"of the median {lo:.3f}..{hi:.3f}x)",
            ratios, [1.0] * len(ratios), "x", "report",
            "CurveZMQ off (ratio 1)",
        ),
        compare(
            f"%%px pass round trip on CurveZMQ (medians of {ROUNDS} rounds per run)",
            on_t, off_t, "ms", "report",
            "the same, CurveZMQ off",
        ),
        compare(
            "a request's start+end notices with their HMAC (rank side)",
            m["n on"], m["n off"], "us", "report",
            "the same datagrams without a MAC",
        ),
        compare(
            "a 2 KiB status record over CurveZMQ, sent and received",
            m["r on"], m["r off"], "us", "report",
            "a plain PUSH/PULL pair",
        ),
    ]  # fmt: skip


if __name__ == "__main__":
    for fig in bench_encryption(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        benchlib.print_figure(fig)
