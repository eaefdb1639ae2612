"""Agents' assignments derived from the container keys (issue 6: no /berth/assignments/ keys), on a real etcd
and real gRPC servers: an agent that reconnects after its containers were moved off its node, removed, placed
elsewhere or added gets exactly the set it must run, from a controller with a cluster cache (a complete set)
and from one without (the changes after its revision, deletes included); placed back on the node, a moved
container runs again with its new generation; keys an older controller wrote are deleted at start."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import grpc.aio

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import ASSIGNMENTS, Versioned, assignment_key
from tests.controller.conftest import cache_on, dispatcher_on, store_on

Held = dict[str, tuple[int, int]]  # container id -> (desired state, generation) as an agent holds them

RUN, STOP = t.DESIRED_RUNNING, t.DESIRED_STOPPED


def _apply(held: Held, msg: d.AssignmentsMessage) -> None:
    """What agent.worker.apply does with the set, reduced to what is compared here."""
    if msg.kind == d.AssignmentsMessage.COMPLETE:
        held.clear()
    for change in msg.changes:
        if change.action == d.AssignmentChange.UPDATE:
            held[change.container_id] = (change.assignment.desired_state, change.assignment.generation)
        else:
            held.pop(change.container_id, None)


async def _until_held(stream: AsyncIterator[d.AssignmentsMessage], held: Held, want: Held, what: str) -> int:
    """Apply the stream's messages until the agent holds `want`; the revision of the last. Fails after 20 s."""
    revision = 0
    try:
        async with asyncio.timeout(20):
            while held != want:
                msg = await anext(stream)
                _apply(held, msg)
                revision = msg.revision
    except TimeoutError:
        raise AssertionError(f"{what}: the agent holds {held}, not {want}") from None
    return revision


def _container(node_id: str) -> t.Container:
    cid = secrets.token_hex(32)
    return t.Container(id=cid, spec=t.ContainerSpec(name=f"c{cid[:8]}", image="busybox", restart_policy="always"),
                       desired_state=RUN, generation=1, node_id=node_id)


async def _reconnects(url: str) -> None:
    async with cache_on(url) as (store, cache, _), contextlib.AsyncExitStack() as servers:
        cached = Orchestrator(store, ControllerMetrics())
        cached.cache = cache
        stubs = [(await servers.enter_async_context(dispatcher_on(store, orchestrator)))[1]
                 for orchestrator in (cached, Orchestrator(store, ControllerMetrics()))]
        calls: list[grpc.aio.UnaryStreamCall[d.AssignmentsRequest, d.AssignmentsMessage]] = []
        try:
            move, gone, stay = (_container("n1") for _ in range(3))
            for c in (move, gone, stay):
                await store.create_container(c)
            await store.create_container(_container("n2"))  # another node's: never sent to n1
            first = stubs[0].Assignments(d.AssignmentsRequest(node_id="n1"))
            calls.append(first)
            held: Held = {}
            revision = await _until_held(aiter(first), held, {move.id: (RUN, 1), gone.id: (RUN, 1),
                                                              stay.id: (RUN, 1)}, "the first complete set")
            first.cancel()  # the agent loses its controller

            # While it is away: one container moved off its node (its copy there stopped, kept), then placed on
            # n2; one removed; one added.
            await cached.move_off(await store.get_container(move.id))
            v = await store.get_container(move.id)
            elsewhere = t.Container()
            elsewhere.CopyFrom(v.container)
            elsewhere.node_id = "n2"
            await store.update_container(v, elsewhere)
            await store.delete_container(await store.get_container(gone.id))
            new = _container("n1")
            await store.create_container(new)
            want = {move.id: (STOP, 0), stay.id: (RUN, 1), new.id: (RUN, 1)}

            # It reconnects after the revision it took, to a controller with a cache and to one without.
            streams: list[tuple[AsyncIterator[d.AssignmentsMessage], Held]] = []
            for stub, name in zip(stubs, ("with a cache", "from etcd"), strict=True):
                call = stub.Assignments(d.AssignmentsRequest(node_id="n1", after_revision=revision))
                calls.append(call)
                agent = dict(held)
                await _until_held(aiter(call), agent, want, f"reconnected to a controller {name}")
                streams.append((aiter(call), agent))

            # Placed back on n1: its stopped copy's assignment is replaced by the run (a new generation).
            v = await store.get_container(move.id)
            back = t.Container()
            back.CopyFrom(v.container)
            back.node_id = "n1"
            back.stale_nodes.remove("n1")
            await store.update_container(v, back)
            assert back.generation == 2
            want[move.id] = (RUN, 2)
            for (stream, agent), name in zip(streams, ("with a cache", "from etcd"), strict=True):
                await _until_held(stream, agent, want, f"placed back, {name}")

            # Removed: gone from the node's set on both streams.
            await store.delete_container(Versioned(back, (await store.get_container(move.id)).mod_revision))
            del want[move.id]
            for (stream, agent), name in zip(streams, ("with a cache", "from etcd"), strict=True):
                await _until_held(stream, agent, want, f"removed, {name}")
        finally:
            for call in calls:
                call.cancel()


def test_an_agent_reconnecting_after_its_containers_moved_or_went_gets_the_right_set(etcd_url: str) -> None:
    asyncio.run(_reconnects(etcd_url))


async def _old_keys(url: str) -> None:
    async with store_on(url) as (store, client):
        c = _container("n1")
        await store.create_container(c)
        await client.put(assignment_key("n1", c.id), t.Assignment(container_id=c.id).SerializeToString())
        await client.put(assignment_key("n2", c.id), t.Assignment(container_id=c.id).SerializeToString())
        assert await store.drop_assignment_keys() == 2
        assert not list(await client.get_prefix(ASSIGNMENTS))
        assert await store.drop_assignment_keys() == 0
        revision, assignments = await store.assignments("n1")  # the container key is the assignment
        assert revision > 0 and [(a.container_id, a.desired_state) for a in assignments] == [(c.id, RUN)]


def test_assignment_keys_of_an_older_controller_are_dropped(etcd_url: str) -> None:
    asyncio.run(_old_keys(etcd_url))
