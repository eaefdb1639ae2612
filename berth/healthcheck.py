"""Health checks as Docker defines them (issue 6), shared by berthctl, the controller and the agent: the
`--health-*` durations as users write them, the defaults, the check's command line, and what makes one
invalid. The agent runs the checks (agent.health); this module does no I/O.

Docker's semantics: the first check runs one interval after the container starts, then every interval; a
check that exits 0 is a pass, anything else (or running past the timeout) a failure; `retries` failures in a
row make the container unhealthy, one pass makes it healthy; failures during the start period do not
count until the first pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from berth.api import types_pb2 as t

DEFAULT_INTERVAL_S = 30.0
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 3
LOG_ENTRIES = 5  # results kept, as Docker
MAX_OUTPUT = 4096  # bytes of a check's output kept, as Docker

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class HealthCheckError(ValueError):
    """A health check option that cannot be used; the message says what to write."""


def parse_duration(text: str, flag: str) -> float:
    """Go's durations as Docker takes them (`30s`, `1m30s`, `500ms`), or plain seconds; -> seconds."""
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pos, value = 0, 0.0
        for m in _DURATION.finditer(s):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(s) or not s:
            raise HealthCheckError(f"invalid {flag} {text!r}: write a duration such as 30s, 1m30s or 500ms") from None
    if value < 0:
        raise HealthCheckError(f"invalid {flag} {text!r}: it must not be negative")
    return value


@dataclass(frozen=True)
class Effective:
    """A check with Docker's defaults filled in."""

    args: tuple[str, ...]
    interval_s: float
    timeout_s: float
    retries: int
    start_period_s: float


def enabled(hc: t.HealthCheck) -> bool:
    return bool(hc.test) and hc.test[0] != "NONE"


def effective(hc: t.HealthCheck) -> Effective:
    test = list(hc.test)
    args = ("/bin/sh", "-c", test[1]) if test[0] == "CMD-SHELL" else tuple(test[1:])
    return Effective(
        args, hc.interval_s or DEFAULT_INTERVAL_S, hc.timeout_s or DEFAULT_TIMEOUT_S,
        hc.retries or DEFAULT_RETRIES, hc.start_period_s,
    )


def validate(hc: t.HealthCheck) -> str | None:
    """Why a check cannot be used, or None."""
    kind = hc.test[0] if hc.test else ""  # none: the timings given apply to the image's HEALTHCHECK (Docker)
    if kind == "NONE":
        return None
    if kind == "CMD-SHELL" and (len(hc.test) != 2 or not hc.test[1].strip()):
        return ("--health-cmd is empty: give the command that checks the container, "
                "e.g. --health-cmd 'wget -q -O- localhost'")
    if kind == "CMD" and len(hc.test) < 2:
        return "a CMD health check needs a command"
    if kind not in ("", "CMD", "CMD-SHELL"):
        return f"invalid health check test {kind!r}: CMD, CMD-SHELL or NONE"
    for name, value in (("--health-interval", hc.interval_s), ("--health-timeout", hc.timeout_s)):
        if value < 0 or 0 < value < 0.001:
            return f"{name} must be at least 1ms"
    if hc.start_period_s < 0:
        return "--health-start-period must not be negative"
    if hc.retries < 0:
        return "--health-retries must not be negative"
    return None


def suffix(health: t.Health) -> str:
    """What `ps` adds to `Up 5 seconds`, as Docker: ` (healthy)`, ` (unhealthy)`, ` (health: starting)`."""
    if health.status == "starting":
        return " (health: starting)"
    return f" ({health.status})" if health.status else ""
