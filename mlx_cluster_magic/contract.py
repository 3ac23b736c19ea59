"""What the head and every rank agree on: the seam between the notebook's kernel and the ranks.

Environment variables the head sets for the ranks' start-up, the exit code a rank uses to say
its MLX group could not be formed, the signal that asks a rank for its stacks, and how a code
location is written for a user. Both sides import this module; it imports nothing of the
package, so a rank never pulls head-side code in through it.
"""

from __future__ import annotations

import os
import re
import signal

# Read by the ranks' start-up (mlx_cluster_magic.rank.bootstrap), set by the head's launch.
BACKEND_VAR = "MLX_CLUSTER_BACKEND"
RING_HOSTS_VAR = "MLX_CLUSTER_RING_HOSTS"
IBV_DEVICES_VAR = "MLX_CLUSTER_IBV_DEVICES"
# The path of the file holding this host's secrets (``launch.host_secrets``): the controller's
# engine connection (or, on the head, the path of the controller's own file) and the status
# channel's keys. Relative paths are under the login's home. Only the path is forwarded.
SECRETS_FILE_VAR = "MLX_CLUSTER_SECRETS_FILE"
#: A farm's engine (``rank.farm_engine``): its slot, the engine id and status rank it takes.
FARM_SLOT_VAR = "MLX_CLUSTER_FARM_SLOT"
#: Set for a farm engine started over ssh: it ends when its ssh session does (stdin closes).
FARM_TIED_VAR = "MLX_CLUSTER_FARM_TIED"
#: In that file: the status channel's keys, and where the engine connection is when not inline.
STATUS_SECRETS_KEY = "mlx_cluster_status"
ENGINE_FILE_KEY = "mlx_cluster_engine_file"
#: Variables that hold a secret: never forwarded by ``mpiexec -x`` (Open MPI carries them in
#: clear to the hosts).
SECRET_VARS = ("IPP_CONNECTION_INFO", "IPP_CURVE_SECRETKEY", "IPP_CURVE_PUBLICKEY")

#: A rank exits with this when its MLX group does not span every rank (the head says why).
EXIT_BAD_GROUP = 3

#: The signal on which a rank dumps every thread's Python stack (see rank.stack_dump).
STACK_SIGNAL = signal.SIGUSR2

_CELL = re.compile(
    r"(?:^|[/\\])ipykernel_\d+[/\\]\d+\.py$|^<ipython-input-\d+-[0-9a-f]+>$|^<cell line: \d+>$"
)


def is_cell(filename: str) -> bool:
    """True for the file name a notebook cell (``%%px`` included) is compiled under."""
    return bool(_CELL.search(filename))


def location(filename: str, line: int | None) -> str:
    """``cell line 3`` for a cell, else ``train.py:12``: what a user recognises."""
    where = "cell" if is_cell(filename) else os.path.basename(filename) or filename
    if line is None:
        return where
    return f"cell line {line}" if where == "cell" else f"{where}:{line}"

#: ZMQ options (name -> milliseconds) of the connections that carry only the latest word
#: (ipyparallel's heartbeat, the ranks' status records), on both of their ends: ZMTP
#: heartbeats close such a connection once its peer is silent for 3 s, and it is made again as
#: soon as the network answers, instead of waiting for TCP's next retransmit (rank.reconnect).
LATEST_WORD_OPTIONS: dict[str, int] = {
    "HEARTBEAT_IVL": 1000,
    "HEARTBEAT_TIMEOUT": 3000,
    "CONNECT_TIMEOUT": 1000,
    "RECONNECT_IVL": 200,
    "RECONNECT_IVL_MAX": 0,
}

