"""An agent resuming its assignment stream from a revision etcd has compacted away, on a controller without a
cluster cache (issue 6, keys: the stream then follows a watch on every container key from that revision):
the controller answers ABORTED, and the agent's fresh start gets the complete set, its containers placed
meanwhile included. Real etcd, a real gRPC server and client."""

from __future__ import annotations

import asyncio
import secrets

import grpc
import grpc.aio
import pytest

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from tests.controller.conftest import dispatcher_on, store_on


def _on(node_id: str) -> t.Container:
    cid = secrets.token_hex(32)
    return t.Container(id=cid, spec=t.ContainerSpec(name=f"c{cid[:8]}", image="busybox"), generation=1,
                       desired_state=t.DESIRED_RUNNING, node_id=node_id)


async def _resume_compacted(url: str) -> None:
    async with store_on(url) as (store, client), dispatcher_on(store, Orchestrator(store, ControllerMetrics())) as (
            _, stub):
        first = _on("n1")
        await store.create_container(first)
        taken = await store.revision()  # the revision the agent took before it went away
        later = _on("n1")
        await store.create_container(later)  # placed on its node while it was away
        await store.create_container(_on("n2"))  # and more, so that the compaction passes the resume point
        assert await store.revision() > taken + 1
        await client.compact(await store.revision())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with asyncio.timeout(20):
                async for msg in stub.Assignments(d.AssignmentsRequest(node_id="n1", after_revision=taken)):
                    raise AssertionError(f"resumed past a compacted revision: {msg}")
        assert err.value.code() == grpc.StatusCode.ABORTED, err.value
        async with asyncio.timeout(20):
            msg = await anext(aiter(stub.Assignments(d.AssignmentsRequest(node_id="n1"))))
        assert msg.kind == d.AssignmentsMessage.COMPLETE
        assert {c.container_id for c in msg.changes} == {first.id, later.id}


def test_resuming_from_a_compacted_revision_without_a_cache_starts_over_with_the_complete_set(
        etcd_url: str) -> None:
    asyncio.run(_resume_compacted(etcd_url))
