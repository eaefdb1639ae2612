"""Status reports in flight are written together (issue 6: Orchestrator.on_statuses' group commit), up to
--max-txn-ops of them in one etcd transaction. A status can be large: a container with a health check carries
its last 5 results, each with up to 4 KiB of the check's output (berth.healthcheck, as Docker: `curl` of a page
prints it). Many such reports at once made one transaction bigger than etcd accepts (--max-request-bytes,
1.5 MiB by default): etcd refused it, every report of it failed, and the agents sent them again, together
again (with lazy acks each failed commit also ended those agents' sessions). Real etcd."""

from __future__ import annotations

import asyncio
import secrets

from berth import healthcheck
from berth.api import types_pb2 as t
from berthctl.dev import etcd
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from tests.controller.conftest import cache_on, until

REPORTS = 120  # under --max-txn-ops (128): one transaction before the fix


def _healthy(cid: str) -> t.ContainerStatus:
    output = ("<html>" + "x" * healthcheck.MAX_OUTPUT)[:healthcheck.MAX_OUTPUT]
    health = t.Health(status="healthy", log=[t.HealthResult(exit_code=0, output=output)
                                             for _ in range(healthcheck.LOG_ENTRIES)])
    return t.ContainerStatus(state=t.STATE_RUNNING, generation=1, pid=1, health=health, seq=1 << 32 | 1)


async def _many_large_reports(url: str) -> None:
    async with cache_on(url) as (store, cache, _):
        orchestrator = Orchestrator(store, ControllerMetrics())
        orchestrator.cache = cache
        cids = [secrets.token_hex(32) for _ in range(REPORTS)]
        for cid in cids:
            await store.create_container(t.Container(
                id=cid, spec=t.ContainerSpec(name=f"h{cid[:8]}", image="busybox"), node_id="n1",
                desired_state=t.DESIRED_RUNNING, generation=1))
        await until(lambda: all(cache.status(cid) is not None for cid in cids), "the containers in the cache")
        reports = [(cid, _healthy(cid)) for cid in cids]
        assert sum(s.ByteSize() for _, s in reports) > 2 * 1024 * 1024  # more than etcd takes in one request
        try:
            # every agent's report at once, as their streams deliver them
            await asyncio.wait_for(asyncio.gather(*(orchestrator.on_statuses([r]) for r in reports)), 30)
        finally:
            for task in list(orchestrator._tasks):  # the group commits in flight
                task.cancel()
            await asyncio.gather(*orchestrator._tasks, return_exceptions=True)
        for cid in cids:
            status, _ = await store.get_status(cid)
            assert status.state == t.STATE_RUNNING and len(status.health.log) == healthcheck.LOG_ENTRIES, cid


def test_many_large_reports_at_once_are_all_recorded(etcd_url: str) -> None:
    asyncio.run(_many_large_reports(etcd_url))


async def _many_reports_of_held_statuses(url: str) -> None:
    """Each report compares two keys (its container's and its status's revisions): etcd bounds the compares
    by --max-txn-ops as it does the puts. With the controller's --max-txn-ops at etcd's (the dev cluster's 1,024),
    more than half that many reports at once made a transaction of over 1,024 compares, which etcd refused
    whole ("too many operations in txn request"): every report of it failed and the agents' sessions ended
    (seen in bench/schedule.py at 1,000 in flight)."""
    async with cache_on(url) as (store, cache, _):
        orchestrator = Orchestrator(store, ControllerMetrics())
        orchestrator.cache = cache
        orchestrator.max_txn_ops = etcd.MAX_TXN_OPS  # as berth-controller --max-txn-ops, set to etcd's
        cids = [secrets.token_hex(32) for _ in range(etcd.MAX_TXN_OPS * 3 // 4)]
        for cid in cids:
            await store.create_container(t.Container(
                id=cid, spec=t.ContainerSpec(name=f"r{cid[:8]}", image="busybox"), node_id="n1",
                desired_state=t.DESIRED_RUNNING, generation=1))
        await until(lambda: all(cache.status(cid) is not None for cid in cids), "the containers in the cache")
        assert all(cache.statuses.get(cid) for cid in cids)  # a status held each: two compares per report
        running = t.ContainerStatus(state=t.STATE_RUNNING, generation=1, pid=1, seq=1 << 32 | 1)
        try:
            await asyncio.wait_for(asyncio.gather(*(orchestrator.on_statuses([(cid, running)]) for cid in cids)), 30)
        finally:
            for task in list(orchestrator._tasks):
                task.cancel()
            await asyncio.gather(*orchestrator._tasks, return_exceptions=True)
        for cid in cids:
            status, _ = await store.get_status(cid)
            assert status.state == t.STATE_RUNNING, cid


def test_reports_at_once_stay_under_etcds_compare_limit(etcd_url: str) -> None:
    asyncio.run(_many_reports_of_held_statuses(etcd_url))
