"""`berthctl stop` of a container not started yet (assigned: placed, no report; preparing) whose host is down is
answered as the stop of a running one is since 7804f66: lost, "host n1 is down", so berthctl warns that the stop is
done when the host is back. It was answered as it was (assigned/preparing), and berthctl printed nothing (review,
session 7). The host's lease is revoked for real in etcd. Real gRPC server, etcd and cluster cache, and without."""

from __future__ import annotations

import asyncio

import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from tests.controller.conftest import cache_on, served, until

PREPARING = t.ContainerStatus(state=t.STATE_PREPARING, generation=1, seq=1 << 32 | 1)


async def _stop_not_started(url: str, cached: bool, preparing: bool) -> None:
    async with cache_on(url) as (store, cache, _):
        metrics = ControllerMetrics()
        orchestrator = Orchestrator(store, metrics)
        if cached:
            orchestrator.cache = cache
        api = ControlAPI(store, orchestrator, metrics)
        name = f"stop-not-started-{int(cached)}{int(preparing)}"
        c = t.Container(id=f"{int(cached) * 2 + int(preparing) + 61:064x}", node_id="n1",
                        desired_state=t.DESIRED_RUNNING, generation=1, spec=t.ContainerSpec(name=name, image="busybox"))
        lease = await store.grant_lease(60)
        try:
            await store.put_node(t.Node(id="n1", name="n1", lease_id=lease, capacity=t.Resources(memory_bytes=1 << 30)))
            await until(lambda: "n1" in cache.alive and "n1" in cache.nodes, "the host in the cache")
            assert await store.create_placed([c])  # run -d: assigned, no status key yet
            if preparing:
                assert await orchestrator.on_status(c.id, PREPARING)  # its agent pulls the image
            await store.revoke_lease(lease)  # the host goes down
            await until(lambda: "n1" not in cache.alive, "the host down in the cache")
            async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, ch):
                stopped = await control_pb2_grpc.ControlStub(ch).Stop(control_pb2.StopRequest(ref=name, timeout_s=5))
            assert (stopped.id, stopped.desired_state) == (c.id, t.DESIRED_STOPPED)
            assert (stopped.status.state, stopped.status.message) == (t.STATE_LOST, "host n1 is down"), stopped.status
            assert (await store.get_container(c.id)).container.desired_state == t.DESIRED_STOPPED  # recorded
        finally:
            await store.revoke_lease(lease)


@pytest.mark.parametrize(("cached", "preparing"), [(True, False), (False, False), (True, True)],
                         ids=["assigned-cache", "assigned-no-cache", "preparing-cache"])
def test_stop_of_a_container_not_started_on_a_down_host_shows_lost(etcd_url: str, cached: bool,
                                                                   preparing: bool) -> None:
    asyncio.run(_stop_not_started(etcd_url, cached, preparing))
