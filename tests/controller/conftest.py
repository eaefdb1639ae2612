"""A real etcd and a real controller process on loopback, for tests of the controller alone (no hosts)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aetcd
import grpc.aio
import pytest

from berth import rpc
from berth.api import control_pb2_grpc, dispatcher_pb2_grpc
from berth.api import types_pb2 as t
from berthctl.dev import etcd
from controller.api import ControlAPI
from controller.cache import ClusterCache
from controller.dispatcher import Dispatcher
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import PREFIX, Store
from tests.conftest import SLOT
from tests.support import etcd_keys, wait_for

__all__ = [
    "HOST", "Controller", "api_on", "cache_on", "dispatcher_on", "etcd_keys", "fail_cache_watch", "heartbeats",
    "served", "store_on", "until", "wait_for", "wipe_etcd",
]

HOST = f"127.0.{SLOT}.77"


async def wipe_etcd(url: str) -> None:
    """Delete every berth key from the etcd at url, so that the keys of one test are not in the next one's way."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    try:
        await client.delete_prefix(PREFIX)
    finally:
        await client.close()


async def heartbeats(store: Store, lease: int, ttl_s: float) -> None:
    """A host's agent keeping its lease (of `ttl_s`) alive, as its heartbeats through the Dispatcher do; cancel it
    to let the lease expire."""
    while True:
        await store.refresh_lease(lease)
        await asyncio.sleep(ttl_s / 4)


async def until(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Poll (in a running event loop) until condition() is truthy; fail after `timeout` seconds, naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def fail_cache_watch() -> None:
    """Fail the cluster cache's watch as an etcd failure does (cache_on's follower, ClusterCache.run, cancelled:
    it drops its copy and fails its waiters and followers). Start `cache.run()` again to load it again."""
    running = [task for task in asyncio.all_tasks()
               if task.get_coro().__qualname__ == "ClusterCache.run"]  # type: ignore[union-attr]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


@asynccontextmanager
async def store_on(url: str) -> AsyncIterator[tuple[Store, aetcd.Client]]:
    """A store on the etcd at url and a plain etcd client for the test's own writes; on the way out every berth
    key is deleted and both clients are closed."""
    store = Store(url)
    await store.connect()
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    try:
        yield store, client
    finally:
        await client.delete_prefix(PREFIX)
        await client.close()
        await store.close()


@asynccontextmanager
async def cache_on(url: str) -> AsyncIterator[tuple[Store, ClusterCache, aetcd.Client]]:
    """store_on's store and client, and a cluster cache following the store (loaded, stopped on the way out)."""
    async with store_on(url) as (store, client):
        cache = ClusterCache(store)
        follower = asyncio.create_task(cache.run())
        try:
            await asyncio.wait_for(cache.wait_ready(), 10)
            yield store, cache, client
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)


@asynccontextmanager
async def api_on(url: str, memory_bytes: int = 1 << 30, nano_cpus: int = 10**9) -> AsyncIterator[
        tuple[Store, ClusterCache, ControllerMetrics, grpc.aio.Channel]]:
    """cache_on's store and cache, the Control API served over real gRPC as on the leader (Runs created placed in
    groups, waiting on the cache), one host n1 of that capacity in etcd, alive under a lease, that no agent
    serves (its containers are placed and wait for a report the test writes, or never comes), and a channel to
    the server; everything stopped on the way out."""
    async with cache_on(url) as (store, cache, _):
        metrics = ControllerMetrics()
        orchestrator = Orchestrator(store, metrics)
        orchestrator.cache = cache
        orchestrator.kick = asyncio.Event()
        api = ControlAPI(store, orchestrator, metrics)
        lease = await store.grant_lease(60)
        try:
            await store.put_node(t.Node(id="n1", name="n1", lease_id=lease,
                                        capacity=t.Resources(memory_bytes=memory_bytes, nano_cpus=nano_cpus)))
            await until(lambda: "n1" in cache.alive and "n1" in cache.nodes, "the host in the cache")
            async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, ch):
                yield store, cache, metrics, ch
        finally:
            await store.revoke_lease(lease)


@asynccontextmanager
async def served(add: Callable[[grpc.aio.Server], None]) -> AsyncIterator[tuple[grpc.aio.Server, grpc.aio.Channel]]:
    """A gRPC server on loopback serving what `add` puts on it, started, and a channel to it; both stopped on the
    way out."""
    server = rpc.aio_server()
    add(server)
    port = rpc.bind(server, f"{HOST}:0")
    await server.start()
    channel = rpc.aio_channel(f"{HOST}:{port}")
    try:
        yield server, channel
    finally:
        await channel.close()
        await server.stop(0)


@asynccontextmanager
async def dispatcher_on(
    store: Store, orchestrator: Orchestrator, metrics: ControllerMetrics | None = None, lease_ttl_s: int = 5,
) -> AsyncIterator[tuple[grpc.aio.Server, dispatcher_pb2_grpc.DispatcherStub]]:
    """A controller's Dispatcher over the store and orchestrator (with the orchestrator's cache, if it has one),
    served (above), and a stub to it."""
    dispatcher = Dispatcher(store, orchestrator, ControllerMetrics() if metrics is None else metrics, lease_ttl_s)
    async with served(lambda server: dispatcher_pb2_grpc.add_DispatcherServicer_to_server(dispatcher, server)) as (
            server, channel):
        yield server, dispatcher_pb2_grpc.DispatcherStub(channel)


@dataclass(frozen=True)
class Controller:
    address: str
    metrics: str
    etcd_url: str


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("etcd")
    log = data / "etcd.log"
    proc = etcd.start(HOST, data / "data", log, dict(os.environ))
    try:
        etcd.wait_healthy(etcd.client_url(HOST), proc, log)
        yield etcd.client_url(HOST)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def controller(etcd_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    log = tmp_path_factory.mktemp("controller") / "controller.log"
    address, metrics = f"{HOST}:7070", f"{HOST}:7071"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller", "--etcd", etcd_url, "--listen", address,
             "--metrics-listen", metrics, "--lease-ttl", "2"],
            stdout=f, stderr=subprocess.STDOUT,
        )
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"controller exited: {Path(log).read_text()}")
            try:
                with grpc.insecure_channel(address) as ch:
                    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.RpcError:
                return False

        wait_for(serving, 30, "the controller to serve")
        yield Controller(address, metrics, etcd_url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def etcd_at(host: str, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """An etcd of a test's own on `host` (its client URL and process; a fixture yields from it), stopped after."""
    log = tmp_path / "etcd.log"
    proc = etcd.start(host, tmp_path / "data", log, dict(os.environ))
    try:
        etcd.wait_healthy(etcd.client_url(host), proc, log)
        yield etcd.client_url(host), proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
