"""Links, rank side: what a rank knows of its interfaces, and the pairwise measurements
(MLX send/recv and raw TCP) that ``fabric.links.measure`` plans and runs on two ranks at a time.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from . import stream_auth


def rank_facts(macos_commands: Sequence[Sequence[str]] = ()) -> dict[str, Any]:
    """This rank's host, addresses (with prefix length and interface), each interface's speed
    and whether it is virtual, and on a Mac the output of ``macos_commands`` (the head parses
    it: parsers of macOS output live on the head)."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    addrs = []
    for iface, items in psutil.net_if_addrs().items():
        for a in items:
            if a.family not in (socket.AF_INET, socket.AF_INET6) or not a.netmask:
                continue
            address = a.address.split("%")[0]
            try:
                prefix = ipaddress.ip_network(f"0.0.0.0/{a.netmask}").prefixlen
            except ValueError:
                try:
                    prefix = ipaddress.ip_network(f"::/{a.netmask}").prefixlen
                except ValueError:
                    continue
            addrs.append({"iface": iface, "address": address, "prefixlen": prefix})
    stats = psutil.net_if_stats()
    interfaces = {}
    for iface in {a["iface"] for a in addrs}:
        st = stats.get(iface)
        brif = f"/sys/class/net/{iface}/brif"  # a Linux bridge's ports
        interfaces[iface] = {
            "speed_mbit": st.speed if st else None,
            "virtual": sys.platform.startswith("linux")
            and not os.path.exists(f"/sys/class/net/{iface}/device"),
            "members": sorted(os.listdir(brif)) if os.path.isdir(brif) else [],
        }
    macos: dict[str, str] = {}
    if sys.platform == "darwin":
        for argv in macos_commands:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                macos[" ".join(argv)] = subprocess.run(
                    list(argv), capture_output=True, text=True, timeout=20, check=False
                ).stdout
    return {
        "host": socket.gethostname(),
        "addrs": addrs,
        "interfaces": interfaces,
        "macos": macos,
    }


_TAG_PORT, _TAG_ABORT, _TAG_SIZE = 7171, 7172, 7173


