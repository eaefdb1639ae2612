"""agent.health without a container: a check whose helper process cannot even start counts as a failed check
(the probe goes on) instead of ending the probe with the container's last health kept for ever. The whole
path on a cluster is tests/e2e/test_health.py."""

from __future__ import annotations

import asyncio
import sys
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
