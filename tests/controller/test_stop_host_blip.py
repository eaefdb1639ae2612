"""`berthctl stop` whose container's host loses its lease while Stop waits for its agent, and has it again at once
(its lease expired and its next heartbeat was given a new one: a blip, as on a loaded controller), goes on waiting
for the agent, which is up and stops the container: answered as it ended. Since 8cd5ca7 the lease key's deletion
ended the wait at once and Stop answered the container as it was then, running with no wait and no warning (or lost,
"host n1 is down", for a host that was up); only a host still down when Stop looks again is answered at once
(test_stop_host_down.py). Real gRPC server, etcd and cluster cache, and without the cache (Stop reads etcd); the
agent's report recorded as the Dispatcher records it (review, session 7)."""

from __future__ import annotations

import asyncio

import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from tests.controller.conftest import cache_on, served, until

RUNNING = t.ContainerStatus(state=t.STATE_RUNNING, generation=1, seq=1 << 32 | 1)
EXITED = t.ContainerStatus(state=t.STATE_EXITED, generation=1, exit_code=143, seq=1 << 32 | 2)


def _node(lease: int) -> t.Node:
    return t.Node(id="n1", name="n1", lease_id=lease, capacity=t.Resources(memory_bytes=1 << 30))


async def _blip(url: str, monkeypatch: pytest.MonkeyPatch, cached: bool) -> None:
    async with cache_on(url) as (store, cache, _):
        metrics = ControllerMetrics()
        orchestrator = Orchestrator(store, metrics)
        if cached:
            orchestrator.cache = cache
        api = ControlAPI(store, orchestrator, metrics)
        host_ready = api._host_ready
        waits, back, looked_again = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def ready_then_looked_again(node_id: str) -> bool:
            if not waits.is_set():  # Stop recorded the stop and looks whether the host is up: it is, it waits
                ready = await host_ready(node_id)
                assert ready, "the host was down before Stop waited"
                waits.set()
                return ready
            await back.wait()  # Stop looks again once the host lost its lease: it has a new one by then
            ready = await host_ready(node_id)
            looked_again.set()
            return ready

        monkeypatch.setattr(api, "_host_ready", ready_then_looked_again)
        name = f"blip-{int(cached)}"
        c = t.Container(id=f"{int(cached) + 51:064x}", node_id="n1", desired_state=t.DESIRED_RUNNING, generation=1,
                        spec=t.ContainerSpec(name=name, image="busybox"))
        leases = [await store.grant_lease(60)]
        stop: asyncio.Task[t.Container] | None = None
        looking = asyncio.ensure_future(looked_again.wait())
        try:
            await store.put_node(_node(leases[0]))
            await until(lambda: "n1" in cache.alive and "n1" in cache.nodes, "the host in the cache")
            assert await store.create_placed([c])  # run -d
            assert await orchestrator.on_status(c.id, RUNNING)  # its agent's report
            async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, ch):
                stub = control_pb2_grpc.ControlStub(ch)

                async def stop_it() -> t.Container:
                    return await stub.Stop(control_pb2.StopRequest(ref=name, timeout_s=600))

                stop = asyncio.create_task(stop_it())
                await asyncio.wait_for(waits.wait(), 20)
                await store.revoke_lease(leases[0])  # the blip: its lease key goes ...
                leases.append(await store.grant_lease(60))
                await store.put_node(_node(leases[1]))  # ... and comes back under a new lease (Dispatcher)
                back.set()
                await asyncio.wait([stop, looking], timeout=60, return_when=asyncio.FIRST_COMPLETED)
                assert not stop.done(), f"Stop answered without its agent's word: {stop.result().status}"
                assert looked_again.is_set(), "Stop never looked at the host again"
                assert await orchestrator.on_status(c.id, EXITED)  # its agent stops it and says so
                stopped = await asyncio.wait_for(stop, 60)
            assert (stopped.id, stopped.desired_state) == (c.id, t.DESIRED_STOPPED)
            assert (stopped.status.state, stopped.status.exit_code) == (t.STATE_EXITED, 143), stopped.status
        finally:
            for task in (stop, looking):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            for lease in leases:
                await store.revoke_lease(lease)


@pytest.mark.parametrize("cached", [False, True], ids=["without-cache", "with-cache"])
def test_stop_goes_on_waiting_when_the_host_is_back_at_once(etcd_url: str, monkeypatch: pytest.MonkeyPatch,
                                                            cached: bool) -> None:
    asyncio.run(_blip(etcd_url, monkeypatch, cached))
