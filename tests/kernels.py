"""A real Jupyter kernel driven as a notebook drives it (jupyter_client): cells run, what they
show read back, restarts as the menu asks them and kills as a crash does."""

from __future__ import annotations

import json
from typing import Any


class Notebook:
    """A real kernel, driven as a notebook drives it; ``run`` returns what the cell showed."""

    def __init__(self) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel()
        self._connect()

    def _connect(self) -> None:
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=90)

    def run(self, code: str, timeout: float = 180) -> tuple[str, str]:
        """(status, everything the cell showed: streams, results, displays, the error)."""
        shown: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["header"]["msg_type"], msg["content"]
            if kind == "stream":
                shown.append(content["text"])
            elif kind in ("execute_result", "display_data", "update_display_data"):
                shown.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                shown.append(f"{content['ename']}: {content['evalue']}")

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"]["status"], "\n".join(shown)

    def ok(self, code: str, timeout: float = 180) -> str:
        status, out = self.run(code, timeout)
        assert status == "ok", out
        return out

    def value(self, expression: str) -> Any:
        out = self.ok(f"import json as _j; print(_j.dumps({expression}))")
        return json.loads(out.strip().splitlines()[-1])

    def restart(self, now: bool = False) -> None:
        """The menu's restart (a shutdown request first), or ``now``: the kernel killed."""
        self.kc.stop_channels()
        self.km.restart_kernel(now=now)
        self._connect()

    def kill(self) -> None:
        """The kernel and its whole process group killed, as Jupyter kills a kernel."""
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)

    def close(self) -> None:
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=True)


def stop_our_kept_clusters(ssh: str | None = None) -> None:
    """Stop the kept clusters this test session started and left running: here, the runtimes
    that carry this session's marker; on virtual Macs, those reached with ``ssh`` (the rig's
    own ssh config). Nobody else's is touched (other sessions run beside this one)."""
    import contextlib
    import socket

    from mlx_cluster_magic import MLXCluster, MLXClusterError
    from mlx_cluster_magic.runtime import records

    from conftest import _has_marker

    ids = []
    for cluster_id, folder in records.local_records():
        with contextlib.suppress(MLXClusterError, OSError):
            record = records.Record.of(records.read_private(folder / records.RECORD))
            if ssh is None and record.host == socket.gethostname() and _has_marker(record.pid):
                ids.append(cluster_id)
    if ssh is not None:
        ids += [str(p["id"]) for p in records.pointers() if p.get("ssh") == ssh]
    for cluster_id in ids:
        with contextlib.suppress(MLXClusterError):
            MLXCluster.attach(cluster_id).stop()
