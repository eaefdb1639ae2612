"""The throughput path of issue 6 on a real etcd: the watch-fed cluster cache, Run calls group-committed on
the leader, and status reports written together, without giving up the compare on revisions."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from controller import cache as cache_module
from controller.cache import ClusterCache, RawAssignment
from controller.dispatcher import Dispatcher
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import (
    NameInUse,
    NotFound,
    Store,
    StoreError,
    Unavailable,
    container_key,
)
from tests.controller.conftest import cache_on, until, wipe_etcd
from tests.controller.test_race import _assignment_puts

MIB = 1 << 20


def _on(cid: str, node_id: str = "n1", generation: int = 1) -> bytes:
    """A container key's value: the container placed on a node (its assignment there, issue 6)."""
    return t.Container(id=cid, node_id=node_id, generation=generation,
                       desired_state=t.DESIRED_RUNNING).SerializeToString()


def _container(name: str, memory: int = 0) -> t.Container:
    return t.Container(id=secrets.token_hex(32), spec=t.ContainerSpec(name=name, image="busybox", memory_bytes=memory),
                       desired_state=t.DESIRED_RUNNING, generation=1)


async def _cache_follows(url: str) -> None:
    store = Store(url)
    await store.connect()
    cache = ClusterCache(store)
    follower = asyncio.create_task(cache.run())
    try:
        await asyncio.wait_for(cache.wait_ready(), 10)
        lease = await store.grant_lease(60)
        await store.put_node(t.Node(id="n1", name="n1", lease_id=lease,
                                    capacity=t.Resources(memory_bytes=1 << 30, nano_cpus=10**9)))
        c = _container("cache-a", memory=64 * MIB)
        await store.create_container(c)
        await until(lambda: c.id in cache.pending and "n1" in cache.alive and "n1" in cache.nodes, "the new container")

        # Placed by another writer (not through this cache): seen through the watch, with its host's usage;
        # a status waiter opened on the cache before the write sees the status, and the removal.
        waiter = cache.status_waiter(c.id)
        assert waiter is not None
        v = await store.get_container(c.id)
        placed = t.Container()
        placed.CopyFrom(v.container)
        placed.node_id = "n1"
        revision = await store.update_container(v, placed,
                                                status=t.ContainerStatus(state=t.STATE_ASSIGNED, generation=1))
        await until(lambda: (e := cache.container(c.id)) is not None and e.mod_revision == revision, "the placement")
        [host] = cache.hosts()
        assert (host.ready, host.containers, host.allocated_memory) == (True, 1, 64 * MIB)
        assert c.id not in cache.pending and cache.on_node["n1"] == {c.id}
        status = cache.status(c.id)
        assert status is not None and status.state == t.STATE_ASSIGNED
        status = await waiter.wait(1, (t.STATE_ASSIGNED,), timeout_s=10)
        assert status.state == t.STATE_ASSIGNED and [s.state for s in waiter.history] == [t.STATE_ASSIGNED]
        with pytest.raises(TimeoutError):  # nothing running yet: the wait ends at its timeout
            await waiter.wait(1, (t.STATE_RUNNING,), timeout_s=0.05)

        # A write applied late, older than what the cache holds, changes nothing.
        cache.put_container(v.container, v.mod_revision)
        entry = cache.container(c.id)
        assert entry is not None and entry.container.node_id == "n1"

        # Deleted: gone with its usage, and an older write of ours applied after the deletion's event does
        # not bring it back.
        await store.delete_container(await store.get_container(c.id))
        await until(lambda: cache.container(c.id) is None, "the deletion")
        with pytest.raises(NotFound, match="was removed"):
            await waiter.wait(1, (t.STATE_RUNNING,), timeout_s=10)
        waiter.close()
        assert c.id not in cache._subscribers
        assert cache.hosts()[0].containers == 0 and cache.hosts()[0].allocated_memory == 0
        cache.put_container(placed, revision)
        assert cache.container(c.id) is None

        # The host's lease ends: it is not ready any more.
        await store.revoke_lease(lease)
        await until(lambda: "n1" not in cache.alive, "the host going down")
        assert not cache.hosts()[0].ready

        # The cache stops following etcd: a waiter still open fails with the reason instead of hanging.
        left = cache.status_waiter(c.id)
        assert left is not None
        follower.cancel()
        with pytest.raises(StoreError, match="stopped"):
            await left.wait(1, (t.STATE_RUNNING,), timeout_s=10)
    finally:
        follower.cancel()
        await wipe_etcd(url)
        await store.close()


