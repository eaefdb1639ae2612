"""`berthctl start` of a stopped container whose host is down, or goes down while Start waits for its agent's word
(the host's lease expires, and no word comes until the host is back), is answered at once, as Stop's is since
7804f66/8cd5ca7: the container as it is, lost, "host n1 is down" (the start is recorded; the host's agent carries it
out when it is back). Start waited 3,600 s and berthctl, which passes no timeout, hung (review, session 7). The
host's lease expires for real in etcd. Real gRPC server, etcd and cluster cache, and without the cache."""

from __future__ import annotations

import argparse
import asyncio

import grpc.aio
import pytest

from berth import rpc
from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from berthctl.client import Connection
from berthctl.main import cmd_start
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from tests.controller.conftest import HOST, cache_on, heartbeats, served, until

EXITED = t.ContainerStatus(state=t.STATE_EXITED, generation=1, seq=1 << 32 | 2, exit_code=0)
LEASE_TTL_S = 2


async def _start_on_down_host(url: str, monkeypatch: pytest.MonkeyPatch, cached: bool, already: bool,
                              capsys: pytest.CaptureFixture[str] | None = None) -> None:
    async with cache_on(url) as (store, cache, _):
        metrics = ControllerMetrics()
        orchestrator = Orchestrator(store, metrics)
        if cached:
            orchestrator.cache = cache
        api = ControlAPI(store, orchestrator, metrics)
        name = f"start-host-down-{int(cached)}{int(already)}"
        c = t.Container(id=f"{int(cached) * 2 + int(already) + 41:064x}", node_id="n1",
                        desired_state=t.DESIRED_RUNNING, generation=1, spec=t.ContainerSpec(name=name, image="busybox"))
        lease = await store.grant_lease(LEASE_TTL_S)
        beating = asyncio.create_task(heartbeats(store, lease, LEASE_TTL_S))
        start: asyncio.Task[t.Container] | None = None
        try:
            await store.put_node(t.Node(id="n1", name="n1", lease_id=lease, capacity=t.Resources(memory_bytes=1 << 30)))
            await until(lambda: "n1" in cache.alive and "n1" in cache.nodes, "the host in the cache")
            assert await store.create_placed([c])  # run -d
            assert await orchestrator.on_status(c.id, EXITED)  # it ran and exited: a stopped container
            host_ready, looks = api._host_ready, []
            if already:
                beating.cancel()
                await store.revoke_lease(lease)  # the host is down before Start
                await until(lambda: "n1" not in cache.alive, "the host down in the cache")

            async def then_the_host_dies(node_id: str) -> bool:  # Start found its host up and waits for its agent
                ready = await host_ready(node_id)
                looks.append(ready)
                if len(looks) == 1 and not already:
                    assert ready, "the host was down before Start waited"
                    beating.cancel()  # the host dies: its lease is no longer kept alive, and expires
                return ready

            monkeypatch.setattr(api, "_host_ready", then_the_host_dies)
            ports: list[int] = []

            def add(server: grpc.aio.Server) -> None:
                control_pb2_grpc.add_ControlServicer_to_server(api, server)
                ports.append(rpc.bind(server, f"{HOST}:0"))  # for berthctl's own (sync) channel

            async with served(add) as (_, ch):
                stub = control_pb2_grpc.ControlStub(ch)

                async def start_it() -> t.Container:
                    return await stub.Start(control_pb2.ContainerRef(ref=name))

                if capsys is not None:  # berthctl start itself, through its Connection, warns in one line
                    conn = Connection(f"{HOST}:{ports[0]}")

                    async def start_it() -> t.Container:
                        assert await asyncio.to_thread(cmd_start, argparse.Namespace(containers=[name]), conn) == 0
                        return await api.Inspect(control_pb2.ContainerRef(ref=name), None)  # type: ignore[arg-type]

                start = asyncio.create_task(start_it())
                done, _ = await asyncio.wait([start], timeout=60)  # before the fix: waited 3,600 s
                assert done, "Start still waits for the agent of a host that is down"
                started = start.result()
            assert (started.id, started.desired_state, started.generation) == (c.id, t.DESIRED_RUNNING, 2)
            if capsys is None:  # (berthctl's answer is its warning, below)
                assert (started.status.state, started.status.message) == (t.STATE_LOST, "host n1 is down")
            assert (await store.get_container(c.id)).container.desired_state == t.DESIRED_RUNNING  # recorded
            assert looks == ([False] if already else [True, False])
            if capsys is not None:
                warning = f"berthctl: warning: {name}: host n1 is down; it is started when its host is back"
                assert capsys.readouterr().err == f"{warning} (or berthctl rm -f it)\n"
        finally:
            for task in (beating, start):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await store.revoke_lease(lease)


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_start_ends_when_the_host_goes_down_while_it_waits(etcd_url: str, monkeypatch: pytest.MonkeyPatch,
                                                           cached: bool) -> None:
    asyncio.run(_start_on_down_host(etcd_url, monkeypatch, cached, already=False))


def test_start_of_a_container_whose_host_is_down_is_answered_at_once(etcd_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_start_on_down_host(etcd_url, monkeypatch, cached=True, already=True))


def test_berthctl_start_warns_when_the_host_is_down(etcd_url: str, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_start_on_down_host(etcd_url, monkeypatch, cached=False, already=True, capsys=capsys))
