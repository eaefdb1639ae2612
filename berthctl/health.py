"""berthctl's health check flags (issue 6), as Docker's: `--health-cmd`, `--health-interval`,
`--health-timeout`, `--health-retries`, `--health-start-period`, `--no-healthcheck`, on `run`, `create`,
`service create` and `service update` (which changes only the ones given)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from berth.healthcheck import HealthCheckError, parse_duration
from berthctl.client import CLIError

if TYPE_CHECKING:
    from berth.api import types_pb2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--health-cmd", metavar="CMD", help="command run in the container (by /bin/sh -c) to check "
                   "its health: exit 0 is healthy")
    p.add_argument("--health-interval", metavar="DURATION", help="time between checks, e.g. 30s (default 30s)")
    p.add_argument("--health-timeout", metavar="DURATION", help="a check running longer fails (default 30s)")
    p.add_argument("--health-retries", type=int, metavar="N",
                   help="failures in a row that make it unhealthy (default 3)")
    p.add_argument("--health-start-period", metavar="DURATION",
                   help="time after start when failures do not count until a check passes (default 0s)")
    p.add_argument("--no-healthcheck", action="store_true", help="run no health check")


def fill_spec(args: argparse.Namespace, spec: types_pb2.ContainerSpec) -> None:
    """Apply the flags given to spec.healthcheck (the others are left as they are). Timings without
    --health-cmd apply to the image's HEALTHCHECK, as Docker's (the agent merges them)."""
    hc = spec.healthcheck
    given = [f for f in ("health_cmd", "health_interval", "health_timeout", "health_retries", "health_start_period")
             if getattr(args, f, None) is not None]
    if args.no_healthcheck:
        if given:
            raise CLIError("--no-healthcheck conflicts with the other --health-* flags; give one or the other")
        spec.ClearField("healthcheck")  # detaches hc: the NONE goes into the spec's new (empty) check
        spec.healthcheck.test.append("NONE")
        return
    try:
        if args.health_cmd is not None:
            del hc.test[:]
            hc.test.extend(["CMD-SHELL", args.health_cmd])
        if args.health_interval is not None:
            hc.interval_s = parse_duration(args.health_interval, "--health-interval")
        if args.health_timeout is not None:
            hc.timeout_s = parse_duration(args.health_timeout, "--health-timeout")
        if args.health_start_period is not None:
            hc.start_period_s = parse_duration(args.health_start_period, "--health-start-period")
    except HealthCheckError as exc:
        raise CLIError(str(exc)) from None
    if args.health_retries is not None:
        if args.health_retries < 0:
            raise CLIError(f"invalid --health-retries {args.health_retries}: it must not be negative")
        hc.retries = args.health_retries
