"""Link measurement: judging, planning and rendering on records; a real local cluster measured."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import pytest

from mlx_cluster_magic.fabric import links, topology
from mlx_cluster_magic.fabric.links import LinkRecord, LinkReport
from mlx_cluster_magic.fabric.placement import parse_hostfile_text, read_hostfile

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hostfiles")


def rec(src: str, dst: str, rate: float | None, kind: str = "thunderbolt4", **kw) -> LinkRecord:
    return LinkRecord(src, dst, 1e-4, rate, rate, "bridge0", kind, **kw)


def test_the_slow_link_is_flagged_and_only_it() -> None:
    records = links.judge(
        [rec("mac1", "mac2", 18.0), rec("mac1", "mac3", 17.0), rec("mac2", "mac3", 0.9)]
    )
    assert [r.flag is not None for r in records] == [False, False, True]
    assert "20x below the best link (18.0 Gb/s)" in (records[2].flag or "")
    assert "below Thunderbolt 4" in (records[2].flag or "")


def test_below_its_kind_even_when_all_are_equally_slow() -> None:
    records = links.judge([rec("a", "b", 3.0), rec("a", "c", 3.0), rec("b", "c", 3.0)])
    assert all("below Thunderbolt 4" in (r.flag or "") for r in records)
    assert all("best link" not in (r.flag or "") for r in records)
    # A link without expectations (virtual, Wi-Fi) is judged only against the best one.
    assert links.judge([rec("a", "b", 0.2, kind="virtual")])[0].flag is None


def test_unmeasured_link_says_why() -> None:
    r = links.judge([rec("a", "b", None, note="TCP to 10.0.0.2: refused")])[0]
    assert r.flag == "not measured: TCP to 10.0.0.2: refused"


@pytest.mark.parametrize(
    ("kw", "kind"),
    [
        ({"name": "bridge0", "port": "Thunderbolt Bridge", "link_gbit": 80.0}, "thunderbolt5"),
        ({"name": "en2", "port": "Thunderbolt 1", "link_gbit": 40.0}, "thunderbolt4"),
        ({"name": "bridge0"}, "thunderbolt"),
        ({"name": "en0", "port": "Wi-Fi"}, "wifi"),
        ({"name": "en0", "port": "Ethernet", "speed_mbit": 10000}, "10gbe"),
        ({"name": "eth0", "speed_mbit": 1000}, "ethernet"),
        ({"name": "fabc1", "speed_mbit": 10000, "virtual": True}, "virtual"),
        ({"name": "lo"}, "loopback"),
        ({"name": None}, "unknown"),
    ],
)
def test_classify(kw: dict, kind: str) -> None:
    name = kw.pop("name")
    assert links.classify(name, **kw) == kind


def test_ring_backend_pairs_are_ring_neighbours() -> None:
    # 2 hosts x 2 ranks: ranks 0,1 on host 0 and 2,3 on host 1; in a ring 1-2 are neighbours.
    assert links.plan_pairs([0, 0, 1, 1], "ring") == [(0, 1, 1, 2, True)]
    assert links.plan_pairs([0, 0, 1, 1], "mpi") == [(0, 1, 0, 2, True)]
    # A ring of 4 hosts: 0 and 2 are not neighbours, MLX cannot send between them.
    pairs = links.plan_pairs([0, 1, 2, 3], "ring")
    assert (0, 2, 0, 2, False) in pairs and (0, 1, 0, 1, True) in pairs


def test_pick_address_prefers_the_shared_cable() -> None:
    a = [
        {"iface": "mgmt", "address": "10.77.1.11", "prefixlen": 24},
        {"iface": "c12", "address": "10.77.64.1", "prefixlen": 30},
        {"iface": "c13", "address": "10.77.64.5", "prefixlen": 30},
    ]
    b = [
        {"iface": "mgmt", "address": "10.77.1.12", "prefixlen": 24},
        {"iface": "c12", "address": "10.77.64.2", "prefixlen": 30},
        {"iface": "lo", "address": "127.0.0.1", "prefixlen": 8},
    ]
    assert links.pick_address(b, a, {"10.77.64.2"}) == ("10.77.64.2", "c12", "c12")
    assert links.pick_address(b, a, {"10.77.64.1"}) == ("10.77.64.2", "c12", "c12")
    assert links.pick_address(b, a[1:2], set()) == ("10.77.64.2", "c12", "c12")
    assert links.pick_address(b[2:], a, set()) is None


def report() -> LinkReport:
    rs = links.judge(
        [
            rec("mac1", "mac2", 18.0, src_rank=0, dst_rank=1),
            rec("mac1", "mac3", 17.5, src_rank=0, dst_rank=2),
            rec("mac2", "mac3", 0.4, src_rank=1, dst_rank=2),
        ]
    )
    return LinkReport(["mac1", "mac2", "mac3"], rs, backend="ring", advice="use ring")


def test_report_text_html_and_heatmap() -> None:
    r = report()
    text = r.text()
    assert "links: 3 measured, 1 flagged, 3 hosts, backend ring" in text
    assert "mac2 -> mac3" in text and "advice: use ring" in text
    assert r.matrix()[1][2] == r.matrix()[2][1] == 0.4
    svg = r.heatmap_svg()
    ET.fromstring(svg)  # well-formed
    assert svg.count('stroke="#c00"') == 2  # the flagged pair, both cells
    page = r.html()
    assert "<table" in page and "<svg" in page and "background:#fdd" in page
    assert r.flagged()[0].as_dict()["src"] == "mac2"


def test_topology_from_rdma_rows_and_measurements() -> None:
    p = read_hostfile(os.path.join(FIXTURES, "jaccl-ring-4-two-cables.json"))
    es = topology.edges(p)
    assert [(e.a, e.b) for e in es] == [(0, 1), (0, 3), (1, 2), (2, 3)]
    assert es[0].cables == ("rdma_en1", "rdma_en3")
    ring = read_hostfile(os.path.join(FIXTURES, "ring-4.json"))
    assert [(e.a, e.b) for e in topology.edges(ring)] == [(0, 1), (0, 3), (1, 2), (2, 3)]
    three = parse_hostfile_text(json.dumps([{"ssh": f"mac{i}"} for i in (1, 2, 3)]))
    svg = topology.topology_svg(three, report().records)
    ET.fromstring(svg)
    assert svg.count('class="flagged"') == 1 and "0.40 Gb/s" in svg
    text = topology.topology_text(three, report().records)
    assert "mac2 -- mac3  0.40 Gb/s  FLAGGED" in text
    assert "mac1 -- mac2  18.0 Gb/s" in text


def test_measure_a_local_cluster(no_leaks: None) -> None:
    from mlx_cluster_magic.cluster import MLXCluster

    with MLXCluster(n=2, live_status=False) as c:
        r = links.measure(c.view, c.placement, c.ranks, timeout=10)
    assert "no links between hosts" in (r.note or "")
    (only,) = r.records
    assert only.kind == "loopback" and only.interface == "lo"
    assert only.latency_s and only.gbit_s and only.tcp_gbit_s
    assert r.elapsed_s < 10
