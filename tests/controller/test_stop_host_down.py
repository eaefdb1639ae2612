"""`berthctl stop` of a container whose host goes down while Stop waits for its agent's word (the host's lease
expires, and no word comes until the host is back) is answered at once, as the stop of a container whose host is
down already is since 7804f66: the container as it is (lost, "host n1 is down"; the host's agent carries the stop
out when it is back). It waited the stop timeout + 30 s and failed DEADLINE_EXCEEDED. The host's lease expires for
real in etcd: its heartbeats stop once Stop has found the host up. Real gRPC server, etcd and cluster cache, and
without the cache (Stop reads etcd); the agent's report recorded as the Dispatcher records it."""

from __future__ import annotations

import asyncio

import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from tests.controller.conftest import cache_on, heartbeats, served, until

RUNNING = t.ContainerStatus(state=t.STATE_RUNNING, generation=1, seq=1 << 32 | 1)
LEASE_TTL_S = 2


async def _host_dies(url: str, monkeypatch: pytest.MonkeyPatch, cached: bool) -> None:
    async with cache_on(url) as (store, cache, _):
        metrics = ControllerMetrics()
        orchestrator = Orchestrator(store, metrics)
        if cached:
            orchestrator.cache = cache
        api = ControlAPI(store, orchestrator, metrics)
        name = f"host-dies-{int(cached)}"
        c = t.Container(id=f"{int(cached) + 21:064x}", node_id="n1", desired_state=t.DESIRED_RUNNING, generation=1,
                        spec=t.ContainerSpec(name=name, image="busybox"))
        lease = await store.grant_lease(LEASE_TTL_S)
        beating = asyncio.create_task(heartbeats(store, lease, LEASE_TTL_S))
        stop: asyncio.Task[t.Container] | None = None
        try:
            await store.put_node(t.Node(id="n1", name="n1", lease_id=lease, capacity=t.Resources(memory_bytes=1 << 30)))
            await until(lambda: "n1" in cache.alive and "n1" in cache.nodes, "the host in the cache")
            assert await store.create_placed([c])  # run -d
            assert await orchestrator.on_status(c.id, RUNNING)  # its agent's report
            host_ready, looks = api._host_ready, []

            async def then_the_host_dies(node_id: str) -> bool:  # Stop found its host up and waits for its agent
                ready = await host_ready(node_id)
                looks.append(ready)
                if len(looks) == 1:  # Stop looks again once the lease expired (test_stop_host_blip.py)
                    assert ready, "the host was down before Stop waited"
                    beating.cancel()  # the host dies: its lease is no longer kept alive, and expires
                return ready

            monkeypatch.setattr(api, "_host_ready", then_the_host_dies)
            async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, ch):
                stub = control_pb2_grpc.ControlStub(ch)

                async def stop_it() -> t.Container:
                    return await stub.Stop(control_pb2.StopRequest(ref=name, timeout_s=600))

                stop = asyncio.create_task(stop_it())
                done, _ = await asyncio.wait([stop], timeout=60)  # before the fix: waited 630 s
                assert done, "Stop still waits for the agent of a host whose lease expired"
                stopped = stop.result()
            assert (stopped.id, stopped.desired_state) == (c.id, t.DESIRED_STOPPED)
            assert (stopped.status.state, stopped.status.message) == (t.STATE_LOST, "host n1 is down"), stopped.status
            assert (await store.get_container(c.id)).container.desired_state == t.DESIRED_STOPPED  # recorded
            assert looks == [True, False]  # up when Stop waited, down when it looked again
        finally:
            for task in (beating, stop):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await store.revoke_lease(lease)


def test_stop_ends_when_the_host_goes_down_while_it_waits(etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_host_dies(etcd_url, monkeypatch, cached=True))


def test_stop_ends_when_the_host_goes_down_while_it_waits_without_the_cache(etcd_url: str,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_host_dies(etcd_url, monkeypatch, cached=False))
