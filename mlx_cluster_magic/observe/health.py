"""Why a cluster cannot go on, as data: what happened, who, and what to type.

The cluster keeps one ``Breakage`` while it is ``broken``; the magics, ``%%px`` and the views
read its fields instead of splitting sentences, so each says the same thing with the advice
that fits the case (``restart --without HOST`` for a lost Mac, ``restart`` once the network is
back). No IPython.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The advice when nothing more specific fits.
RESTART = "%mlx_cluster restart brings it back"


@dataclass(frozen=True)
class Breakage:
    """One reason a cluster broke.

    ``cause``: ``lost`` (a host no one reaches), ``network`` (every host silent past the
    grace), ``cable`` (a cable between two hosts), ``died`` (a rank's process gone),
    ``heartbeat`` (the controller lost engines), ``hung`` (a cell that could not be
    interrupted), ``runtime`` (a kept cluster's runtime was killed) or ``aborted``
    (anything else, in ``what``'s words).
    """

    what: str
    advice: str = RESTART
    cause: str = "aborted"
    hosts: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()

    def line(self) -> str:
        """``what; advice``: the one line every message builds on."""
        return f"{self.what}; {self.advice}"


def lost_host(detail: str, host: str, ranks: tuple[int, ...] = ()) -> Breakage:
    """A host neither the notebook nor its peers reach: go on without it, or wait for it."""
    return Breakage(
        detail,
        f"%mlx_cluster restart --without {host} starts on the others (restart alone, once it "
        "is back)",
        "lost",
        (host,),
        ranks,
    )


def cable_down(detail: str) -> Breakage:
    return Breakage(
        f"{detail}: the cell's collectives cannot finish",
        "%mlx_cluster restart brings it back once the cable is back",
        "cable",
    )