def test_cache_follows_etcd_and_keeps_its_indexes(etcd_url: str) -> None:
    asyncio.run(_cache_follows(etcd_url))


async def _two_leaders(url: str) -> None:
    """Two controllers that both believe they lead (a stale leader and the new one), each with its cache:
    each group-commits its own Run calls, and both sweeps race over the same pending containers."""
    a, b = Store(url), Store(url)
    await a.connect()
    await b.connect()
    one, two = Orchestrator(a, ControllerMetrics()), Orchestrator(b, ControllerMetrics())
    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(3):
            lease = await a.grant_lease(60)
            await a.put_node(t.Node(id=f"h{i}", name=f"h{i}", lease_id=lease,
                                    capacity=t.Resources(memory_bytes=1 << 40, nano_cpus=64 * 10**9)))
        start = await a.revision()
        taken = _container("taken")
        await a.create_container(taken)
        swept = [_container(f"swept{i}") for i in range(150)]
        for c in swept:
            await a.create_container(c)
        for orchestrator, store in ((one, a), (two, b)):
            orchestrator.cache = ClusterCache(store)
            orchestrator.max_txn_ops = 16  # several transactions per batch
            tasks.append(asyncio.create_task(orchestrator.cache.run()))
            await asyncio.wait_for(orchestrator.cache.wait_ready(), 10)
            tasks.append(asyncio.create_task(orchestrator.lead(period_s=0.05)))
        await until(lambda: one.kick is not None and two.kick is not None, "both leading")

        runs = [(one if i % 2 else two, _container(f"run{i}")) for i in range(200)]
        clash = _container("taken")
        twins = [_container("twin"), _container("twin")]  # one name twice in one batch
        results = await asyncio.gather(*(o.create_and_place(c) for o, c in runs), one.create_and_place(clash),
                                       *(one.create_and_place(c) for c in twins), return_exceptions=True)
        assert isinstance(results[200], NameInUse), results[200]
        assert all(isinstance(r, t.Container) and r.node_id for r in results[:200]), "every Run is placed"
        twin_results = results[201:]
        assert sum(isinstance(r, NameInUse) for r in twin_results) == 1, twin_results
        [twin] = [r for r in twin_results if isinstance(r, t.Container)]
        assert twin.node_id

        ids = {c.id for _, c in runs} | {c.id for c in swept} | {taken.id, twin.id}
        await until(lambda: all((e := one.cache.container(cid)) is not None and e.container.node_id  # type: ignore[union-attr]
                                 for cid in ids), "the sweeps to place every pending container", timeout=30)
        placed = {v.container.id: v.container.node_id for v in await a.list_containers()}
        assert all(placed[cid] for cid in ids)

        # The agents report: every status is written, in batches, through either controller.
        await asyncio.gather(*((one if i % 2 else two).on_statuses(
            [(cid, t.ContainerStatus(state=t.STATE_RUNNING, generation=1))]) for i, cid in enumerate(sorted(ids))))
        stale = sorted(ids)[0]  # a report of an older run than the stored one is dropped
        v = await a.get_container(stale)
        newer = t.Container()
        newer.CopyFrom(v.container)
        newer.generation = 2
        await a.update_container(v, newer)
        await one.on_statuses([(stale, t.ContainerStatus(state=t.STATE_EXITED, generation=1))])
        for cid in ids:
            status, _ = await a.get_status(cid)
            assert status.state == t.STATE_RUNNING, cid
    except BaseException:
        await wipe_etcd(url)  # the keys of a failed run would be in the next test's way
        raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await a.close()
        await b.close()
    puts = await _assignment_puts(url, start)  # wipes the keys
    doubles = {cid: n for cid, n in puts.items() if n != 1}
    assert not doubles, f"{len(doubles)} containers were placed more than once"
    assert set(puts) == ids


