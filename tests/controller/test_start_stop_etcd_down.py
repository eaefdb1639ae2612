"""`start` and `stop` whose status watch cannot be opened because etcd fails right then (after the container was
resolved, before anything was written) are refused UNAVAILABLE, with one line saying that nothing was changed
and to try again, as Run is (tests/controller/test_run_etcd_down.py). The watch was opened outside their `try`:
the call ended UNKNOWN ("Unexpected error"). Its own real etcd, stopped by the test right after the container
is resolved, and the Control API over real gRPC."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import Store
from tests.conftest import SLOT
from tests.controller.conftest import etcd_at, served

# each test's own etcd, stopped by the test, on an address of its own (gRPC shares a connection to one address
# across clients, and one to an etcd stopped by an earlier test refuses at once until its back-off ends)
HOSTS = {"start": f"127.0.{SLOT}.134", "stop": f"127.0.{SLOT}.135"}


@pytest.fixture
def own_etcd(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    yield from etcd_at(HOSTS[request.node.name.split("_")[1]], tmp_path)


async def _refused_when_etcd_fails(url: str, proc: subprocess.Popen[bytes], stop: bool) -> None:
    store = Store(url)
    await store.connect()
    try:
        c = t.Container(id=f"{5:064x}", spec=t.ContainerSpec(name="resolved", image="busybox"), generation=1,
                        desired_state=t.DESIRED_STOPPED if not stop else t.DESIRED_RUNNING)
        await store.create_container(c)
        resolve = store.resolve

        async def then_etcd_fails(ref: str) -> str:  # resolved; etcd goes down before the status watch
            cid = await resolve(ref)
            proc.terminate()
            await asyncio.to_thread(proc.wait, 10)
            return cid

        store.resolve = then_etcd_fails  # type: ignore[method-assign]
        metrics = ControllerMetrics()
        api = ControlAPI(store, Orchestrator(store, metrics), metrics)  # no cache: the store's watch
        async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, ch):
            stub = control_pb2_grpc.ControlStub(ch)
            call: Callable[[], object] = (
                (lambda: stub.Stop(control_pb2.StopRequest(ref="resolved", timeout_s=1))) if stop
                else (lambda: stub.Start(control_pb2.ContainerRef(ref="resolved"))))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(call(), 30)  # type: ignore[arg-type]
            code, message = refused.value.code(), refused.value.details() or ""
            assert code == grpc.StatusCode.UNAVAILABLE, (code, message)
            assert message.startswith("nothing was changed, etcd failed") and message.endswith("; try again"), message
            assert "\n" not in message
            assert proc.poll() is not None  # etcd failed exactly there (after the resolve)
    finally:
        await store.close()


def test_start_refused_unavailable_when_etcd_fails_before_it_writes(own_etcd: tuple[str, subprocess.Popen[bytes]]
                                                                    ) -> None:
    asyncio.run(_refused_when_etcd_fails(*own_etcd, stop=False))


def test_stop_refused_unavailable_when_etcd_fails_before_it_writes(own_etcd: tuple[str, subprocess.Popen[bytes]]
                                                                   ) -> None:
    asyncio.run(_refused_when_etcd_fails(*own_etcd, stop=True))
