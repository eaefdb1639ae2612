"""A Run group-committed on the leader is created without a status key (issue 6: one put fewer per container):
its status is what the container implies until its agent's first report. Real etcd: the views show it assigned
(or pending), the first report is written over no status (compared absent), and a removal before any report is
seen by the Run waiting on the cache and by a status watch on etcd alone (`wait`, `start` without a cache)."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import NotFound, status_key
from tests.controller.conftest import cache_on, until


async def _removed_before_its_first_report(url: str) -> None:
    async with cache_on(url) as (store, cache, client):
        orchestrator = Orchestrator(store, ControllerMetrics())
        orchestrator.cache = cache
        lead = asyncio.create_task(orchestrator.lead(period_s=0.05))
        try:
            lease = await store.grant_lease(60)
            await store.put_node(t.Node(id="n1", name="n1", lease_id=lease,
                                        capacity=t.Resources(memory_bytes=1 << 30, nano_cpus=10**9)))
            await until(lambda: [h.id for h in cache.hosts() if h.ready] == ["n1"] and orchestrator.kick is not None,
                        "the host in the cache, leading")
            cid = secrets.token_hex(32)
            c = t.Container(id=cid, spec=t.ContainerSpec(name="early", image="busybox"),
                            desired_state=t.DESIRED_RUNNING, generation=1)
            waiter = cache.status_waiter(cid)  # as Run opens it, before the container exists
            assert waiter is not None
            placed = await orchestrator.create_and_place(c)
            assert placed.node_id == "n1"
            assert await client.get(status_key(cid)) is None  # created placed: no status key
            watch = store.watch_status(cid, await store.revision())
            removal = asyncio.ensure_future(anext(watch))
            await orchestrator.remove(cid)
            with pytest.raises(NotFound):
                await waiter.wait(1, (t.STATE_RUNNING,), timeout_s=20)
            waiter.close()
            event = await asyncio.wait_for(removal, 20)
            assert event.status is None, event
            await watch.aclose()  # type: ignore[attr-defined]
        finally:
            lead.cancel()
            await asyncio.gather(lead, return_exceptions=True)


def test_a_run_removed_before_its_first_report_ends_the_waits_on_it(etcd_url: str) -> None:
    asyncio.run(_removed_before_its_first_report(url=etcd_url))
