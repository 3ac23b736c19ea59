"""How hard each Mac works, sampled on the host by the status sidecar (one sampler per host).

Every rank measures its own process's CPU use (the difference of its CPU times between two
reports: one ``getrusage``-like read, no thread of its own). The host's first rank (Open MPI's
local rank 0; every rank where that is not set) also samples the host: CPU use of all cores,
memory in use and, on Apple silicon, GPU use, CPU and GPU power and temperatures from
``macmon pipe`` (no sudo), read without blocking from the JSON lines it prints. Without macmon,
GPU use and power come from ``powermetrics --samplers gpu_power`` where it runs without a
password (root, or a sudoers rule: ``sudo -n``). Where neither runs on a Mac the record says so
(``usage_hint``), so the view can say what adds them; on Linux those fields are absent, never
zero.

Records carry plain numbers under the names in ``HOST_FIELDS`` and ``RANK_FIELDS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

#: Open MPI's rank number of this process among the ranks on its host.
LOCAL_RANK_VAR = "OMPI_COMM_WORLD_LOCAL_RANK"
#: Fields the host's sampler adds to its rank's record: percentages, watts, degrees Celsius.
HOST_FIELDS = (
    "host_cpu_percent",
    "mem_percent",
    "gpu_percent",
    "cpu_w",
    "gpu_w",
    "cpu_temp_c",
    "gpu_temp_c",
)
#: Fields every rank adds: its own process's CPU use (100 is one core busy).
RANK_FIELDS = ("cpu_percent",)
POWERMETRICS = "/usr/bin/powermetrics"
#: Where Homebrew puts macmon, for a login PATH (ssh's) that lacks it.
MACMON_PLACES = ("/opt/homebrew/bin/macmon", "/usr/local/bin/macmon")
MACMON_HINT = "brew install macmon adds GPU use, power and temperature"
#: A partial line longer than this is not macmon's: drop it.
MAX_LINE = 1 << 16


def parse_macmon_line(line: str | bytes) -> dict[str, float]:
    """The figures we show from one ``macmon pipe`` JSON line: GPU use (``gpu_usage`` is
    ``[MHz, ratio 0-1]``), CPU and GPU power (W), CPU and GPU temperature (average, Celsius).
    A field macmon left out or reported as not a number is left out; not JSON gives ``{}``."""
    try:
        doc = json.loads(line)
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    out: dict[str, float] = {}

    def put(name: str, value: Any, scale: float = 1.0) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value) * scale

    usage = doc.get("gpu_usage")
    if isinstance(usage, list) and len(usage) == 2:
        put("gpu_percent", usage[1], 100.0)
    put("cpu_w", doc.get("cpu_power"))
    put("gpu_w", doc.get("gpu_power"))
    temp = doc.get("temp")
    if isinstance(temp, dict):
        put("cpu_temp_c", temp.get("cpu_temp_avg"))
        put("gpu_temp_c", temp.get("gpu_temp_avg"))
    return out


def parse_powermetrics_line(line: str | bytes) -> dict[str, float]:
    """What one line of ``powermetrics --samplers gpu_power`` (text) says: ``GPU HW active
    residency:   0.97% (...)`` is GPU use (%), ``GPU Power: 4 mW`` its power (W); ``{}``
    for every other line."""
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    name, sep, rest = text.strip().partition(":")
    if not sep:
        return {}
    try:
        if name == "GPU HW active residency":
            return {"gpu_percent": float(rest.split("%", 1)[0])}
        if name == "GPU Power":
            value, unit = rest.split()[:2]
            return {"gpu_w": float(value) / 1000.0} if unit == "mW" else {}
    except ValueError:
        return {}
    return {}


def first_on_host(environ: dict[str, str] | None = None) -> bool:
    """Whether this rank samples its host: Open MPI's local rank 0 (every rank when unknown)."""
    value = (os.environ if environ is None else environ).get(LOCAL_RANK_VAR)
    return value is None or value.strip() == "0"


def find_macmon() -> str | None:
    """macmon's path on this Mac, or None (not a Mac, or not installed)."""
    if sys.platform != "darwin":
        return None
    found = shutil.which("macmon")
    if found:
        return found
    return next((p for p in MACMON_PLACES if os.access(p, os.X_OK)), None)