def run_plan(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Run on the two ranks of each pair (only they are called): the sender's results."""
    from mpi4py import MPI

    from .bootstrap import WORLD

    comm = MPI.COMM_WORLD  # point-to-point only, with tags of our own
    me = comm.Get_rank()
    out = []
    for step in plan["steps"]:
        a, b = step["a"], step["b"]
        if me not in (a, b):
            continue
        sender = me == a
        peer = b if sender else a
        res: dict[str, Any] = {"a": a, "b": b}
        if step["mlx"]:
            try:
                res.update(_mlx_pair(WORLD, comm, sender, peer, plan["seconds"], plan["max_bytes"]))
            except Exception as e:  # reported per link
                res["mlx_error"] = f"MLX: {e}"
        if step["tcp_ip"]:
            try:
                res.update(
                    _tcp_pair(comm, sender, peer, step["tcp_ip"], plan["seconds"], step["token"])
                )
            except OSError as e:
                res["tcp_error"] = f"TCP to {step['tcp_ip']}: {e}"
        if sender:
            out.append(res)
    return out


def _mlx_pair(
    world: Any, comm: Any, sender: bool, peer: int, seconds: float, max_bytes: int
) -> dict[str, Any]:
    """Round trips of a 4-byte array, then a doubling stream of float32 arrays."""
    import mlx.core as mx

    dist = mx.distributed
    small = mx.zeros((1,), dtype=mx.float32)
    mx.eval(small)

    def there() -> None:
        mx.eval(dist.send(small, peer, group=world))

    def back() -> None:
        mx.eval(dist.recv_like(small, peer, group=world))

    rtts = []
    for i in range(25):
        t0 = time.perf_counter()
        if sender:
            there()
            back()
        else:
            back()
            there()
        if i >= 5:
            rtts.append(time.perf_counter() - t0)
    size = 1 << 18
    rates: list[float] = []
    deadline = time.perf_counter() + 2 * seconds
    final = False
    while True:
        # The sender decides the next size (0: done) and tells the peer over MPI.
        if sender:
            comm.send(size, dest=peer, tag=_TAG_SIZE)
        else:
            size = comm.recv(source=peer, tag=_TAG_SIZE)
            if not size:
                break
        count = size // 4
        if not sender:
            got = dist.recv((count,), mx.float32, peer, group=world)
            mx.eval(got)
            del got
            there()
            continue
        payload = mx.zeros((count,), dtype=mx.float32)
        mx.eval(payload)
        t0 = time.perf_counter()
        mx.eval(dist.send(payload, peer, group=world))
        back()  # the peer has it all
        dt = time.perf_counter() - t0
        rates.append(size * 8 / dt / 1e9)
        if final:
            comm.send(0, dest=peer, tag=_TAG_SIZE)
            break
        if dt < seconds / 2 and size * 2 <= max_bytes and time.perf_counter() < deadline:
            size *= 2
        else:
            final = True  # one more at this size; the better of the two counts
    return {
        "latency_s": statistics.median(rtts),
        "gbit_s": max(rates[-2:]) if rates else None,
    }


def _tcp_pair(
    comm: Any, sender: bool, peer: int, ip: str, seconds: float, token: str
) -> dict[str, Any]:
    """A TCP stream for ``seconds`` from ``sender`` to a one-connection listener that the peer
    opens on ``ip`` (its cluster address, never 0.0.0.0); the sender proves it holds the pair's
    token (``stream_auth``), and a stranger's connection is refused while the sender's gets
    through."""
    if not sender:
        _tcp_listen(comm, peer, ip, seconds, token)
        return {}
    port = comm.recv(source=peer, tag=_TAG_PORT)
    if not port:
        raise OSError("the peer could not listen there")
    try:
        conn = socket.create_connection((ip, port), timeout=5)
        try:
            stream_auth.prove(conn, token, 5 + seconds)
        except OSError:
            conn.close()
            raise
    except OSError:
        comm.send(1, dest=peer, tag=_TAG_ABORT)
        raise
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        chunk = memoryview(bytearray(1 << 20))
        sent = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            conn.sendall(chunk)
            sent += len(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(5 + seconds)
        if conn.recv(1) != b"k":
            raise OSError("the peer did not confirm the stream")
        dt = time.perf_counter() - t0
    return {"tcp_gbit_s": sent * 8 / dt / 1e9, "tcp_bytes": sent, "tcp_s": dt}


def _tcp_listen(comm: Any, peer: int, ip: str, seconds: float, token: str) -> None:
    """The receiving end of ``_tcp_pair``: listen, tell the peer the port over MPI, take the
    connection that proves the token (or stop when the peer gives up), drain it, confirm."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        lsock = socket.socket(family, socket.SOCK_STREAM)
        lsock.bind((ip, 0))
    except OSError as e:
        comm.send(0, dest=peer, tag=_TAG_PORT)
        raise OSError(f"cannot listen on {ip} ({e})") from None
    lsock.listen(8)
    comm.send(int(lsock.getsockname()[1]), dest=peer, tag=_TAG_PORT)
    aborted = False

    def peer_gave_up() -> bool:
        nonlocal aborted
        if comm.Iprobe(source=peer, tag=_TAG_ABORT):
            comm.recv(source=peer, tag=_TAG_ABORT)
            aborted = True
        return aborted

    found = stream_auth.accept(lsock, token, 5 + seconds, give_up=peer_gave_up)
    if found is None:
        if aborted:
            return
        raise OSError("no connection from the peer")
    conn = found[0]
    with conn:
        conn.settimeout(5 + seconds)
        buf = bytearray(4 << 20)
        while conn.recv_into(buf):
            pass
        conn.sendall(b"k")