def test_two_leaders_group_committing_never_place_a_container_twice(etcd_url: str) -> None:
    asyncio.run(_two_leaders(etcd_url))


async def _same_name_in_one_batch(url: str) -> None:
    """Two Run calls for one new name committed in the same group: one gets the name, the other NameInUse,
    and the other Run calls of the group are not failed with them."""
    store = Store(url)
    await store.connect()
    orchestrator = Orchestrator(store, ControllerMetrics())
    orchestrator.cache = ClusterCache(store)
    tasks = [asyncio.create_task(orchestrator.cache.run())]
    try:
        await asyncio.wait_for(orchestrator.cache.wait_ready(), 10)
        tasks.append(asyncio.create_task(orchestrator.lead(period_s=0.05)))
        await until(lambda: orchestrator.kick is not None, "leading")
        twins = [_container("twin"), _container("twin")]
        other = _container("other")
        results = await asyncio.gather(*(orchestrator.create_and_place(c) for c in (*twins, other)),
                                       return_exceptions=True)
        assert sorted(type(r).__name__ for r in results[:2]) == ["Container", "NameInUse"], results
        assert isinstance(results[2], t.Container), results[2]
        assert sorted(v.container.spec.name for v in await store.list_containers()) == ["other", "twin"]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wipe_etcd(url)
        await store.close()


def test_two_runs_of_one_new_name_in_one_group_commit(etcd_url: str) -> None:
    asyncio.run(_same_name_in_one_batch(etcd_url))


