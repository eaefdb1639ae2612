"""The cluster cache's indexes of what is placed on each host, as placements are applied (session 6)."""

from __future__ import annotations

from berth.api import types_pb2 as t
from controller.cache import ClusterCache
from controller.store import Store

GIB = 1 << 30


def test_a_placement_seen_from_the_watch_first_is_not_indexed_again_by_its_reply() -> None:
    """The watch's event of a placement usually comes before the transaction's reply (session 6): the cache
    indexes it once; the reply's put of the same revision changes nothing (a later one does)."""
    cache = ClusterCache(Store("http://127.0.0.1:1"))  # never connected: fed by hand
    cache._put_node(t.Node(id="a", name="a", capacity=t.Resources(memory_bytes=GIB)), 1)
    c = t.Container(id="x", node_id="a", desired_state=t.DESIRED_RUNNING, spec=t.ContainerSpec(memory_bytes=GIB // 4))
    from_watch = t.Container()
    from_watch.CopyFrom(c)
    cache.put_container(from_watch, 5)
    [view] = cache.hosts()
    assert (view.containers, view.allocated_memory) == (1, GIB // 4)
    cache.put_container(c, 5)  # the transaction's reply, same revision
    held = cache.container("x")
    assert held is not None and held.container is from_watch and cache.hosts()[0] is view
    moved = t.Container()
    moved.CopyFrom(c)
    moved.desired_state = t.DESIRED_STOPPED
    cache.put_container(moved, 6)
    assert (cache.hosts()[0].containers, cache.hosts()[0].allocated_memory) == (0, 0)


def test_heal_looks_at_the_containers_of_hosts_down_drained_or_gone_only() -> None:
    """The leader's heal skips a live, known, undrained host on the cache's sets alone (session 6): the drained
    set follows the nodes' availability as they are put and removed."""
    from controller.orchestrator import _cached_on_hosts
    from controller.store import NODES

    cache = ClusterCache(Store("http://127.0.0.1:1"))
    for name in ("up", "down", "drained", "paused"):
        cache._put_node(t.Node(id=name, name=name, availability=t.AVAILABILITY_DRAIN if name == "drained" else
                               t.AVAILABILITY_PAUSE if name == "paused" else t.AVAILABILITY_ACTIVE), 1)
    cache.alive.update({"up", "drained", "paused"})
    for i, node_id in enumerate(("up", "down", "drained", "paused", "gone")):
        cache.put_container(t.Container(id=f"c-{node_id}", node_id=node_id, desired_state=t.DESIRED_RUNNING), 2 + i)
    assert cache.drained == {"drained"}
    assert [(v.container.id, alive) for v, _, alive in _cached_on_hosts(cache)] == [
        ("c-down", False), ("c-drained", True), ("c-gone", False)]
    cache._put_node(t.Node(id="drained", name="drained", availability=t.AVAILABILITY_ACTIVE), 10)
    cache._put_node(t.Node(id="up", name="up", availability=t.AVAILABILITY_DRAIN), 11)
    assert cache.drained == {"up"}
    assert [v.container.id for v, _, _ in _cached_on_hosts(cache)] == ["c-up", "c-down", "c-gone"]
    cache._apply(False, NODES + b"up", b"", 12)  # node rm
    assert cache.drained == set()
    assert [v.container.id for v, node, _ in _cached_on_hosts(cache)] == ["c-up", "c-down", "c-gone"]