def powermetrics_command(interval_ms: int) -> list[str] | None:
    """``powermetrics`` sampling the GPU every ``interval_ms``, as root or through ``sudo -n``
    (never asks for a password); None where it is not a Mac's."""
    if sys.platform != "darwin" or not os.access(POWERMETRICS, os.X_OK):
        return None
    cmd = [POWERMETRICS, "--samplers", "gpu_power", "-i", str(max(100, interval_ms))]
    return cmd if os.geteuid() == 0 else ["sudo", "-n", *cmd]


class PipeReader:
    """A sampling tool running beside the rank (``macmon pipe``, ``powermetrics``);
    ``latest()`` is what its newest lines say, each parsed by ``parse``.

    Its stdout is read without blocking from the sidecar's thread at every report. The tool
    ends with the rank: ``close()`` stops it, and a rank killed outright closes the pipe, on
    which the tool's next write fails and it exits. ``exited`` once it has ended (its last
    figures are then not current); ``failed`` when it ended without one (``sudo -n`` wanting a
    password, say).
    """

    def __init__(self, cmd: list[str], parse: Callable[[bytes], dict[str, float]]) -> None:
        self._parse = parse
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self._proc.stdout is not None
        self._fd = self._proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._partial = b""
        self._latest: dict[str, float] = {}
        self.exited = False

    @property
    def failed(self) -> bool:
        return self.exited and not self._latest

    def latest(self) -> dict[str, float]:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return {}
            if not chunk:  # the tool exited
                self.exited = True
                break
            self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        if len(self._partial) > MAX_LINE:
            self._partial = b""
        for line in lines:
            if line.strip():
                self._latest.update(self._parse(line))
        return self._latest

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._proc.terminate()
        with contextlib.suppress(Exception):
            self._proc.wait(1)
        with contextlib.suppress(Exception):
            assert self._proc.stdout is not None
            self._proc.stdout.close()


class UsageSampler:
    """What one report says of the work on this host (see the module's docstring)."""

    def __init__(self, samples_host: bool, interval_s: float) -> None:
        import psutil

        self.samples_host = samples_host
        self._psutil = psutil
        self._proc = psutil.Process()
        self._last: tuple[float, float] | None = None  # (wall clock, CPU seconds) at last read
        self._apple: PipeReader | None = None
        self.hint: str | None = None
        if samples_host:
            psutil.cpu_percent(None)  # the first call starts psutil's interval
            self._apple = _apple_reader(int(interval_s * 1000))
            if self._apple is None and sys.platform == "darwin":
                self.hint = MACMON_HINT

    def _process_cpu(self) -> float | None:
        times = self._proc.cpu_times()
        now, used = time.monotonic(), float(times.user + times.system)
        last, self._last = self._last, (now, used)
        if last is None or now <= last[0]:
            return None
        return max(0.0, 100.0 * (used - last[1]) / (now - last[0]))

    def sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            cpu = self._process_cpu()
            if cpu is not None:
                out["cpu_percent"] = round(cpu, 1)
        if not self.samples_host:
            return out
        out["samples_host"] = True
        with contextlib.suppress(Exception):
            out["host_cpu_percent"] = round(float(self._psutil.cpu_percent(None)), 1)
            out["mem_percent"] = round(float(self._psutil.virtual_memory().percent), 1)
        if self._apple is not None:
            figures = self._apple.latest()
            if self._apple.exited:  # its last figures are not current: show none
                failed = self._apple.failed  # (powermetrics wanted a password after all)
                self._apple.close()
                self._apple = None
                self.hint = MACMON_HINT if failed else None
            else:
                out.update({k: round(v, 3) for k, v in figures.items()})
        if self.hint:
            out["usage_hint"] = self.hint
        return out

    def close(self) -> None:
        if self._apple is not None:
            self._apple.close()


def _apple_reader(interval_ms: int) -> PipeReader | None:
    """macmon where installed, else powermetrics where it runs without a password."""
    path = find_macmon()
    cmd = [path, "pipe", "-i", str(max(100, interval_ms))] if path else None
    parse: Callable[[bytes], dict[str, float]] = parse_macmon_line
    if cmd is None:
        cmd, parse = powermetrics_command(interval_ms), parse_powermetrics_line
    if cmd is None:
        return None
    try:
        return PipeReader(cmd, parse)
    except OSError:
        return None
