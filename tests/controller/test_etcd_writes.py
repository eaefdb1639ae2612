"""What the controller writes to etcd per container (issue 6, throughput), on a real etcd: a Run group-committed
on the leader is stored already placed, each of its keys written once, and the events stream still says
create then assign; a removal takes the container, its keys and its name in one transaction."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from berth.api import types_pb2 as t
from controller.events import translate_all
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import ASSIGNMENTS, Conflict, container_key, name_key, status_key
from tests.controller.conftest import cache_on, store_on, until

MIB = 1 << 20


def _container(name: str, memory: int) -> t.Container:
    return t.Container(id=secrets.token_hex(32), spec=t.ContainerSpec(name=name, image="busybox", memory_bytes=memory),
                       desired_state=t.DESIRED_RUNNING, generation=1)


async def _created_placed(url: str) -> None:
    async with cache_on(url) as (store, cache, client):
        orchestrator = Orchestrator(store, ControllerMetrics())
        orchestrator.cache = cache
        tasks: list[asyncio.Task[None]] = []
        try:
            lease = await store.grant_lease(60)
            await store.put_node(t.Node(id="n1", name="n1", lease_id=lease,
                                        capacity=t.Resources(memory_bytes=1024 * MIB, nano_cpus=8 * 10**9)))
            await until(lambda: [h.id for h in cache.hosts() if h.ready] == ["n1"], "the host in the cache")
            tasks.append(asyncio.create_task(orchestrator.lead(period_s=0.05)))
            await until(lambda: orchestrator.kick is not None, "leading")
            start = await store.revision()

            fits = [_container(f"fits{i}", 64 * MIB) for i in range(12)]  # 12 x 64 MiB: 768 of 1024 MiB
            too_big = _container("too-big", 512 * MIB)  # placed last in its batch: what is left does not hold it
            results = await asyncio.gather(*(orchestrator.create_and_place(c) for c in (*fits, too_big)))
            assert all(r.node_id == "n1" for r in results[:12]), results
            assert not results[12].node_id and "memory" in results[12].pending_reason, results[12]

            for c in fits:  # each key written once: created placed, not created pending and then placed
                got = {key: (await client.get(key)) for key in (container_key(c.id), name_key(c.spec.name))}
                assert all(kv is not None and kv.version == 1 for kv in got.values()), (c.spec.name, got)
                assert bytes(got[name_key(c.spec.name)].value).decode() == c.id
                # issue 6: no status key before the first report, no assignment key: the container implies both
                assert await client.get(status_key(c.id)) is None
            assert not list(await client.get_prefix(ASSIGNMENTS))
            kv = await client.get(container_key(too_big.id))
            assert kv is not None and kv.version == 1  # its pending reason came with its creation
            views = {v.container.id: v.container.status for v in await store.list_containers()}
            assert all((views[c.id].state, views[c.id].generation) == (t.STATE_ASSIGNED, 1) for c in fits), views
            assert views[too_big.id].state == t.STATE_PENDING
            assert await cache.consistent()
            cached = {v.container.id: v.container.status.state for v in cache.with_status([too_big.id, fits[0].id])}
            assert cached == {too_big.id: t.STATE_PENDING, fits[0].id: t.STATE_ASSIGNED}

            # The first report of a container without a status key is written (compared absent) and seen.
            running = t.ContainerStatus(state=t.STATE_RUNNING, generation=1, pid=7)
            await orchestrator.on_statuses([(fits[0].id, running)])
            status, _ = await store.get_status(fits[0].id)
            assert (status.state, status.pid) == (t.STATE_RUNNING, 7)

            # The events of the creations: create then assign (same revision) for the placed ones, create alone
            # for the pending one.
            wanted = {c.id for c in (*fits, too_big)}
            actions: dict[str, list[str]] = {}
            async with asyncio.timeout(20):
                async for change in store.watch_changes(start):
                    for event in translate_all(change):
                        if event.id in wanted and event.action in ("create", "assign"):
                            actions.setdefault(event.id, []).append(event.action)
                            if event.action == "assign":
                                assert (event.attributes["node"], event.revision) == ("n1", change.revision)
                    if container_key(too_big.id) == change.key:
                        break
            assert all(actions[c.id] == ["create", "assign"] for c in fits), actions
            assert actions[too_big.id] == ["create"], actions[too_big.id]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def test_a_group_committed_run_is_created_placed_each_key_written_once(etcd_url: str) -> None:
    asyncio.run(_created_placed(etcd_url))


async def _removed_in_one_write(url: str) -> None:
    async with store_on(url) as (store, client):
        c = _container("gone", 0)
        c.node_id = "n1"
        await store.create_container(c)
        v = await store.get_container(c.id)
        # changed since read: nothing goes, its name included
        newer = t.Container()
        newer.CopyFrom(c)
        newer.pending_reason = "changed"
        await store.update_container(v, newer)
        with pytest.raises(Conflict):
            await store.delete_container(v)
        assert await client.get(name_key("gone")) is not None
        start = await store.revision()
        await store.delete_container(await store.get_container(c.id))
        deleted: dict[bytes, int] = {}
        watch = await client.watch_prefix(b"/berth/", start_revision=start + 1)
        async with asyncio.timeout(20):
            async for event in watch:
                deleted[bytes(event.kv.key)] = int(event.kv.mod_revision)
                if len(deleted) == 3:
                    break
        await watch.cancel()
        # container, status and name deleted by one transaction: one revision
        assert set(deleted) == {container_key(c.id), status_key(c.id), name_key("gone")}, deleted
        assert len(set(deleted.values())) == 1, deleted

        # A name that is not the container's (left by something else) is not taken with it.
        other = _container("kept", 0)
        await store.create_container(other)
        await client.put(name_key("kept"), b"someone-else")
        await store.delete_container(await store.get_container(other.id))
        kv = await client.get(name_key("kept"))
        assert kv is not None and bytes(kv.value) == b"someone-else"
        assert await client.get(container_key(other.id)) is None


def test_a_container_and_its_name_are_removed_in_one_transaction(etcd_url: str) -> None:
    asyncio.run(_removed_in_one_write(etcd_url))