async def _stuck_session(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with cache_on(url) as (_, cache, client):
        monkeypatch.setattr(cache_module, "MAX_BEHIND", 2)
        follow = cache.follow_assignments("n1")
        assert follow is not None
        _, queue = follow
        for i in range(3):  # nobody reads the queue
            await client.put(container_key(f"c{i}"), _on(f"c{i}"))
        await until(lambda: queue.qsize() == 3, "the third change")
        got = [queue.get_nowait() for _ in range(3)]
        assert [e.container_id for e in got[:2] if isinstance(e, RawAssignment)] == ["c0", "c1"]
        assert isinstance(got[2], Unavailable) and "agent n1 is 2 assignment changes behind" in str(got[2])
        assert "n1" not in cache._sessions  # no more changes queued for it


def test_an_agent_session_that_stops_reading_is_ended_not_queued_for_ever(etcd_url: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_stuck_session(etcd_url, monkeypatch))


async def _queued_changes(url: str) -> None:
    """An agent session's stream from the cache: the changes queued when it gets to them go out in one
    message, in etcd's order, with the last one's revision; one older than the stream's start is skipped; a
    failure queued behind them ends the stream after they are sent."""
    async with cache_on(url) as (store, cache, client):
        follow = cache.follow_assignments("n1")
        assert follow is not None
        current, queue = follow
        await client.put(container_key("c0"), _on("c0"))
        for i in (1, 2):
            await client.put(container_key(f"c{i}"), _on(f"c{i}", generation=i))
        await client.delete(container_key("c1"))
        await until(lambda: queue.qsize() == 4, "the four changes")
        skipped = queue.get_nowait()  # the agent resumes after the first change: it is not sent again
        assert isinstance(skipped, RawAssignment)
        queue.put_nowait(skipped)
        dispatcher = Dispatcher(store, Orchestrator(store, ControllerMetrics()), ControllerMetrics(), 5)
        stream = dispatcher._from_cache(cache, "n1", skipped.revision, current, queue)
        msg = await anext(stream)
        assert msg.kind == d.AssignmentsMessage.INCREMENTAL
        assert [(c.action, c.container_id, c.assignment.generation) for c in msg.changes] == [
            (d.AssignmentChange.UPDATE, "c1", 1), (d.AssignmentChange.UPDATE, "c2", 2),
            (d.AssignmentChange.REMOVE, "c1", 0)]
        assert msg.revision == await store.revision()

        await client.put(container_key("c3"), _on("c3"))
        await until(lambda: queue.qsize() == 1, "the fifth change")
        queue.put_nowait(Unavailable("reloading"))
        msg = await anext(stream)
        assert [c.container_id for c in msg.changes] == ["c3"]
        with pytest.raises(Unavailable, match="reloading"):
            await anext(stream)
        assert "n1" not in cache._sessions


def test_an_agent_stream_sends_the_changes_queued_together(etcd_url: str) -> None:
    asyncio.run(_queued_changes(etcd_url))


async def _report_fails(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(url)
    await store.connect()
    orchestrator = Orchestrator(store, ControllerMetrics())
    orchestrator.cache = ClusterCache(store)
    follower = asyncio.create_task(orchestrator.cache.run())
    try:
        await asyncio.wait_for(orchestrator.cache.wait_ready(), 10)
        c = _container("reported")
        await store.create_container(c)
        await until(lambda: orchestrator.cache.container(c.id) is not None, "the container")  # type: ignore[union-attr]

        async def broken(items: object) -> int:
            raise RuntimeError("a bug in the batched write")

        monkeypatch.setattr(store, "put_statuses", broken)
        report = orchestrator.on_statuses([(c.id, t.ContainerStatus(state=t.STATE_RUNNING, generation=1))])
        with pytest.raises(RuntimeError, match="a bug in the batched write"):
            await asyncio.wait_for(report, 10)  # the agent's report fails; it does not hang
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await wipe_etcd(url)
        await store.close()


def test_a_batched_status_write_that_fails_unexpectedly_fails_its_reports(etcd_url: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_report_fails(etcd_url, monkeypatch))


async def _keep_alive_closes(url: str) -> None:
    store = Store(url)
    await store.connect()
    lease = await store.grant_lease(60)
    try:
        assert 0 < await store.keep_alive(lease) <= 60
        keeper = store._keeper  # type: ignore[attr-defined]
        assert keeper.task is not None and not keeper.task.done()
    finally:
        await store.revoke_lease(lease)
        await store.close()
    assert keeper.task.done()  # no stream task left behind by close


def test_the_shared_keep_alive_stream_ends_with_the_store(etcd_url: str) -> None:
    asyncio.run(_keep_alive_closes(etcd_url))


def test_the_host_index_follows_hosts_coming_and_going() -> None:
    """cache.host_index() gives each host's position in cache.hosts(), kept across usage changes and rebuilt
    when a host comes or goes (the admission batches find a decided host's view by it)."""
    cache = ClusterCache(Store("http://127.0.0.1:1"))  # never connected: fed by hand

    def positions() -> dict[str, int]:
        return {h.id: i for i, h in enumerate(cache.hosts())}

    for name in ("a", "b", "c"):
        cache._put_node(t.Node(id=name, name=name, capacity=t.Resources(memory_bytes=1 << 30)), 1)
    index = cache.host_index()
    assert index == positions() == {"a": 0, "b": 1, "c": 2}
    c = _container("indexed", memory=64 * MIB)
    c.node_id = "b"
    cache.put_container(c, 2)
    assert cache.host_index() is index and cache.hosts()[1].allocated_memory == 64 * MIB
    del cache.nodes["a"]
    cache._view("a")
    assert cache.host_index() == positions() == {"b": 0, "c": 1}
    cache._put_node(t.Node(id="d", name="d"), 3)
    assert cache.host_index() == positions() == {"b": 0, "c": 1, "d": 2}
