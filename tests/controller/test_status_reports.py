"""An agent's status report taken alone (Orchestrator.on_status, the path of a report the cache has not seen)
over a real etcd: a report that turns stale between the generation check and the write (a new run started,
or the container moved off the reporting host) never overwrites the newer status; one that only raced an
unrelated change of the container is still recorded, on a fresh read."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import pytest

from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import Store, Versioned
from tests.controller.conftest import wipe_etcd


async def _start_again(other: Store, v: Versioned) -> None:
    """What Orchestrator.start commits: a new run (generation + 1) with its first status."""
    new = t.Container()
    new.CopyFrom(v.container)
    new.generation += 1
    await other.update_container(v, new, status=t.ContainerStatus(state=t.STATE_ASSIGNED, generation=new.generation))


async def _move_off(other: Store, v: Versioned) -> None:
    await Orchestrator(other, ControllerMetrics()).move_off(v, "its host is down")


async def _relabel(other: Store, v: Versioned) -> None:
    """A change that is no new run: the report stays current."""
    new = t.Container()
    new.CopyFrom(v.container)
    new.spec.labels["touched"] = "yes"
    await other.update_container(v, new)


Meanwhile = Callable[[Store, Versioned], Awaitable[None]]


async def _late_report(url: str, meanwhile: Meanwhile) -> tuple[bool, t.ContainerStatus]:
    """A RUNNING report of generation 1 from node n1, with `meanwhile` committed by another controller right
    after on_status read the container. Returns on_status's answer and the status stored afterwards."""
    store, other = Store(url), Store(url)
    await store.connect()
    await other.connect()
    try:
        c = t.Container(id=secrets.token_hex(32), spec=t.ContainerSpec(name="late", image="busybox"),
                        desired_state=t.DESIRED_RUNNING, generation=1, node_id="n1")
        await store.create_container(c)
        read = store.get_container
        reads = 0

        async def read_then_interfere(cid: str) -> Versioned:
            nonlocal reads
            reads += 1
            v = await read(cid)
            if reads == 1:
                await meanwhile(other, v)
            return v

        store.get_container = read_then_interfere  # type: ignore[method-assign]
        orchestrator = Orchestrator(store, ControllerMetrics())
        recorded = await orchestrator.on_status(c.id, t.ContainerStatus(state=t.STATE_RUNNING, generation=1))
        status, _ = await other.get_status(c.id)
        return recorded, status
    finally:
        await wipe_etcd(url)
        await store.close()
        await other.close()


@pytest.mark.parametrize(("meanwhile", "state"), [(_start_again, t.STATE_ASSIGNED), (_move_off, t.STATE_PENDING)],
                         ids=["new-run", "moved-off"])
def test_a_report_of_a_run_superseded_meanwhile_is_dropped(
        etcd_url: str, meanwhile: Meanwhile, state: int) -> None:
    recorded, status = asyncio.run(_late_report(etcd_url, meanwhile))
    assert not recorded
    assert (status.state, status.generation) == (state, 2), status


def test_a_report_that_raced_another_change_is_recorded_on_a_fresh_read(etcd_url: str) -> None:
    recorded, status = asyncio.run(_late_report(etcd_url, _relabel))
    assert recorded
    assert (status.state, status.generation) == (t.STATE_RUNNING, 1), status
