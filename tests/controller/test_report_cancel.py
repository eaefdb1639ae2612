"""A status report whose caller is gone is not written (issue 6, HA: the agent sends it again, maybe to another
controller, and a late write could undo a newer status), also when its batch mixes containers the cache
holds (queued for the group commit) with one it does not (recorded alone, on a read of etcd) and the caller
goes while that one is being recorded: the queued ones must not be written with the next group commit.
Real etcd and cache; the orchestrator's recording of the uncached one is held."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import status_key
from tests.controller.conftest import cache_on, until


async def _mixed_batch_caller_gone(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with cache_on(url) as (store, cache, _):
        orchestrator = Orchestrator(store, ControllerMetrics())
        orchestrator.cache = cache
        try:
            queued, kept = secrets.token_hex(32), secrets.token_hex(32)
            for cid in (queued, kept):
                await store.create_container(t.Container(
                    id=cid, spec=t.ContainerSpec(name=f"r-{cid[:8]}", image="busybox"),
                    desired_state=t.DESIRED_RUNNING, generation=1))
            await until(lambda: cache.container(queued) and cache.container(kept), "the containers in the cache")
            before, _ = await store.get_status(queued)
            uncached = secrets.token_hex(32)  # not in the cache: on_statuses records it alone
            recording = asyncio.Event()

            async def held_on_status(cid: str, status: t.ContainerStatus) -> bool:
                recording.set()
                await asyncio.Event().wait()  # held until the caller goes
                return False

            monkeypatch.setattr(orchestrator, "on_status", held_on_status)
            running = t.ContainerStatus(state=t.STATE_RUNNING, generation=1)
            report = asyncio.create_task(orchestrator.on_statuses([(queued, running), (uncached, running)]))
            await asyncio.wait_for(recording.wait(), 10)
            assert orchestrator._reports  # `queued` waits for the group commit
            report.cancel()  # its agent's stream ended
            await asyncio.gather(report, return_exceptions=True)
            await asyncio.wait_for(orchestrator.on_statuses([(kept, running)]), 10)  # the next group commit
            assert (await store.get_status(kept))[0].state == t.STATE_RUNNING
            assert (await store.get_status(queued))[0] == before, "a report whose caller was gone was written"
        finally:
            for task in list(orchestrator._tasks):  # the group commits in flight
                task.cancel()
            await asyncio.gather(*orchestrator._tasks, return_exceptions=True)


def test_a_mixed_batch_whose_caller_is_gone_is_not_written(etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_mixed_batch_caller_gone(etcd_url, monkeypatch))


async def _late_report(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with cache_on(url) as (store, cache, other):
        orchestrator = Orchestrator(store, ControllerMetrics())
        orchestrator.cache = cache
        try:
            cid = secrets.token_hex(32)
            await store.create_container(t.Container(
                id=cid, spec=t.ContainerSpec(name=f"late-{cid[:8]}", image="busybox"),
                desired_state=t.DESIRED_RUNNING, generation=1))
            await until(lambda: cache.container(cid) and cache.status(cid), "the container in the cache")
            put_statuses = store.put_statuses
            exited = t.ContainerStatus(state=t.STATE_EXITED, generation=1, exit_code=3)
            report: asyncio.Task[None] | None = None
            committed = asyncio.Event()

            async def delivered_late(items: list[tuple[str, t.ContainerStatus, int, int | None]]) -> int:
                # While this controller's transaction is on its way, the agent's stream breaks, and the agent
                # delivers this report and a newer one (the run exited) through another controller.
                assert report is not None
                report.cancel()
                await other.put(status_key(cid), exited.SerializeToString())  # the other controller's write
                try:
                    return await put_statuses(items)
                finally:
                    committed.set()

            monkeypatch.setattr(store, "put_statuses", delivered_late)
            running = t.ContainerStatus(state=t.STATE_RUNNING, generation=1, pid=42)
            report = asyncio.create_task(orchestrator.on_statuses([(cid, running)]))
            await asyncio.gather(report, return_exceptions=True)
            await asyncio.wait_for(committed.wait(), 10)  # this controller's transaction has been answered
            monkeypatch.undo()
            assert (await store.get_status(cid))[0] == exited, "a late report overwrote a newer status of its run"
        finally:
            for task in list(orchestrator._tasks):  # the group commits in flight
                task.cancel()
            await asyncio.gather(*orchestrator._tasks, return_exceptions=True)


def test_a_report_delivered_late_never_overwrites_a_newer_status(etcd_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A report already in the group commit's transaction when its caller goes (its agent's Reports stream
    broke) must not land over what the agent reported since through another controller: the transaction
    compares the status's revision with the one the report followed."""
    asyncio.run(_late_report(etcd_url, monkeypatch))
