"""An attacker on the network between the notebook and two virtual Macs (issue 37): a sniffer on
every link of the hosts' bridge during a start, a ``%%px`` cell and the live status finds no
HMAC key, no status secret and no code; a client with the addresses but not the keys is refused
by every listener; a notice forged with a sniffed token changes nothing; one unauthenticated
frame to the engines' mux port leaves ``apply`` working at once; the ranks bind only the
cluster's address."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import zmq

pytestmark = pytest.mark.multihost

PREFIX, SUBNET = "secK", "10.137.75.0/24"
#: A string only the ``%%px`` cell holds: seen on the wire, the cell's code travelled in clear.
CODE_MARKER = "kestrel_code_marker_5c1f"
CELL = f"""
label = "{CODE_MARKER}"
total = mx.distributed.all_sum(mx.array([1.0])).item()
"""
ETH_P_ALL = 0x0003


class Sniffer:
    """Every IPv4 frame to or from ``subnet`` on any of the head's interfaces (the bridge and
    each host's cable into it), captured with a raw packet socket as tcpdump would; TCP flows
    reassembled by sequence number so a secret split across segments is still found."""

    def __init__(self, subnet: str) -> None:
        self.net = ipaddress.ip_network(subnet)
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root)
        self.sock.settimeout(0.2)
        self.tcp: dict[tuple[bytes, bytes, int, int], dict[int, bytes]] = {}
        self.udp: list[bytes] = []
        self.frames = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sniffer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            self._take(frame)

    def _take(self, frame: bytes) -> None:
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            return
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        src, dst = ip[12:16], ip[16:20]
        inside = [ipaddress.ip_address(a) in self.net for a in (src, dst)]
        if not any(inside):
            return
        self.frames += 1
        proto, body = ip[9], ip[ihl:total]
        if proto == 6 and len(body) >= 20:
            sport, dport, seq = struct.unpack("!HHI", body[:8])
            payload = body[(body[12] >> 4) * 4 :]
            if payload:
                self.tcp.setdefault((src, dst, sport, dport), {})[seq] = payload
        elif proto == 17 and len(body) >= 8:
            self.udp.append(body[8:])

    def streams(self) -> list[bytes]:
        """Each TCP flow's bytes in order, then each UDP datagram."""
        flows = [b"".join(seg[s] for s in sorted(seg)) for seg in list(self.tcp.values())]
        return flows + list(self.udp)

    def find(self, needle: bytes) -> int:
        """In how many flows or datagrams ``needle`` appears."""
        return sum(needle in s for s in self.streams())


def _status_url(status: Any) -> str:
    """The status receiver's ``tcp://ip:port``."""
    return str(status.url).partition("#")[0]


@pytest.fixture(scope="module")
def macs() -> Iterator[Any]:
    from conftest import virtual_macs

    with virtual_macs(2, SUBNET, PREFIX) as vc:
        yield vc


