"""A Run (or a RunStream request) that cannot open its status watch because etcd fails (down, unreachable, its
cluster cache not loaded: the watch is the store's) is refused UNAVAILABLE, with one line saying that nothing was
created and to try again. It was not caught: Run ended UNKNOWN ("Unexpected error") and RunStream answered the
request INTERNAL ("internal error: ..."), as for a bug. Its own real etcd (stopped by the test) and the Control
API over real gRPC."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from berthctl.dev import etcd
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import Store
from tests.conftest import SLOT
from tests.controller.conftest import served

HOST = f"127.0.{SLOT}.78"  # its own etcd, stopped by the test


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    log = tmp_path / "etcd.log"
    proc = etcd.start(HOST, tmp_path / "data", log, dict(os.environ))
    try:
        etcd.wait_healthy(etcd.client_url(HOST), proc, log)
        yield etcd.client_url(HOST), proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def _refused(code: int, message: str) -> None:
    assert code == grpc.StatusCode.UNAVAILABLE.value[0], (code, message)
    assert message.startswith("nothing was created, etcd failed") and message.endswith("; try again"), message
    assert "\n" not in message


async def _runs_while_etcd_is_down(url: str, proc: subprocess.Popen[bytes]) -> None:
    store = Store(url)
    await store.connect()
    try:
        metrics = ControllerMetrics()
        api = ControlAPI(store, Orchestrator(store, metrics), metrics)  # no cache loaded: the store's watch
        async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, ch):
            stub = control_pb2_grpc.ControlStub(ch)
            assert await store.revision() > 0
            proc.terminate()
            proc.wait(timeout=10)

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Run(control_pb2.RunRequest(spec=t.ContainerSpec(name="down", image="busybox"))).read()
            _refused(refused.value.code().value[0], refused.value.details() or "")

            call = stub.RunStream()
            await call.write(control_pb2.RunBatch(requests=[
                control_pb2.RunRequest(spec=t.ContainerSpec(name=f"down{i}", image="busybox")) for i in range(2)]))
            await call.done_writing()
            replies = [event async for message in call for event in message.events]
            assert sorted(r.index for r in replies) == [0, 1]
            for reply in replies:
                _refused(reply.error.code, reply.error.message)
            assert await call.code() == grpc.StatusCode.OK  # the stream itself goes on (and ends when asked)
    finally:
        await store.close()


def test_a_run_when_etcd_is_down_is_refused_unavailable(own_etcd: tuple[str, subprocess.Popen[bytes]]
                                                        ) -> None:
    asyncio.run(_runs_while_etcd_is_down(*own_etcd))
