"""RunStream (issue 6) served by a real gRPC server over a real etcd and cluster cache, with one host in etcd that
no agent serves: its containers are placed and then wait for a status that never comes. A caller that goes
away mid-stream leaves no request of it being served: no status waiter left on the cache, no task of the
stream left running, and the stream's gauge back at 0. A request refused meanwhile is answered alone. Requests
come in batches (indexes count requests across messages); replies decided together share a message."""

from __future__ import annotations

import asyncio
import secrets

import grpc
import grpc.aio

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from tests.controller.conftest import api_on, fail_cache_watch, until


def batch(*specs: t.ContainerSpec) -> control_pb2.RunBatch:
    return control_pb2.RunBatch(requests=[control_pb2.RunRequest(spec=s) for s in specs])


async def one_reply(call: object) -> control_pb2.RunStreamEvent:
    """The next message of the stream, which must hold one reply."""
    message = await asyncio.wait_for(call.read(), 20)  # type: ignore[attr-defined]
    assert isinstance(message, control_pb2.RunStreamEvents)
    (reply,) = message.events
    return reply


_SERVING = ("RunStream", "_admit_batch", "_serve_alone", "_finish_alone")  # the tasks a RunStream may run


def _stream_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks()
            if any(name in task.get_coro().__qualname__ for name in _SERVING)]  # type: ignore[union-attr]


async def _cancelled_mid_stream(url: str) -> None:
    async with api_on(url, memory_bytes=1 << 40, nano_cpus=10**12) as (store, cache, metrics, channel):
        call = control_pb2_grpc.ControlStub(channel).RunStream()
        await call.write(control_pb2.RunBatch(requests=[
            control_pb2.RunRequest(spec=t.ContainerSpec(name=f"s{i}", image="busybox")) for i in range(20)]))
        await call.write(batch(t.ContainerSpec(name="bad name", image="busybox")))
        message = await asyncio.wait_for(call.read(), 20)  # the others wait for their host: this comes first
        assert isinstance(message, control_pb2.RunStreamEvents)
        (refused,) = message.events
        assert refused.index == 20 and refused.WhichOneof("result") == "error"
        assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert refused.error.message.startswith("invalid name 'bad name'")
        await until(lambda: sum(1 for v in cache.containers.values() if v.container.node_id == "n1") == 20,
                    "each request's container placed")
        await until(lambda: cache.waiters() == 20, "each request waiting for its host's report")
        # session 5: no task per request (they wait on the cache with a callback): the stream's reader alone
        await until(lambda: len(_stream_tasks()) == 1, "the message's admission task to end")
        assert metrics.registry.get_sample_value("berth_run_stream_requests") == 20
        assert metrics.registry.get_sample_value("berth_run_waiters") == 20

        call.cancel()  # the caller goes away
        await until(lambda: cache.waiters() == 0, "the requests' status waiters to be closed")
        await until(lambda: not _stream_tasks(), "the stream's tasks to end")
        assert metrics.registry.get_sample_value("berth_run_stream_requests") == 0
        stored = await store.list_containers()
        assert sorted(v.container.spec.name for v in stored) == sorted(f"s{i}" for i in range(20))
        assert all(v.container.node_id == "n1" for v in stored)


def test_a_caller_gone_mid_stream_leaves_no_waiter_or_task(etcd_url: str) -> None:
    asyncio.run(_cancelled_mid_stream(etcd_url))


async def _in_order_of_decision(url: str) -> None:
    """Requests on one stream are served at once: one waiting for its host does not hold up the next one's
    reply (here a container no host fits, answered pending), and the stream ends once each is answered."""
    async with api_on(url) as (store, cache, _, channel):
        waiting = f"w{secrets.token_hex(3)}"
        call = control_pb2_grpc.ControlStub(channel).RunStream()
        await call.write(batch(t.ContainerSpec(name=waiting, image="busybox")))
        await until(lambda: cache.waiters() == 1, "the first request waiting for its host")
        await call.write(batch(t.ContainerSpec(name="huge", image="busybox", memory_bytes=1 << 40)))
        await call.done_writing()
        reply = await one_reply(call)
        assert reply.index == 1 and reply.started.spec.name == "huge"
        assert reply.started.status.state == t.STATE_PENDING
        assert "insufficient memory" in reply.started.pending_reason
        # the first is answered once its host reports it running; then the stream ends
        placed = (await store.get_container(await store.resolve(waiting))).container
        assert await store.put_status(placed.id, t.ContainerStatus(state=t.STATE_RUNNING, generation=1),
                                      (await store.get_container(placed.id)).mod_revision,
                                      (await store.held_status(placed.id))[1])
        reply = await one_reply(call)
        assert (reply.index, reply.started.spec.name, reply.started.status.state) == (0, waiting, t.STATE_RUNNING)
        assert await asyncio.wait_for(call.read(), 20) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        assert cache.waiters() == 0


