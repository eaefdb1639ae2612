"""agent.worker.Reporter: the latest status per container is delivered, but a RUNNING not delivered yet is
not replaced by what follows it (issue 2: a container that exits while an earlier report is in flight is
still recorded as started)."""

from __future__ import annotations

import asyncio

from agent.worker import Reporter
from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t


def status(state: int, generation: int = 1) -> t.ContainerStatus:
    return t.ContainerStatus(state=state, generation=generation)  # type: ignore[arg-type]


async def deliver(reporter: Reporter, during_first: list[tuple[str, t.ContainerStatus]],
                  fail_first: bool = False) -> list[list[tuple[str, int]]]:
    """Run the reporter until it is idle; the reports in `during_first` are made while the first batch is
    in flight (which fails when fail_first). Returns each delivered batch as (container, state) pairs."""
    batches: list[list[tuple[str, int]]] = []
    first = True

    async def send(report: d.StatusReport) -> None:
        nonlocal first
        if first:
            first = False
            for cid, s in during_first:
                reporter.report(cid, s)
            await asyncio.sleep(0)
            if fail_first:
                raise ConnectionError("controller away")
        batches.append([(u.container_id, u.status.state) for u in report.updates])

    task = asyncio.create_task(reporter.run(send, lambda: "node"))
    for _ in range(200):
        await asyncio.sleep(0.001)
        if not reporter._pending and not reporter._after and not first:
            break
    task.cancel()
    return batches


def test_latest_state_wins_but_an_undelivered_running_goes_first() -> None:
    async def body() -> None:
        r = Reporter()
        r.report("a", status(t.STATE_PREPARING))
        batches = await deliver(r, [("a", status(t.STATE_RUNNING)), ("a", status(t.STATE_EXITED)),
                                    ("b", status(t.STATE_PREPARING)), ("b", status(t.STATE_FAILED))])
        assert batches == [
            [("a", t.STATE_PREPARING)],
            [("a", t.STATE_RUNNING), ("b", t.STATE_FAILED)],  # b: the latest only
            [("a", t.STATE_EXITED)],
        ]
        assert r.sent["a"].state == t.STATE_EXITED

    asyncio.run(body())


def test_a_failed_batch_keeps_the_order() -> None:
    async def body() -> None:
        r = Reporter()
        r.report("a", status(t.STATE_RUNNING))
        batches = await deliver(r, [("a", status(t.STATE_EXITED))], fail_first=True)
        assert batches == [[("a", t.STATE_RUNNING)], [("a", t.STATE_EXITED)]]

    asyncio.run(body())


def test_a_new_generation_replaces_an_old_running() -> None:
    r = Reporter()
    r.report("a", status(t.STATE_RUNNING, generation=1))
    r.report("a", status(t.STATE_PREPARING, generation=2))
    assert r._pending["a"].generation == 2 and not r._after
