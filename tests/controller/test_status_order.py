"""Statuses never go backwards (issue 6, order): each status an agent produces carries a seq from its Reporter
(agent.report_order), and the controller's write refuses one not newer than the status it holds for the run.
Real etcd; two controllers' orchestrators (one with a cluster cache, one reading etcd), statuses numbered by a
real Reporter on a real state dir."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from agent.report_order import ReportOrder
from agent.worker import Reporter
from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import Store
from tests.controller.conftest import cache_on, until


def _numbered(reporter: Reporter, cid: str, *statuses: t.ContainerStatus) -> list[t.ContainerStatus]:
    """The statuses as the agent's Reporter sends them (each numbered when reported)."""
    for status in statuses:
        reporter.report(cid, status)
    assert [s.seq for s in statuses] == sorted({s.seq for s in statuses}) and statuses[0].seq
    return list(statuses)


async def _create(store: Store, name: str) -> str:
    cid = secrets.token_hex(32)
    await store.create_container(t.Container(
        id=cid, spec=t.ContainerSpec(name=f"{name}-{cid[:8]}", image="busybox"),
        desired_state=t.DESIRED_RUNNING, generation=1))
    return cid


async def _stop(orchestrator: Orchestrator) -> None:
    for task in list(orchestrator._tasks):  # the group commits in flight
        task.cancel()
    await asyncio.gather(*orchestrator._tasks, return_exceptions=True)