def test_requests_are_answered_as_they_are_decided(etcd_url: str) -> None:
    asyncio.run(_in_order_of_decision(etcd_url))


async def _decided_together(url: str) -> None:
    """Replies decided at the same moment go in one message: five requests waiting for their host, whose
    statuses come in one etcd transaction (as a group commit of reports writes them), are answered together."""
    async with api_on(url) as (store, cache, _, channel):
        names = [f"t{i}-{secrets.token_hex(2)}" for i in range(5)]
        call = control_pb2_grpc.ControlStub(channel).RunStream()
        await call.write(batch(*(t.ContainerSpec(name=n, image="busybox") for n in names)))
        # a request's waiter opens before its container is written: wait for the five to be in etcd too
        await until(lambda: cache.waiters() == 5 and len(cache.containers) == 5, "the five waiting for their host")
        items = []
        for n in names:
            got = await store.get_container(await store.resolve(n))
            items.append((got.container.id, t.ContainerStatus(state=t.STATE_RUNNING, generation=1),
                          got.mod_revision, 0))
        assert await store.put_statuses(items)
        message = await asyncio.wait_for(call.read(), 20)
        assert isinstance(message, control_pb2.RunStreamEvents)
        assert sorted(e.index for e in message.events) == [0, 1, 2, 3, 4]
        assert {e.started.spec.name for e in message.events} == set(names)
        assert all(e.started.status.state == t.STATE_RUNNING for e in message.events)
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), 20) is grpc.aio.EOF


def test_replies_decided_together_share_a_message(etcd_url: str) -> None:
    asyncio.run(_decided_together(etcd_url))


async def _waiting_when_things_change(url: str) -> None:
    """Requests waiting on the cache (session 5: with a callback each, no task) when their container is removed
    are answered ABORTED, and when the cache's watch fails (it drops its copy and loads it again) follow their
    container on etcd and are answered once it runs; the others of the message are not disturbed."""
    async with api_on(url) as (store, cache, _, channel):
        follower: asyncio.Task[None] | None = None
        names = [f"r{i}-{secrets.token_hex(2)}" for i in range(3)]
        try:
            call = control_pb2_grpc.ControlStub(channel).RunStream()
            await call.write(batch(*(t.ContainerSpec(name=n, image="busybox") for n in names)))
            # a request's waiter opens before its container is written (CI failed once resolving r0 here)
            await until(lambda: cache.waiters() == 3 and len(cache.containers) == 3,
                        "the three waiting for their host")
            cids = [await store.resolve(n) for n in names]

            await store.delete_container(await store.get_container(cids[0]))  # removed before its host reports it
            reply = await one_reply(call)
            assert reply.index == 0 and reply.WhichOneof("result") == "error"
            assert reply.error.code == grpc.StatusCode.ABORTED.value[0]
            assert reply.error.message == f"container {cids[0][:12]}: container {cids[0][:12]} was removed"
            await until(lambda: cache.waiters() == 2, "its waiter closed")

            await fail_cache_watch()
            follower = asyncio.create_task(cache.run())
            await asyncio.wait_for(cache.wait_ready(), 10)

            for i in (1, 2):  # their host reports them running
                v = await store.get_container(cids[i])
                assert await store.put_status(cids[i], t.ContainerStatus(state=t.STATE_RUNNING, generation=1),
                                              v.mod_revision, 0)
                reply = await one_reply(call)
                assert (reply.index, reply.started.id, reply.started.status.state) == (i, cids[i], t.STATE_RUNNING)
            await call.done_writing()
            assert await asyncio.wait_for(call.read(), 20) is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            await until(lambda: not _stream_tasks(), "the stream's tasks to end")
        finally:
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)


def test_requests_waiting_are_answered_when_removed_or_the_cache_reloads(etcd_url: str) -> None:
    asyncio.run(_waiting_when_things_change(etcd_url))
