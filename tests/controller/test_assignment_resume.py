"""An agent's Assignments stream resumed from the revision of the last message it got never misses a change:
one etcd transaction can change many of a node's assignments at one revision (a group-committed batch of
Run calls placed on one host), and a message holds at most MAX_CHANGES of them, so a message that ends in
the middle of a revision must not carry that revision (the agent would resume after it, and the rest of
the revision's changes would never come). Real etcd and cluster cache; the stream ends (a controller
failover) right after the first message."""

from __future__ import annotations

import asyncio

import pytest

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from controller import dispatcher as dispatcher_module
from controller.dispatcher import Dispatcher
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import container_key
from tests.controller.conftest import cache_on, dispatcher_on, store_on, until


def _placed(cid: str, node_id: str = "n1") -> bytes:
    """A container key's value: the container placed on a node (its assignment there, issue 6)."""
    return t.Container(id=cid, node_id=node_id, generation=1, desired_state=t.DESIRED_RUNNING).SerializeToString()


async def _resume_mid_revision(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatcher_module, "MAX_CHANGES", 2)
    async with cache_on(url) as (store, cache, client):
        dispatcher = Dispatcher(store, Orchestrator(store, ControllerMetrics()), ControllerMetrics(), 5)
        follow = cache.follow_assignments("n1")
        assert follow is not None
        current, queue = follow
        stream = dispatcher._from_cache(cache, "n1", current, current, queue)
        cids = ["c0", "c1", "c2"]
        tx = client.transactions
        await client.transaction([], [tx.put(container_key(c), _placed(c)) for c in cids], [])  # one revision
        await until(lambda: queue.qsize() == 3, "the three changes")
        first = await asyncio.wait_for(anext(stream), 10)
        assert [c.container_id for c in first.changes] == ["c0", "c1"]
        await stream.aclose()  # the controller goes away: the agent resumes after the revision it took

        follow = cache.follow_assignments("n1")
        assert follow is not None
        resumed = dispatcher._from_cache(cache, "n1", first.revision, *follow)
        try:
            msg = await asyncio.wait_for(anext(resumed), 10)
        except TimeoutError:
            raise AssertionError("c2 never came: the agent resumed after the revision of a message that did not "
                                 "hold all of it") from None
        finally:
            await resumed.aclose()
        if msg.kind == d.AssignmentsMessage.COMPLETE:
            assert sorted(c.container_id for c in msg.changes) == cids
        else:
            assert "c2" in [c.container_id for c in msg.changes]


def test_a_stream_resumed_after_a_message_cut_inside_a_revision_gets_the_rest(etcd_url: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_resume_mid_revision(etcd_url, monkeypatch))


async def _resume_mid_revision_from_etcd(url: str) -> None:
    """The same without a cluster cache (the stream follows an etcd watch of its own, a message a change)."""
    async with store_on(url) as (store, client), dispatcher_on(store, Orchestrator(store, ControllerMetrics())) as (
            _, stub):
        start = await store.revision()
        call = stub.Assignments(d.AssignmentsRequest(node_id="n1", after_revision=start))
        cids = ["c0", "c1", "c2"]
        tx = client.transactions
        await client.transaction([], [tx.put(container_key(c), _placed(c)) for c in cids], [])  # one revision
        first = await asyncio.wait_for(anext(aiter(call)), 10)
        assert [c.container_id for c in first.changes] == ["c0"]
        call.cancel()  # the controller goes away: the agent resumes after the revision it took

        resumed = stub.Assignments(d.AssignmentsRequest(node_id="n1", after_revision=first.revision))
        seen: list[str] = []
        try:
            async with asyncio.timeout(10):
                async for msg in resumed:
                    seen += [c.container_id for c in msg.changes]
                    if "c2" in seen:
                        break
        except TimeoutError:
            raise AssertionError(f"c2 never came (got {seen}): the agent resumed after the revision of a message "
                                 "that did not hold all of it") from None
        finally:
            resumed.cancel()


def test_a_stream_from_etcd_resumed_inside_a_revision_gets_the_rest(etcd_url: str) -> None:
    asyncio.run(_resume_mid_revision_from_etcd(etcd_url))
