"""`berthctl wait` on a container stopped (berthctl stop) before its agent started its run ends when the agent
says so (created, "stopped before it started"), as Run (e84fbc4) and Stop (b9b2b22) do, with exit code 0 as
`docker wait` answers a container that never ran: it waited for an exit that would never come (10**7 s), and
for an --rm one (removed on that report since e84fbc4) it failed NOT_FOUND. Wait follows the status and the
container's removal on two etcd watches (Store.watch_status), which can give the removal before the status put
just before it: for the --rm one the status watch's events are held (never given) to make that order certain,
and the report must still be seen. Real gRPC server, real etcd and cluster cache; the agent's report recorded
as the Dispatcher records it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import status_key
from tests.controller.conftest import cache_on, served, until

STOPPED_FIRST = t.ContainerStatus(state=t.STATE_CREATED, generation=1, message="stopped before it started",
                                  seq=1 << 32 | 1)


async def _wait_ends(url: str, auto_remove: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    async with cache_on(url) as (store, cache, _):
        metrics = ControllerMetrics()
        orchestrator = Orchestrator(store, metrics)
        orchestrator.cache = cache
        api = ControlAPI(store, orchestrator, metrics)
        name = f"wait-stopped-first-{int(auto_remove)}"
        c = t.Container(id=f"{int(auto_remove) + 21:064x}", node_id="n1", desired_state=t.DESIRED_RUNNING,
                        generation=1, spec=t.ContainerSpec(name=name, image="busybox", auto_remove=auto_remove))
        assert await store.create_placed([c])  # run -d, its agent not started it yet
        await until(lambda: cache.container(c.id) is not None, "the container in the cache")
        watching = asyncio.Event()
        if auto_remove:  # the status watch's events come after the removal's: held
            watch = store._watch

            async def held(key: bytes, start_revision: int, *, prefix: bool) -> AsyncIterator[tuple[str, Any]]:
                if key == status_key(c.id) and not prefix:
                    watching.set()
                    await asyncio.Event().wait()
                async for item in watch(key, start_revision, prefix=prefix):
                    yield item

            monkeypatch.setattr(store, "_watch", held)
        else:
            watching.set()
        async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, ch):
            stub = control_pb2_grpc.ControlStub(ch)

            async def wait_it() -> control_pb2.WaitResponse:
                return await stub.Wait(control_pb2.ContainerRef(ref=name))

            waiting = asyncio.create_task(wait_it())
            try:
                await asyncio.wait_for(watching.wait(), 20)  # Wait follows the status
                await orchestrator.set_desired(c.id, t.DESIRED_STOPPED)  # berthctl stop
                await orchestrator.on_status(c.id, STOPPED_FIRST)  # its agent's report
                answer = await asyncio.wait_for(waiting, 20)  # before the fix: waited 10**7 s, or NOT_FOUND (--rm)
            finally:
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
            assert answer.exit_code == 0
            if not auto_remove:  # it ended so already: answered at once
                assert (await asyncio.wait_for(wait_it(), 20)).exit_code == 0


@pytest.mark.parametrize("auto_remove", [False, True], ids=["kept", "rm"])
def test_wait_on_a_container_stopped_before_it_started_ends(etcd_url: str, auto_remove: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_wait_ends(etcd_url, auto_remove, monkeypatch))