@pytest.fixture(scope="module")
def sniffed(macs: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A cluster on the two Macs started, a ``%%px`` cell run and its status watched, all under
    the sniffer; then the cluster stays up for the attacks."""
    from conftest import no_leaks_on, shared_cluster

    hostfile = macs.hostfile(tmp_path_factory.mktemp("secrets") / "hosts.json")
    line = f"start --hostfile {hostfile} --ssh '{macs.rsh_agent}' --timeout 60"
    with Sniffer(SUBNET) as sniffer, shared_cluster(line) as (shell, cluster):
        shell.run_cell_magic("px", "", CELL)
        assert cluster.view["total"] == [2.0, 2.0]
        time.sleep(1.5)  # a few periodic status records from every rank
        assert [n["state"] for n in cluster.nodes()] == ["idle", "idle"]
        run = cluster._run
        secrets = {
            "the HMAC key": cluster.client.session.key,
            "the status token": run.status.token.encode(),
            "the cell's code": CODE_MARKER.encode(),
        }
        if hasattr(run.status, "credentials"):
            secrets["the status secret key"] = run.status.credentials["secret_key"].encode()
        sniffer.__exit__()
        folder = getattr(run, "host_secrets_dir", None)
        yield {
            "shell": shell, "cluster": cluster, "sniffer": sniffer, "secrets": secrets,
            "folder": folder,
        }  # fmt: skip
    no_leaks_on(macs)
    if folder is not None:  # (the hosts share the head's disk here: one look covers all)
        assert not os.path.exists(os.path.join(os.path.expanduser("~"), folder))


def test_a_sniffer_on_every_link_finds_no_secret_and_no_code(sniffed: dict[str, Any]) -> None:
    sniffer = sniffed["sniffer"]
    cluster = sniffed["cluster"]
    assert sniffer.frames > 100, "the sniffer saw no traffic: it proves nothing"
    # it did see the control traffic: flows to the controller's address and the status port
    head = socket.inet_aton(cluster.controller_ip)
    assert any(k[1] == head or k[0] == head for k in sniffer.tcp)
    found = {what: sniffer.find(needle) for what, needle in sniffed["secrets"].items()}
    assert all(n == 0 for n in found.values()), f"seen on the wire (flows): {found}"


#: Socket types a stranger tries: one of them fits each listener's (ROUTER, PUB, SUB, PULL).
KINDS = (zmq.DEALER, zmq.SUB, zmq.PUB, zmq.PUSH)


def test_each_host_holds_the_secrets_in_a_private_file(sniffed: dict[str, Any], macs: Any) -> None:
    """What ssh wrote: 0600 in a 0700 folder, as the ranks' login sees it (removed at stop:
    checked when the module's cluster stops)."""
    import getpass

    assert sniffed["folder"] is not None
    folder = os.path.join(os.path.expanduser("~"), sniffed["folder"])
    me = getpass.getuser()
    for host in macs.hosts:
        got = macs.netns_exec(host, "stat", "-c", "%a %U", folder, f"{folder}/secrets.json")
        assert got.stdout.split("\n")[:2] == [f"700 {me}", f"600 {me}"], got


def _handshake(url: str, kind: int = zmq.DEALER, **curve: bytes) -> str:
    """What happens when a socket of ``kind`` connects to ``url`` (with CurveZMQ keys when
    given): ``ok`` once a ZMQ handshake succeeded, else the failure event, or ``none``."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in curve.items():
        sock.setsockopt(getattr(zmq, f"CURVE_{name.upper()}"), value)
    monitor = sock.get_monitor_socket()
    sock.connect(url)
    seen = "none"
    deadline = time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            if not monitor.poll(100):
                continue
            from zmq.utils.monitor import recv_monitor_message

            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return "ok"
            if event in (
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                zmq.EVENT_HANDSHAKE_FAILED_AUTH,
            ):
                seen = {
                    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed (protocol)",
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed",
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused (auth)",
                }[event]
                break
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        ctx.term()
    return seen


def _controller_ports(cluster: Any) -> list[int]:
    """Every TCP port the controller (and its schedulers) listens on at the cluster's address."""
    controller = psutil.Process(cluster._run.ipp.controller.process.pid)
    ports = set()
    for proc in [controller, *controller.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            for c in proc.net_connections("tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr.ip == cluster.controller_ip:
                    ports.add(c.laddr.port)
    return sorted(ports)


def test_every_listener_refuses_a_client_without_the_keys(sniffed: dict[str, Any]) -> None:
    cluster = sniffed["cluster"]
    ports = _controller_ports(cluster)
    assert len(ports) >= 10, ports  # registration, mux, task, control, iopub, heartbeat...
    status_url = _status_url(cluster._run.status)
    urls = [f"tcp://{cluster.controller_ip}:{p}" for p in ports] + [status_url]
    plain = {(url, kind): _handshake(url, kind) for url in urls for kind in KINDS}
    accepted = [key for key, got in plain.items() if got == "ok"]
    assert accepted == [], f"handshakes without keys: {accepted}"
    # A CurveZMQ client that even knows the status server's public key, with a key of its own:
    # ZAP admits only the ranks' key.
    # (the ranks' own key pair gets in: the test tells a refusal from a broken handshake)
    credentials = cluster._run.status.credentials
    server = credentials["server_key"].encode()
    ranks = {"publickey": credentials["public_key"].encode()}
    ranks["secretkey"] = credentials["secret_key"].encode()
    assert _handshake(status_url, zmq.PUSH, serverkey=server, **ranks) == "ok"
    public, secret = zmq.curve_keypair()
    got = _handshake(status_url, zmq.PUSH, serverkey=server, publickey=public, secretkey=secret)
    assert got != "ok", got


def test_a_client_without_the_hmac_key_runs_nothing(sniffed: dict[str, Any], tmp_path) -> None:
    """A client with every address and the controller's public key (a profile's connection file
    without its ``key``), signing with no key or a key of its own, is not answered. With
    ipyparallel's Curve alone (its HMAC key dropped) the one with no key ran code on every rank."""
    import ipyparallel as ipp

    from mlx_cluster_magic.launch.ipp_adapter import engine_connection_file

    cluster = sniffed["cluster"]
    client_file = engine_connection_file(cluster._run.ipp).replace("-engine.json", "-client.json")
    with open(client_file) as f:
        info = json.load(f)
    for key in ("", os.urandom(16).hex()):
        forged = tmp_path / "client.json"
        forged.write_text(json.dumps(dict(info, key=key)))
        ran = None
        with contextlib.suppress(TimeoutError, ValueError):  # refused: no answer, or unsigned
            stranger = ipp.Client(str(forged), timeout=3)
            try:
                ran = stranger[:].apply_sync(os.getpid)
            finally:
                stranger.close()
        assert ran is None, f"a client signing with {key!r} ran code on the ranks"
    assert cluster.view.apply_sync(abs, -1) == [1, 1]


def test_a_notice_forged_with_a_sniffed_token_changes_nothing(sniffed: dict[str, Any]) -> None:
    """A notice as ranks sent them before (the token inside, no MAC), from the network."""
    cluster = sniffed["cluster"]
    status = cluster._run.status
    host, port = _status_url(status).rsplit("//", 1)[1].rsplit(":", 1)
    forged = {"token": status.token, "rank": 0, "busy_s": 0.0, "state": "busy", "requests": 10**6}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(json.dumps(forged).encode(), (host, int(port)))
        s.sendto(b"\0" * 32 + json.dumps(forged).encode(), (host, int(port)))
    finally:
        s.close()
    time.sleep(0.5)
    node = cluster.nodes()[0]
    assert node["state"] == "idle" and status.requests(0) != 10**6, node


def test_one_frame_to_the_mux_port_leaves_apply_working(sniffed: dict[str, Any]) -> None:
    """Finding 4: one unauthenticated one-frame message to the engines' mux port once stalled
    every ``apply`` for half a minute."""
    from mlx_cluster_magic.launch.ipp_adapter import engine_connection_file

    cluster = sniffed["cluster"]
    with open(engine_connection_file(cluster._run.ipp)) as f:
        info = json.load(f)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(f"{info['interface']}:{info['mux']}")
    sock.send(b"x")
    time.sleep(0.5)
    sock.close()
    ctx.term()
    t0 = time.monotonic()
    ar = cluster.view.apply_async(abs, -1)
    assert ar.get(timeout=5) == [1, 1]
    assert time.monotonic() - t0 < 2.0


def _sockets(pid: int) -> list[tuple[str, str, int]]:
    """(kind, local address, port) of each UDP socket and TCP listener of ``pid``, read from
    its own network namespace's tables (psutil reads the caller's)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for kind in ("udp", "tcp", "udp6", "tcp6"):
        with open(f"/proc/{pid}/net/{kind}") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        for row in rows:
            if row[9] not in inodes or (kind.startswith("tcp") and row[3] != "0A"):
                continue  # another process's, or a TCP socket that is not a listener
            hex_ip, hex_port = row[1].split(":")
            raw = bytes.fromhex(hex_ip)
            if len(raw) == 4:
                ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                ip = socket.inet_ntop(socket.AF_INET6, words)
            found.append((kind, ip, int(hex_port, 16)))
    return found


def test_ranks_bind_only_the_cluster_address(sniffed: dict[str, Any], macs: Any) -> None:
    """Each rank's sockets are bound to its own address on the cluster's network (its status
    notices' UDP socket included), but Open MPI's TCP transport: it listens on every interface,
    IPv4 and IPv6 (no parameter of Open MPI 5 names an address, and ``btl_tcp_disable_family``
    does not change it; its traffic is pinned to the subnet)."""
    cluster = sniffed["cluster"]
    everywhere = []
    for rank, host_ip in zip(cluster.ranks, macs.ips):
        found = _sockets(rank["pid"])
        assert any(kind == "udp" for kind, _, _ in found), found  # the notices' socket
        wild = [s for s in found if s[1] not in (host_ip, "127.0.0.1")]
        mpi = [s for s in wild if s[1] in ("0.0.0.0", "::") and 1024 <= s[2] < 1100]
        assert len(mpi) <= 2 and all(kind.startswith("tcp") for kind, _, _ in mpi), mpi
        everywhere += [(rank["rank"], *s) for s in wild if s not in mpi]
    assert everywhere == [], f"bound to every interface: {everywhere}"
