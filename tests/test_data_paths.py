"""Who must reach whom, per backend, on the hostfiles MLX's own code writes; and the fix that
fits the cabling when a path is missing."""

from __future__ import annotations

from pathlib import Path

from mlx_cluster_magic.fabric.data_paths import data_paths, missing_paths_fix
from mlx_cluster_magic.fabric.placement import Host, Placement, read_hostfile

HOSTFILES = Path(__file__).parent / "fixtures" / "hostfiles"


def _pairs(
    placement: Placement, backend: str, **kw: object
) -> list[tuple[str, str, tuple[str, ...]]]:
    names = [h.ssh for h in placement.hosts]
    return [(names[p.src], names[p.dst], p.ips) for p in data_paths(placement, backend, **kw)]  # type: ignore[arg-type]


def test_ring_sends_to_the_next_host_on_its_cable_address() -> None:
    ring = read_hostfile(HOSTFILES / "ring-4.json")
    assert _pairs(ring, "ring") == [
        ("mac1", "mac2", ("192.168.0.2",)),
        ("mac2", "mac3", ("192.168.0.10",)),
        ("mac3", "mac4", ("192.168.0.14",)),
        ("mac4", "mac1", ("192.168.0.5",)),
    ]


def test_jaccl_ring_both_neighbours_and_jaccl_every_pair() -> None:
    ring = read_hostfile(HOSTFILES / "jaccl-ring-4.json")
    pairs = {(a, b) for a, b, _ in _pairs(ring, "jaccl-ring")}
    assert pairs == {
        ("mac1", "mac2"), ("mac2", "mac1"), ("mac2", "mac3"), ("mac3", "mac2"),
        ("mac3", "mac4"), ("mac4", "mac3"), ("mac4", "mac1"), ("mac1", "mac4"),
    }  # fmt: skip
    mesh = read_hostfile(HOSTFILES / "jaccl-3.json")
    assert len(_pairs(mesh, "jaccl")) == 6


def test_mpi_every_pair_on_the_network_it_is_pinned_to() -> None:
    hosts = (Host("mac1", ("10.0.0.1",)), Host("mac2", ("10.0.0.6",)), Host("mac3", ("10.0.0.9",)))
    p = Placement(hosts, (1, 1, 1))
    assert len(_pairs(p, "mpi")) == 6  # on the cluster IPs
    mgmt = {"mac1": "192.168.1.11", "mac2": "192.168.1.12", "mac3": "192.168.1.13"}
    pinned = _pairs(p, "mpi", networks=["192.168.1.0/24"], addresses=mgmt)
    assert ("mac1", "mac2", ("192.168.1.12",)) in pinned and len(pinned) == 6
    assert _pairs(p, "any") == []
    assert _pairs(Placement(hosts[:1], (2,)), "ring") == []


def test_the_fix_fits_the_layout() -> None:
    hosts = tuple(Host(f"mac{i}", (f"10.0.{i}.2",)) for i in range(1, 5))
    p = Placement(hosts, (1, 1, 1, 1))
    star = missing_paths_fix(p, "ring", [(1, 2), (2, 3)])
    assert "cabled as a star around mac1: turn on the Thunderbolt Bridge on mac1" in star
    ring = missing_paths_fix(p, "ring", [(0, 1), (2, 3)])
    assert "mac1 -> mac2 -> mac3 -> mac4 -> mac1" in ring and "cable mac1 and mac2" in ring
    assert "cable mac1 and mac3" in missing_paths_fix(p, "mpi", [(0, 2), (2, 0), (1, 3)])
