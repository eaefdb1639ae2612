"""berth.healthcheck: Docker's durations, defaults and the checks refused (issue 6)."""

from __future__ import annotations

import pytest

from berth.api import types_pb2 as t
from berth.healthcheck import HealthCheckError, effective, parse_duration, suffix, validate


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("1m30s", 90), ("500ms", 0.5), ("2", 2), ("1h", 3600),
                                               ("1.5s", 1.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "--health-interval") == seconds


@pytest.mark.parametrize("text", ["", "5x", "s", "1s2", "-1s", "1 s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(HealthCheckError, match="--health-timeout"):
        parse_duration(text, "--health-timeout")


def test_defaults_and_command_lines() -> None:
    e = effective(t.HealthCheck(test=["CMD-SHELL", "wget -q localhost"]))
    assert (e.args, e.interval_s, e.timeout_s, e.retries, e.start_period_s) == (
        ("/bin/sh", "-c", "wget -q localhost"), 30.0, 30.0, 3, 0.0)
    assert effective(t.HealthCheck(test=["CMD", "true", "x"], retries=1)).args == ("true", "x")
    assert suffix(t.Health(status="starting")) == " (health: starting)" and suffix(t.Health()) == ""


@pytest.mark.parametrize(("hc", "message"), [
    (t.HealthCheck(retries=-1), "--health-retries must not be negative"),  # for the image's check (Docker)
    (t.HealthCheck(test=["CMD-SHELL", " "]), "--health-cmd is empty"),
    (t.HealthCheck(test=["CMD-SHELL", "true"], retries=-1), "--health-retries must not be negative"),
    (t.HealthCheck(test=["CMD-SHELL", "true"], timeout_s=0.0001), "--health-timeout must be at least 1ms"),
    (t.HealthCheck(test=["HTTP", "x"]), "invalid health check test 'HTTP'"),
])
def test_refused(hc: t.HealthCheck, message: str) -> None:
    problem = validate(hc)
    assert problem is not None and message in problem
    assert validate(t.HealthCheck(test=["NONE"])) is None and validate(t.HealthCheck()) is None
    assert validate(t.HealthCheck(interval_s=1, retries=2)) is None  # timings for the image's HEALTHCHECK
