"""Sync's route from addresses alone: who sends to whom for the cablings people build."""

from __future__ import annotations

from mlx_cluster_magic.fabric.sync_plan import HEAD, Node, plan

MGMT = {"en0": ["192.168.1.2/24"]}  # the notebook's machine on Wi-Fi only


def _ring(n: int) -> list[Node]:
    """Macs in a ring, one /30 per cable (cable k joins k and k+1), as distributed_config."""
    nodes = []
    for i in range(n):
        left, right = (i - 1) % n, i
        ifs = [f"192.168.1.{10 + i}/24", f"10.0.{left}.2/30", f"10.0.{right}.1/30"]
        nodes.append(Node(f"mac{i + 1}", (f"10.0.{left}.2",), tuple(ifs)))
    return nodes


def test_a_ring_with_the_notebook_off_the_cables_is_a_chain_entered_once() -> None:
    nodes = _ring(4)
    entry = [f"192.168.1.{10 + i}" for i in range(4)]
    route = plan(nodes, MGMT, [], entry)
    assert route.parent == (HEAD, 0, 1, 2)
    assert route.via_management == (True, False, False, False)
    assert route.address[0] == "192.168.1.10"
    # each host listens on its end of the cable from its upstream
    assert route.address[1:] == ("10.0.0.2", "10.0.1.2", "10.0.2.2")
    assert route.describe() == (
        "this machine -> mac1 (over the network ssh uses) -> mac2 -> mac3 -> mac4"
    )


def test_a_split_star_enters_at_the_master_which_feeds_every_worker() -> None:
    master = Node(
        "mac1",
        ("10.0.0.1", "10.0.1.1", "10.0.2.1"),
        ("192.168.1.10/24", "10.0.0.1/30", "10.0.1.1/30", "10.0.2.1/30"),
    )
    workers = [
        Node(f"mac{k + 2}", (f"10.0.{k}.2",), (f"192.168.1.{11 + k}/24", f"10.0.{k}.2/30"))
        for k in range(3)
    ]
    # the master is listed last: the route still enters there
    nodes = [*workers, master]
    route = plan(nodes, MGMT, [], [f"192.168.1.{11 + k}" for k in range(3)] + ["192.168.1.10"])
    assert route.parent == (3, 3, 3, HEAD)
    assert route.describe() == (
        "this machine -> mac1 (over the network ssh uses) -> {mac2, mac3, mac4}"
    )


def test_a_notebook_bridging_a_cable_to_each_host_sends_to_all_at_once() -> None:
    head = {**MGMT, "bridge0": ["10.0.0.1/24"]}
    nodes = [
        Node(f"mac{i}", (f"10.0.0.{i + 1}",), (f"192.168.1.{10 + i}/24", f"10.0.0.{i + 1}/24"))
        for i in range(1, 4)
    ]
    route = plan(nodes, head, ["bridge0"], ["x"] * 3)
    assert route.parent == (HEAD, HEAD, HEAD)
    assert route.address == ("10.0.0.2", "10.0.0.3", "10.0.0.4")
    # the same network through one switch port of the notebook's (not a bridge): a chain, so
    # the notebook's one link carries each byte once
    switched = plan(nodes, {"en0": ["10.0.0.1/24"]}, [], ["x"] * 3)
    assert switched.parent == (HEAD, 0, 1)


def test_ranks_on_this_machine_hear_it_over_loopback() -> None:
    nodes = [Node("localhost", (), (), local=True), *_ring(3)]
    route = plan(nodes, MGMT, [], ["127.0.0.1"] + [f"192.168.1.{10 + i}" for i in range(3)])
    assert route.parent[0] == HEAD and route.address[0] == "127.0.0.1"
    assert route.parent[1:] == (HEAD, 1, 2)
    assert route.subtree(1) == [2, 3]
