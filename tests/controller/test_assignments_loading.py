"""An agent's assignment stream opened while the controller's cluster cache is still loading (issue 6, keys: the
stream waits for it up to CACHE_WAIT_S) and given up by the agent meanwhile leaves nothing counted: the
controller's berth_agent_sessions gauge (agents with an open stream) goes back down. Real etcd, a real gRPC
server and client."""

from __future__ import annotations

import asyncio

from berth.api import dispatcher_pb2 as d
from controller.cache import ClusterCache
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from tests.controller.conftest import dispatcher_on, store_on, until


async def _given_up_while_loading(url: str) -> None:
    async with store_on(url) as (store, _):
        orchestrator = Orchestrator(store, ControllerMetrics())
        orchestrator.cache = ClusterCache(store)  # never loaded here: every stream waits for it
        metrics = ControllerMetrics()
        async with dispatcher_on(store, orchestrator, metrics) as (_, stub):
            sessions = metrics.agent_sessions
            call = stub.Assignments(d.AssignmentsRequest(node_id="n1"))
            await until(lambda: sessions._value.get() == 1, "the stream counted while it waits for the cache")
            call.cancel()  # the agent gives up (its controller seemed stuck) and goes to another
            await until(lambda: sessions._value.get() == 0, "the given-up stream no longer counted")


def test_a_stream_given_up_while_the_cache_loads_is_not_counted_for_ever(etcd_url: str) -> None:
    asyncio.run(_given_up_while_loading(etcd_url))

