"""issue 6 (throughput): the agent's CPU per container. On Python 3.11 each asyncio.get_running_loop() is a
getpid(2); the worker and the reporter look the loop up once (agent.wake) instead of for each container's
actor task, wake-up and status batch. An agent process sets the collector's thresholds (agent.main.tune_gc).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import hollow
from agent import main as agent_main
from agent.hollow import HollowExecutor
from agent.metrics import AgentMetrics
from agent.wake import Wake
from agent.worker import Reporter, Worker
from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from tests.agent.conftest import run
from tests.agent.test_run_record import Images, assignments, cid


@pytest.fixture
def loop_lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the running-loop look-ups (each a getpid(2) on Python 3.11) made through asyncio's Python API."""
    calls = [0]

    def counting(real: Callable[[], Any]) -> Callable[[], Any]:
        def lookup() -> Any:
            calls[0] += 1
            return real()
        return lookup

    monkeypatch.setattr(asyncio.events, "get_running_loop", counting(asyncio.events.get_running_loop))
    monkeypatch.setattr(asyncio.events, "_get_running_loop", counting(asyncio.events._get_running_loop))
    monkeypatch.setattr(asyncio, "get_running_loop", counting(asyncio.get_running_loop))
    yield calls


def test_starting_containers_does_not_look_up_the_loop_for_each(tmp_path: Path, loop_lookups: list[int]) -> None:
    n = 200

    async def body() -> tuple[int, int]:
        reporter = Reporter()
        w = Worker(HollowExecutor(tmp_path), Images(), reporter, AgentMetrics(), tmp_path)
        await w.load()
        running: set[str] = set()
        all_running = asyncio.get_running_loop().create_future()

        async def send(report: d.StatusReport) -> None:
            running.update(u.container_id for u in report.updates if u.status.state == t.STATE_RUNNING)
            if len(running) == n and not all_running.done():
                all_running.set_result(None)

        sender = asyncio.create_task(reporter.run(send, lambda: "node"))
        await asyncio.sleep(0)  # the reporter waits for statuses
        before = loop_lookups[0]
        for i in range(0, n, 10):  # ten at a time, each group reported in its own batches
            w.apply(assignments(range(i, i + 10), complete=False))
            for _ in range(3):
                await asyncio.sleep(0)
        await all_running
        during = loop_lookups[0] - before
        sender.cancel()
        actors = len(w._actors)
        for task in list(w._actors.values()):
            task.cancel()
        w._record.close()  # the worker's record file (no Worker.close: an agent's worker lives as long as it)
        assert sorted(running) == sorted(cid(i) for i in range(n))
        return during, actors

    during, actors = run(body())
    assert actors == n, "each running container keeps its actor, waiting for a change"
    # the sleeps above (one look-up each) and a handful for the first task, future and wake-up of each kind;
    # before agent.wake: three or more per container (its actor task, its actor's wake-up, the reporter's)
    assert during <= 3 * (n // 10) + 10, f"{during} running-loop look-ups for {n} containers started"


def test_wake_is_an_event_for_one_waiter() -> None:
    async def body() -> None:
        wake = Wake()
        wake.set()
        await asyncio.wait_for(wake.wait(), 5)  # set before: no wait
        wake.clear()
        assert not wake.is_set()
        waiter = asyncio.create_task(wake.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
        with pytest.raises(RuntimeError, match="one waiter"):
            await wake.wait()
        wake.set()
        wake.clear()  # cleared again before the waiter ran: it was woken all the same, as with asyncio.Event
        await asyncio.wait_for(waiter, 5)
        waiter = asyncio.create_task(wake.wait())
        await asyncio.sleep(0)
        waiter.cancel()  # a cancelled waiter leaves room for the next
        with pytest.raises(asyncio.CancelledError):
            await waiter
        wake.set()
        await asyncio.wait_for(wake.wait(), 5)

    run(body())


@pytest.mark.parametrize("which", ["agent", "hollow"])
def test_agent_processes_set_the_collector_thresholds(monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    def no_serving(coro: Any) -> None:
        coro.close()  # the process's work is not what this test is about

    module: Any = agent_main if which == "agent" else hollow
    monkeypatch.setattr(module.event_loop, "run", no_serving)
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        if which == "agent":
            agent_main.main(["--controller", "127.0.0.1:1", "--state-dir", "/nonexistent"])
        else:
            hollow.main(["--controller", "127.0.0.1:1", "--state-dir", "/nonexistent"])
        assert gc.get_threshold() == agent_main.GC_THRESHOLDS
    finally:
        gc.set_threshold(*saved)
