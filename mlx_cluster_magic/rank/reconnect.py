"""Connections that are made again as soon as the network is back, instead of waiting on TCP.

Through a drop, whatever a connection sends stays unacknowledged and TCP retransmits it with
exponential backoff (about 0.2, 0.6, 1.4, 3, 6, 12.6, 25, 51, 102 s into the outage), so the
connection carries nothing until the first retransmit after the network returns: 21.7 s after a
32.5 s drop, about 46 s after a 56 s one. ipyparallel's heartbeat rides on two such
connections (the controller's pings, the engine's pongs): past grace + 10 s without them the
controller unregisters every engine and the engines exit, although the network has long been
back. The live status records ride on another.

These connections carry only the latest word (a ping, a status record), so losing what was in
flight costs nothing: ZMTP heartbeats close each of them once its peer has been silent for
``HEARTBEAT_TIMEOUT``, on both ends (the controller's side is set up by the head's adapter, and
its pong socket hands an engine's identity over to the new connection), and ZMQ connects again
every ``RECONNECT_IVL`` with a ``CONNECT_TIMEOUT`` of its own, so the first attempt after the
network returns starts a fresh connection with no backoff. (ZMTP's TTL cannot do the
controller's half: a pong that follows the last ping cancels it.) Connections whose messages
must all arrive (requests, replies, output) keep TCP's delivery: late, never lost.
"""

from __future__ import annotations

from typing import Any

from ..contract import LATEST_WORD_OPTIONS


def reconnect_promptly(setsockopt: Any) -> None:
    """Apply :data:`LATEST_WORD_OPTIONS` through ``setsockopt(option, value)`` (a socket's, or a
    ZMQ device's ``setsockopt_in``/``setsockopt_out``), before it connects."""
    import zmq

    for name, value in LATEST_WORD_OPTIONS.items():
        setsockopt(getattr(zmq, name), value)


def heartbeat_reconnects_promptly() -> None:
    """Make every heart the engine starts (ipyparallel's ``Heart``, a public class the engine's
    app imports by name) reconnect promptly on both of its connections."""
    import ipyparallel.engine.app as engine_app

    base = engine_app.Heart

    class PromptHeart(base):  # type: ignore[misc,valid-type]
        """ipyparallel's heart whose ping and pong connections are re-made after a drop."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            reconnect_promptly(self.device.setsockopt_in)
            reconnect_promptly(self.device.setsockopt_out)

    engine_app.Heart = PromptHeart
