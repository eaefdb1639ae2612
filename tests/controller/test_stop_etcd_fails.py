"""`berthctl stop` of a container whose agent it waits for, when etcd fails meanwhile: refused UNAVAILABLE, and
nothing of the wait left behind. Stop's wait ends on the first of its status watch, its container's removal watch
and its host's lease watch (controller.stop_wait); etcd failing fails all three, and a watch that failed alongside
the one that ended the wait was left a finished task whose exception nobody read: asyncio reported "Task exception
was never retrieved" with a traceback in the controller's log for each such Stop (review, session 7). Its own real
etcd, stopped by the test while Stop waits, and the Control API over real gRPC (no cache: Stop reads etcd)."""

from __future__ import annotations

import asyncio
import gc
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import Store, StoreError
from tests.conftest import SLOT
from tests.controller.conftest import etcd_at, served

RUNNING = t.ContainerStatus(state=t.STATE_RUNNING, generation=1, seq=1 << 32 | 1)


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    yield from etcd_at(f"127.0.{SLOT}.136", tmp_path)


async def _etcd_fails_while_stop_waits(url: str, proc: subprocess.Popen[bytes]) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    store = Store(url)
    await store.connect()
    try:
        metrics = ControllerMetrics()
        orchestrator = Orchestrator(store, metrics)
        api = ControlAPI(store, orchestrator, metrics)
        host_ready, waits = api._host_ready, asyncio.Event()

        async def then_it_waits(node_id: str) -> bool:  # Stop recorded the stop and found the host up: it waits
            ready = await host_ready(node_id)
            waits.set()
            return ready

        api._host_ready = then_it_waits  # type: ignore[method-assign]
        lease = await store.grant_lease(60)  # its host n1, up
        await store.put_node(t.Node(id="n1", name="n1", lease_id=lease, capacity=t.Resources(memory_bytes=1 << 30)))
        c = t.Container(id=f"{41:064x}", node_id="n1", desired_state=t.DESIRED_RUNNING, generation=1,
                        spec=t.ContainerSpec(name="waited", image="busybox"))
        assert await store.create_placed([c])  # run -d
        assert await orchestrator.on_status(c.id, RUNNING)  # its agent's report
        async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, ch):
            stub = control_pb2_grpc.ControlStub(ch)
            stop = asyncio.ensure_future(stub.Stop(control_pb2.StopRequest(ref="waited", timeout_s=600)))
            try:
                await asyncio.wait_for(waits.wait(), 20)
                proc.terminate()  # etcd fails while Stop waits
                await asyncio.to_thread(proc.wait, 10)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await asyncio.wait_for(stop, 60)
            finally:
                stop.cancel()
                await asyncio.gather(stop, return_exceptions=True)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    finally:
        await store.close()
    gc.collect()  # a finished task nobody read is reported when it is collected
    unread = [context.get("message", "") for context in reported if isinstance(context.get("exception"), StoreError)]
    assert not unread, unread  # before the fix: ['Task exception was never retrieved']


def test_stop_refused_unavailable_when_etcd_fails_while_it_waits_leaves_nothing_behind(
        own_etcd: tuple[str, subprocess.Popen[bytes]]) -> None:
    asyncio.run(_etcd_fails_while_stop_waits(*own_etcd))
