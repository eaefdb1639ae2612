"""A Run whose container is stopped (berthctl stop) before its agent started it ends when the agent says so
(created, "stopped before it started": agent.worker, tests/agent/test_stop_unstarted.py), answered with the
container as it is (created, that message, desired stopped: session 7, it was answered desired running), as `stop`
does since b9b2b22; it waited RUN_WAIT_S (an hour) for a run that would never begin. Run, and RunStream's batch
path, on a real gRPC server over a real etcd and cluster cache (api_on); the agent's report written as its agent's
would be. And a --rm container stopped so is removed like any --rm container that ends (it stayed created), on both
ways a report is recorded (Orchestrator.on_status alone, and on_statuses' group commit on the cache)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import NotFound, Store
from tests.controller.conftest import api_on, cache_on, until

STOPPED_FIRST = t.ContainerStatus(state=t.STATE_CREATED, generation=1, message="stopped before it started",
                                  seq=1 << 32 | 1)


async def _resolved(store: Store, name: str) -> str | None:
    try:
        return await store.resolve(name)
    except NotFound:
        return None


async def _stopped_first(store: Store, stub: control_pb2_grpc.ControlStub, name: str) -> t.Container:
    """Wait for the container named so to be placed, stop it (berthctl stop), and report what its agent reports
    when the stop came before it started the run; `stop`'s answer."""
    cid: str | None = None
    deadline = asyncio.get_running_loop().time() + 20
    while cid is None:
        assert asyncio.get_running_loop().time() < deadline, f"{name} was never created"
        cid = await _resolved(store, name)
        await asyncio.sleep(0.02)

    async def stop_it() -> t.Container:
        return await stub.Stop(control_pb2.StopRequest(ref=name, timeout_s=5))

    stop = asyncio.create_task(stop_it())
    try:
        while (v := await store.get_container(cid)).container.desired_state != t.DESIRED_STOPPED:
            assert asyncio.get_running_loop().time() < deadline, f"{name} was never stopped"
            await asyncio.sleep(0.02)
        _, held = await store.held_status(cid)
        assert await store.put_status(cid, STOPPED_FIRST, v.mod_revision, held)
        return await asyncio.wait_for(stop, 20)
    finally:
        stop.cancel()


async def _run_ends(url: str) -> None:
    async with api_on(url) as (store, _, _, channel):
        stub = control_pb2_grpc.ControlStub(channel)
        for attach in (False, True):
            name = f"stopped-first-{int(attach)}"
            call = stub.Run(control_pb2.RunRequest(spec=t.ContainerSpec(name=name, image="busybox"), attach=attach))

            async def events(call: object = call) -> list[control_pb2.RunEvent]:
                return [event async for event in call]  # type: ignore[attr-defined]

            answered = asyncio.create_task(events())
            try:
                stopped = await _stopped_first(store, stub, name)
                assert stopped.status.state == t.STATE_CREATED
                got = await asyncio.wait_for(answered, 20)  # before the fix: waited an hour
            finally:
                answered.cancel()
                call.cancel()
            assert [e.WhichOneof("event") for e in got] == ["started"], got
            assert (got[0].started.spec.name, got[0].started.status.state, got[0].started.status.message) == (
                name, t.STATE_CREATED, "stopped before it started")
            assert got[0].started.desired_state == t.DESIRED_STOPPED  # as it is (session 7: it said running)


async def _run_stream_ends(url: str) -> None:
    async with api_on(url) as (store, _, _, channel):
        stub = control_pb2_grpc.ControlStub(channel)

        async def requests() -> object:
            yield control_pb2.RunBatch(requests=[control_pb2.RunRequest(
                spec=t.ContainerSpec(name="stopped-first-stream", image="busybox"))])

        call = stub.RunStream(requests())

        async def replies() -> list[control_pb2.RunStreamEvent]:
            return [event async for message in call for event in message.events]

        answered = asyncio.create_task(replies())
        try:
            await _stopped_first(store, stub, "stopped-first-stream")
            got = await asyncio.wait_for(answered, 20)  # before the fix: waited an hour
        finally:
            answered.cancel()
            call.cancel()
        assert [(e.index, e.WhichOneof("result")) for e in got] == [(0, "started")], got
        assert (got[0].started.status.state, got[0].started.status.message) == (
            t.STATE_CREATED, "stopped before it started")
        assert got[0].started.desired_state == t.DESIRED_STOPPED  # as it is (session 7: it said running)


def test_a_run_stopped_before_it_started_is_answered(etcd_url: str) -> None:
    asyncio.run(_run_ends(etcd_url))


def test_a_run_stream_request_stopped_before_it_started_is_answered(etcd_url: str) -> None:
    asyncio.run(_run_stream_ends(etcd_url))


async def _rm_removed(url: str, cached: bool) -> None:
    async with cache_on(url) as (store, cache, _):
        orchestrator = Orchestrator(store, ControllerMetrics())
        record: Callable[[str, t.ContainerStatus], Awaitable[object]] = orchestrator.on_status
        if cached:
            orchestrator.cache = cache

            async def record(cid: str, status: t.ContainerStatus) -> object:
                return await orchestrator.on_statuses([(cid, status)])
        c = t.Container(id=f"{cached + 7:064x}", node_id="n1", desired_state=t.DESIRED_STOPPED, generation=1,
                        spec=t.ContainerSpec(name=f"rm-stopped-first-{int(cached)}", image="busybox", auto_remove=True))
        assert await store.create_placed([c])  # run --rm, then stop: its agent never started it
        await until(lambda: cache.container(c.id) is not None, "the container in the cache")
        await asyncio.wait_for(record(c.id, STOPPED_FIRST), 20)
        await until(lambda: cache.container(c.id) is None, "the --rm container removed")  # it stayed created
        assert await _resolved(store, c.spec.name) is None


def test_an_rm_container_stopped_before_it_started_is_removed(etcd_url: str) -> None:
    asyncio.run(_rm_removed(etcd_url, cached=False))


def test_an_rm_container_stopped_before_it_started_is_removed_by_the_group_commit(etcd_url: str) -> None:
    asyncio.run(_rm_removed(etcd_url, cached=True))
