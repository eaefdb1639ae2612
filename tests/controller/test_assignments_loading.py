"""An agent's assignment stream opened while the controller's cluster cache is still loading (issue 6, keys: the
stream waits for it up to CACHE_WAIT_S) and given up by the agent meanwhile leaves nothing counted: the
controller's berth_agent_sessions gauge (agents with an open stream) goes back down. Real etcd, a real gRPC
server and client."""

from __future__ import annotations

import asyncio

from berth import rpc
from berth.api import dispatcher_pb2 as d
from berth.api import dispatcher_pb2_grpc
from controller.cache import ClusterCache
from controller.dispatcher import Dispatcher
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from tests.controller.conftest import HOST, store_on, until


async def _given_up_while_loading(url: str) -> None:
    async with store_on(url) as (store, _):
        orchestrator = Orchestrator(store, ControllerMetrics())
        orchestrator.cache = ClusterCache(store)  # never loaded here: every stream waits for it
        metrics = ControllerMetrics()
        server = rpc.aio_server()
        dispatcher_pb2_grpc.add_DispatcherServicer_to_server(Dispatcher(store, orchestrator, metrics, 5), server)
        port = rpc.bind(server, f"{HOST}:0")
        await server.start()
        channel = rpc.aio_channel(f"{HOST}:{port}")
        try:
            sessions = metrics.agent_sessions
            call = dispatcher_pb2_grpc.DispatcherStub(channel).Assignments(d.AssignmentsRequest(node_id="n1"))
            await until(lambda: sessions._value.get() == 1, "the stream counted while it waits for the cache")
            call.cancel()  # the agent gives up (its controller seemed stuck) and goes to another
            await until(lambda: sessions._value.get() == 0, "the given-up stream no longer counted")
        finally:
            await channel.close()
            await server.stop(0)


def test_a_stream_given_up_while_the_cache_loads_is_not_counted_for_ever(etcd_url: str) -> None:
    asyncio.run(_given_up_while_loading(etcd_url))

