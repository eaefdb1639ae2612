"""A Run (or a RunStream request) that cannot open its status watch because etcd fails (down, unreachable, its
cluster cache not loaded: the watch is the store's) is refused UNAVAILABLE, with one line saying that nothing was
created and to try again. It was not caught: Run ended UNKNOWN ("Unexpected error") and RunStream answered the
request INTERNAL ("internal error: ..."), as for a bug. Its own real etcd (stopped by the test) and the Control
API over real gRPC."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from berthctl.dev import etcd
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import Store, StoreError
from tests.conftest import SLOT
from tests.controller.conftest import api_on, etcd_at, fail_cache_watch, served, until

HOST = f"127.0.{SLOT}.78"  # its own etcd, stopped by the test
OTHER_HOST = f"127.0.{SLOT}.79"


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    yield from etcd_at(HOST, tmp_path)


@pytest.fixture
def other_etcd(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """As own_etcd, on an address of its own: gRPC shares a connection to one address across clients, and one
    to an etcd stopped by an earlier test refuses at once until its reconnection back-off ends."""
    yield from etcd_at(OTHER_HOST, tmp_path)


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


async def _waiting_when_etcd_goes(url: str, proc: subprocess.Popen[bytes], restart: Callable[[], None]) -> None:
    """A RunStream request waiting for its container to begin when etcd goes down (its cluster cache's watch
    fails, the request follows its container on etcd, which fails too) is answered ABORTED naming its container,
    as Run answers then; it was answered INTERNAL ('internal error: ...'), as for a bug (session 5's rewrite)."""
    async with api_on(url) as (store, cache, _, channel):
        try:
            call = control_pb2_grpc.ControlStub(channel).RunStream()
            await call.write(control_pb2.RunBatch(requests=[
                control_pb2.RunRequest(spec=t.ContainerSpec(name="waits", image="busybox"))]))
            await until(lambda: cache.waiters() == 1 and cache.containers, "the request waiting for its host")
            [cid] = cache.containers
            proc.terminate()
            proc.wait(timeout=10)
            await fail_cache_watch()  # its watch fails now (made certain)
            message = await asyncio.wait_for(call.read(), 60)
            assert isinstance(message, control_pb2.RunStreamEvents), message
            [reply] = message.events
            assert reply.WhichOneof("result") == "error", reply
            assert reply.error.code == grpc.StatusCode.ABORTED.value[0], (reply.error.code, reply.error.message)
            assert reply.error.message.startswith(f"container {cid[:12]}: "), reply.error.message
            assert "\n" not in reply.error.message
            call.cancel()
        finally:
            restart()  # for the clean-up's writes, once the store reaches it again
            deadline = time.monotonic() + 30
            while True:
                try:
                    await store.revision()
                    break
                except StoreError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)


def test_a_run_stream_request_waiting_when_etcd_goes_is_aborted(
        other_etcd: tuple[str, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    url, proc = other_etcd
    restarted: list[subprocess.Popen[bytes]] = []

    def restart() -> None:
        if proc.poll() is not None and not restarted:
            restarted.append(etcd.start(OTHER_HOST, tmp_path / "data", tmp_path / "etcd2.log", dict(os.environ)))
            etcd.wait_healthy(url, restarted[0], tmp_path / "etcd2.log")

    try:
        asyncio.run(_waiting_when_etcd_goes(url, proc, restart))
    finally:
        for again in restarted:
            again.terminate()
            again.wait(timeout=10)
