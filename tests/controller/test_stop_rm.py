"""`berthctl stop` of a --rm container answers the container as it ended, even when the --rm removal (done as
its agent's report is recorded: Orchestrator.on_status, or the group commit's background removal) is done
before Stop reads the container for its answer: Stop answered NOT_FOUND "no such container" for a stop that
worked. Since e84fbc4 an --rm container stopped before its agent started it is removed too (it stayed created,
and Stop answered it). The race's bad order is made certain by holding Stop's read until the removal is done.
Real gRPC server, real etcd and cluster cache; the agent's reports recorded as the Dispatcher records them."""

from __future__ import annotations

import asyncio

import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from tests.controller.conftest import cache_on, served, until

STOPPED_FIRST = t.ContainerStatus(state=t.STATE_CREATED, generation=1, message="stopped before it started",
                                  seq=1 << 32 | 2)
RUNNING = t.ContainerStatus(state=t.STATE_RUNNING, generation=1, seq=1 << 32 | 1)
EXITED = t.ContainerStatus(state=t.STATE_EXITED, generation=1, exit_code=137, seq=1 << 32 | 2)


async def _stop_rm(url: str, monkeypatch: pytest.MonkeyPatch, started: bool) -> None:
    async with cache_on(url) as (store, cache, _):
        metrics = ControllerMetrics()
        orchestrator = Orchestrator(store, metrics)
        orchestrator.cache = cache
        api = ControlAPI(store, orchestrator, metrics)
        name = f"rm-stopped-{int(started)}"
        c = t.Container(id=f"{int(started) + 11:064x}", node_id="n1", desired_state=t.DESIRED_RUNNING, generation=1,
                        spec=t.ContainerSpec(name=name, image="busybox", auto_remove=True))
        lease = await store.grant_lease(60)  # its host n1, up (Stop answers at once for a host down: 7804f66)
        await store.put_node(t.Node(id="n1", name="n1", lease_id=lease, capacity=t.Resources(memory_bytes=1 << 30)))
        await until(lambda: "n1" in cache.alive and "n1" in cache.nodes, "the host in the cache")
        assert await store.create_placed([c])  # run --rm -d
        await until(lambda: cache.container(c.id) is not None, "the container in the cache")
        if started:
            await orchestrator.on_status(c.id, RUNNING)
        view = api._view

        async def removed_first(cid: str) -> t.Container:  # the --rm removal wins the race with Stop's answer
            await until(lambda: cache.container(cid) is None, "the --rm container removed")
            return await view(cid)

        monkeypatch.setattr(api, "_view", removed_first)
        async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, ch):
            stub = control_pb2_grpc.ControlStub(ch)

            async def stop_it() -> t.Container:
                return await stub.Stop(control_pb2.StopRequest(ref=name, timeout_s=5))

            stop = asyncio.create_task(stop_it())
            try:
                await until(lambda: (v := cache.container(c.id)) is not None
                            and v.container.desired_state == t.DESIRED_STOPPED, "the container stopped")
                await orchestrator.on_status(c.id, EXITED if started else STOPPED_FIRST)  # its agent's report
                stopped = await asyncio.wait_for(stop, 20)  # before the fix: NOT_FOUND, no such container
            finally:
                stop.cancel()
                await asyncio.gather(stop, return_exceptions=True)
        assert (stopped.id, stopped.spec.name, stopped.desired_state) == (c.id, name, t.DESIRED_STOPPED)
        assert stopped.status.state == (t.STATE_EXITED if started else t.STATE_CREATED), stopped.status
        with pytest.raises(Exception, match="no such"):
            await store.resolve(name)  # removed (--rm)
        await store.revoke_lease(lease)


def test_stop_of_an_rm_container_stopped_before_it_started_answers_it(etcd_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_stop_rm(etcd_url, monkeypatch, started=False))


def test_stop_of_a_running_rm_container_answers_it_as_it_ended(etcd_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_stop_rm(etcd_url, monkeypatch, started=True))
