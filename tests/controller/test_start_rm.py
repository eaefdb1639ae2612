"""`berthctl start` of a --rm container (`create --rm`) that runs, ends and is removed (done as its agent's report
of the end is recorded) before Start reads the container for its answer is answered with the container as it
ended, as Stop (eef6e84) and Kill/Pause (243d29a) answer theirs: Start answered NOT_FOUND "no such container" for
a start that worked (review, session 7). The race's bad order is made certain by holding Start's read until the
removal is done. Real gRPC server, etcd and cluster cache; the agent's reports recorded as the Dispatcher records
them."""

from __future__ import annotations

import asyncio

import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import NotFound
from tests.controller.conftest import cache_on, served, until

RUNNING = t.ContainerStatus(state=t.STATE_RUNNING, generation=1, seq=1 << 32 | 1)
EXITED = t.ContainerStatus(state=t.STATE_EXITED, generation=1, exit_code=3, seq=1 << 32 | 2)


async def _start_rm(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with cache_on(url) as (store, cache, _):
        metrics = ControllerMetrics()
        orchestrator = Orchestrator(store, metrics)
        orchestrator.cache = cache
        api = ControlAPI(store, orchestrator, metrics)
        name = "rm-started"
        c = t.Container(id=f"{61:064x}", desired_state=t.DESIRED_STOPPED, generation=0,  # create --rm
                        spec=t.ContainerSpec(name=name, image="busybox", auto_remove=True))
        lease = await store.grant_lease(60)  # its host n1, up
        start: asyncio.Task[t.Container] | None = None
        try:
            await store.put_node(t.Node(id="n1", name="n1", lease_id=lease,
                                        capacity=t.Resources(memory_bytes=1 << 30)))
            await until(lambda: "n1" in cache.alive and "n1" in cache.nodes, "the host in the cache")
            await store.create_container(c)
            await until(lambda: cache.container(c.id) is not None, "the container in the cache")
            view = api._view

            async def removed_first(cid: str) -> t.Container:  # the --rm removal wins the race with Start's answer
                await until(lambda: cache.container(cid) is None, "the --rm container removed")
                return await view(cid)

            monkeypatch.setattr(api, "_view", removed_first)
            async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, ch):
                stub = control_pb2_grpc.ControlStub(ch)

                async def start_it() -> t.Container:
                    return await stub.Start(control_pb2.ContainerRef(ref=name))

                start = asyncio.create_task(start_it())
                await until(lambda: (v := cache.container(c.id)) is not None and v.container.node_id == "n1"
                            and v.container.desired_state == t.DESIRED_RUNNING, "the container placed to run")
                assert await orchestrator.on_status(c.id, RUNNING)  # its agent's reports: it runs, and ends
                assert await orchestrator.on_status(c.id, EXITED)  # (--rm: removed as this is recorded)
                started = await asyncio.wait_for(start, 20)  # before the fix: NOT_FOUND, no such container
            assert (started.id, started.spec.name, started.desired_state) == (c.id, name, t.DESIRED_RUNNING)
            assert (started.status.state, started.status.exit_code) == (t.STATE_EXITED, 3), started.status
            assert started.node_name == "n1"
            with pytest.raises(NotFound):
                await store.resolve(name)  # removed (--rm)
        finally:
            if start is not None:
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
            await store.revoke_lease(lease)


def test_start_of_an_rm_container_removed_before_the_answer_answers_it_as_it_ended(
        etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_start_rm(etcd_url, monkeypatch))
