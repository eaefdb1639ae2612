"""berthctl's lifecycle verbs beyond run/start/stop (issue 3a), as Docker has them:

    create [run's flags] IMAGE [COMMAND...]   make a container without starting it; prints its id
    kill [-s SIGNAL] CONTAINER...             send a signal (KILL by default); a kill is a user's stop for
                                              the restart policy
    restart [-t SECONDS] CONTAINER...         stop (SIGTERM, SIGKILL after the grace time), then start
    pause CONTAINER... / unpause CONTAINER... freeze and thaw every process of a container

and the helpers of `logs --since/--timestamps` and of the exit reason `inspect` shows. Imports of gRPC and
the generated API stay inside the commands, as in berthctl.main.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import decimal
import re
import sys
import time
from typing import TYPE_CHECKING

from berthctl.client import CLIError, Connection

if TYPE_CHECKING:
    from berth.api import types_pb2

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)$")
_FRACTION = re.compile(r"(?<=:\d\d)\.(\d+)")  # an RFC 3339 time's fraction of a second
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("create", help="create a container without starting it (takes run's flags)",
                       prefix_chars="\0")  # every argument goes to run's parser
    p.add_argument("run_args", nargs=argparse.REMAINDER, metavar="[RUN FLAGS] IMAGE [COMMAND...]")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("kill", help="send a signal to running containers (default KILL)")
    p.add_argument("-s", "--signal", default="KILL", help="signal name or number, e.g. TERM, HUP, 10")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_kill)

    p = sub.add_parser("restart", help="stop, then start containers")
    p.add_argument("-t", "--time", type=float, default=-1, help="seconds before SIGKILL (default 10)")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_restart)

    for verb, text in (("pause", "freeze every process of containers"), ("unpause", "thaw paused containers")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("containers", nargs="+", metavar="CONTAINER")
        p.set_defaults(func=cmd_pause, pause=verb == "pause")


def parse_since(text: str, now_s: float) -> int:
    """--since: an RFC 3339 time (2026-11-27T18:00:00Z, 2026-11-27T18:00:00.5+01:00, 2026-11-27), a Unix time
    in seconds, or a duration back from now (10m, 1.5h, 30s) -> nanoseconds since the epoch."""
    text = text.strip()
    m = _DURATION.match(text)
    if m:
        return int((now_s - float(m.group(1)) * _UNIT_S[m.group(2)]) * 1e9)
    # Exact to the nanosecond (a `logs --timestamps` stamp given back keeps its own line): no float of seconds
    # (~240 ns apart today) and no datetime (microseconds) holds the fraction.
    with contextlib.suppress(decimal.InvalidOperation):
        seconds = decimal.Decimal(text)
        if seconds.is_finite():
            return int(seconds * 1_000_000_000)
    fraction = _FRACTION.search(text)
    try:
        when = dt.datetime.fromisoformat((text[:fraction.start()] + text[fraction.end():] if fraction else text)
                                         .replace("Z", "+00:00"))
    except ValueError:
        raise CLIError(f"invalid --since {text!r}: give a time (2026-11-27T18:00:00Z), Unix seconds, "
                       "or a duration such as 10m") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    whole = (when - _EPOCH) // dt.timedelta(seconds=1)
    return whole * 1_000_000_000 + (int(fraction.group(1)[:9].ljust(9, "0")) if fraction else 0)


def timestamp_prefix(ns: int) -> bytes:
    """`logs --timestamps`: RFC 3339 with nanoseconds, as docker logs -t prints it."""
    sec, frac = divmod(ns, 1_000_000_000)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:09d}Z ").encode()


def exit_reason(s: types_pb2.ContainerStatus) -> str:
    """How the last run ended, for inspect: exited, killed by signal N, OOM-killed ("" while it runs)."""
    from berth.api import types_pb2 as t

    if s.state != t.STATE_EXITED:
        return ""
    if s.oom_killed:
        return "OOM-killed"
    if s.signal:
        return f"killed by signal {s.signal}"
    return "exited"


def _each(conn: Connection, refs: list[str], action: object) -> int:
    from berthctl.main import _each as each

    return each(conn, refs, action)  # type: ignore[arg-type]


def cmd_create(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2
    from berthctl.main import _parse_spec, build_parser

    run_args = build_parser().parse_args(["run", *args.run_args])
    c = conn.control.Create(control_pb2.RunRequest(spec=_parse_spec(run_args)), timeout=60)
    print(c.id)
    return 0


def cmd_kill(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    return _each(conn, args.containers, lambda ref: conn.control.Kill(
        control_pb2.KillRequest(ref=ref, signal=args.signal), timeout=60))


def cmd_restart(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    def restart(ref: str) -> None:
        conn.control.Stop(control_pb2.StopRequest(ref=ref, timeout_s=args.time), timeout=max(args.time, 10) + 60)
        conn.control.Start(control_pb2.ContainerRef(ref=ref), timeout=120)

    return _each(conn, args.containers, restart)


def cmd_pause(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    call = conn.control.Pause if args.pause else conn.control.Unpause
    return _each(conn, args.containers, lambda ref: call(control_pb2.ContainerRef(ref=ref), timeout=60))


def write_entry(entry: types_pb2.LogEntry, timestamps: bool) -> None:
    out = sys.stderr if entry.stream == 1 else sys.stdout
    if timestamps:
        out.buffer.write(timestamp_prefix(entry.timestamp_ns))
    out.buffer.write(entry.data)
    out.flush()