async def _redone_over_newer(url: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with cache_on(url) as (store, cache, _):
        a = Orchestrator(store, ControllerMetrics())  # the controller the agent's old stream goes to
        a.cache = cache
        other = Store(url)  # another controller, reading etcd: where the agent's new session went
        await other.connect()
        b = Orchestrator(other, ControllerMetrics())
        try:
            cid = await _create(store, "order")
            await until(lambda: cache.container(cid) and cache.status(cid), "the container in the cache")
            running, exited = _numbered(Reporter(ReportOrder(state_dir)), cid,
                                        t.ContainerStatus(state=t.STATE_RUNNING, generation=1, pid=42),
                                        t.ContainerStatus(state=t.STATE_EXITED, generation=1, exit_code=3))
            put_statuses = store.put_statuses

            async def newer_landed_first(items: list[tuple[str, t.ContainerStatus, int, int | None]]) -> int:
                # While A's group commit is on its way, the agent (its stream to A broken one way: A still sees
                # the caller) has sent RUNNING again and then EXITED through B, which recorded them.
                monkeypatch.setattr(store, "put_statuses", put_statuses)
                assert await b.on_status(cid, running) and await b.on_status(cid, exited)
                return await put_statuses(items)  # fails its compare: A redoes RUNNING alone on a fresh read

            monkeypatch.setattr(store, "put_statuses", newer_landed_first)
            await asyncio.wait_for(a.on_statuses([(cid, running)]), 10)  # acknowledged: the agent forgets it
            assert (await store.get_status(cid))[0] == exited, "an older status of the run landed over a newer one"
            assert not await b.on_status(cid, running), "a report not newer than the stored status was recorded"
            assert (await store.get_status(cid))[0] == exited
        finally:
            await _stop(a)
            await other.close()


def test_a_report_redone_on_a_fresh_read_never_lands_over_a_newer_status(
        etcd_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The case the status-revision compare left open: A's transaction fails its compare, A redoes the report on
    a fresh read (its caller still seems alive, as in a one-way partition) and finds the newer status the agent
    sent through B: the report is dropped, not written over it."""
    asyncio.run(_redone_over_newer(etcd_url, tmp_path, monkeypatch))


async def _one_batch_out_of_order(url: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with cache_on(url) as (store, cache, _):
        a = Orchestrator(store, ControllerMetrics())
        a.cache = cache
        try:
            cid = await _create(store, "batch")
            await until(lambda: cache.container(cid) and cache.status(cid), "the container in the cache")
            running, exited = _numbered(Reporter(ReportOrder(state_dir)), cid,
                                        t.ContainerStatus(state=t.STATE_RUNNING, generation=1, pid=42),
                                        t.ContainerStatus(state=t.STATE_EXITED, generation=1, exit_code=3))
            batches: list[int] = []
            put_statuses = store.put_statuses

            async def counted(items: list[tuple[str, t.ContainerStatus, int, int | None]]) -> int:
                batches.append(len(items))
                return await put_statuses(items)

            monkeypatch.setattr(store, "put_statuses", counted)
            # Two sessions of one agent on this controller (the old one not noticed gone yet): the newer status
            # is queued first, the older one right after, and both go in one group commit.
            await asyncio.wait_for(asyncio.gather(a.on_statuses([(cid, exited)]), a.on_statuses([(cid, running)])), 10)
            assert batches == [1], f"expected one group commit of one put, got {batches}"
            assert (await store.get_status(cid))[0] == exited, "the older of two reports in one commit was written"
        finally:
            await _stop(a)


def test_the_newest_of_a_containers_reports_in_one_commit_is_written(
        etcd_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_one_batch_out_of_order(etcd_url, tmp_path, monkeypatch))


async def _agent_restart(url: str, state_dir: Path) -> None:
    async with cache_on(url) as (store, cache, _):
        a = Orchestrator(store, ControllerMetrics())
        a.cache = cache
        try:
            cid = await _create(store, "restart")
            await until(lambda: cache.container(cid) and cache.status(cid), "the container in the cache")
            clock = [2_000_000_000.0]
            before = _numbered(Reporter(ReportOrder(state_dir, clock=lambda: clock[0])), cid,
                               t.ContainerStatus(state=t.STATE_RUNNING, generation=1, pid=42),
                               t.ContainerStatus(state=t.STATE_EXITED, generation=1, exit_code=1))
            for status in before:
                await asyncio.wait_for(a.on_statuses([(cid, status)]), 10)
            # The agent restarts (its clock set back meanwhile); the restart policy starts the run again: a
            # PREPARING without restart_count, then RUNNING, of the same generation. They must land.
            clock[0] -= 3600
            after = _numbered(Reporter(ReportOrder(state_dir, clock=lambda: clock[0])), cid,
                              t.ContainerStatus(state=t.STATE_PREPARING, generation=1),
                              t.ContainerStatus(state=t.STATE_RUNNING, generation=1, pid=43, restart_count=1))
            assert after[0].seq > before[-1].seq
            await asyncio.wait_for(a.on_statuses([(cid, after[0])]), 10)
            assert (await store.get_status(cid))[0] == after[0], "a restarted agent's status was refused"
            await asyncio.wait_for(a.on_statuses([(cid, after[1])]), 10)
            await asyncio.wait_for(a.on_statuses([(cid, before[-1])]), 10)  # the old agent's EXITED, late
            assert (await store.get_status(cid))[0] == after[1]
            # The controller's own statuses neither refuse nor are refused: a new run (start) is written over
            # the agent's numbered ones, and the agent's first status of that run over it.
            await a.set_desired(cid, t.DESIRED_STOPPED)
            assert (await a.set_desired(cid, t.DESIRED_RUNNING)).generation == 2
            assert (await store.get_status(cid))[0].state == t.STATE_PENDING
            first = _numbered(Reporter(ReportOrder(state_dir)), cid,
                              t.ContainerStatus(state=t.STATE_PREPARING, generation=2))[0]
            await asyncio.wait_for(a.on_statuses([(cid, first)]), 10)
            assert (await store.get_status(cid))[0] == first
        finally:
            await _stop(a)


def test_a_restarted_agents_statuses_follow_its_earlier_ones(etcd_url: str, tmp_path: Path) -> None:
    """The order is kept across agent restarts (the epoch in the state dir), even with the clock set back; and
    the controller's statuses of a new run (seq 0) neither block the agent's nor are blocked."""
    asyncio.run(_agent_restart(etcd_url, tmp_path))
