"""agent.health without a container: a check whose helper process cannot even start counts as a failed check
(the probe goes on) instead of ending the probe with the container's last health kept for ever. The whole
path on a cluster is tests/e2e/test_health.py."""

from __future__ import annotations

import asyncio
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest

from agent import exec_session
from agent.health import HealthReporter
from berth import healthcheck
from berth.api import types_pb2 as t


def test_a_check_that_cannot_start_is_a_failed_check(monkeypatch: pytest.MonkeyPatch) -> None:
    async def prepare(executor: Any, request: t.ExecStart) -> Any:
        return SimpleNamespace(to_json=lambda: "{}")

    monkeypatch.setattr(exec_session, "prepare", prepare)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")  # the helper cannot be started
    reporter = HealthReporter(executor=object())  # type: ignore[arg-type]
    check = healthcheck.effective(t.HealthCheck(test=["CMD", "true"]))
    result = asyncio.run(reporter.run_check("c" * 64, check))
    assert result.exit_code == -1
    assert result.output == "cannot run the health check on this host: No such file or directory"


class Scripted(HealthReporter):
    """Checks that give the scripted results (an exit code, or an exception raised) one per tick of the
    probe's interval, which the test drives."""

    def __init__(self, results: list[int | Exception]) -> None:
        self.ticks: asyncio.Queue[None] = asyncio.Queue()
        super().__init__(executor=object(), sleep=lambda _s: self.ticks.get())  # type: ignore[arg-type]
        self.results = iter(results)
        self.ran = 0

    async def run_check(self, cid: str, hc: healthcheck.Effective) -> t.HealthResult:
        self.ran += 1
        r = next(self.results)
        if isinstance(r, Exception):
            raise r
        return t.HealthResult(exit_code=r, output=f"exit {r}")


def test_start_period_retries_and_a_check_that_raises() -> None:
    cid = "d" * 64

    async def main() -> None:
        r = Scripted([1, 0, 1, 1, RuntimeError("exec helper crashed"), 0])
        r.assignments = {cid: t.Assignment(spec=t.ContainerSpec(healthcheck=t.HealthCheck(
            test=["CMD", "true"], interval_s=1, retries=2, start_period_s=600)))}
        r.report(cid, t.ContainerStatus(state=t.STATE_RUNNING, started_at_ns=time.time_ns()))
        assert r.sent[cid].health.status == "starting"

        async def tick() -> t.Health:
            ran = r.ran
            r.ticks.put_nowait(None)
            async with asyncio.timeout(10):
                while r.ran == ran or len(r.sent[cid].health.log) < min(ran + 1, healthcheck.LOG_ENTRIES):
                    await asyncio.sleep(0)
            return r.sent[cid].health

        h = await tick()  # a failure in the start period, before any pass: not counted
        assert (h.status, h.failing_streak) == ("starting", 0)
        assert (await tick()).status == "healthy"
        h = await tick()
        assert (h.status, h.failing_streak) == ("healthy", 1)
        h = await tick()
        assert (h.status, h.failing_streak) == ("unhealthy", 2)
        h = await tick()  # the check itself failed to run: a failed check, and the probe goes on
        assert (h.status, h.failing_streak, h.log[-1].exit_code) == ("unhealthy", 3, -1)
        assert h.log[-1].output == "the health check could not run: exec helper crashed"
        assert (await tick()).status == "healthy"
        r.report(cid, t.ContainerStatus(state=t.STATE_EXITED))  # stopped: its probe ends
        await asyncio.sleep(0)
        assert cid not in r._probes

    asyncio.run(main())
