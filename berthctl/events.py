"""berthctl events (issue 6): container, service, node and controller events as they happen, each with the
etcd revision it happened at; `--since REV` resumes right after an event already seen."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from berthctl.client import Connection


def register(sub: Any) -> None:
    p = sub.add_parser("events", help="stream cluster events (resumable with --since)")
    p.add_argument("--since", type=int, default=0, metavar="REV", help="events after this revision (default: from now)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="type=container|service|node|controller, name=, id=, action=, node=, service=")
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="json: one object a line")
    p.set_defaults(func=cmd_events)


def cmd_events(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    stream = conn.control.Events(control_pb2.EventsRequest(since_revision=args.since, filters=args.filter))
    for seen, e in enumerate(stream, start=1):
        attrs = dict(sorted(e.attributes.items()))
        if args.output == "json":
            line = json.dumps({"revision": e.revision, "type": e.type, "action": e.action, "id": e.id,
                               "name": e.name, "attributes": attrs})
        else:
            extra = ", ".join(f"{k}={v}" for k, v in attrs.items())
            line = f"{e.revision} {e.type} {e.action} {e.name or e.id[:12]}" + (f" ({extra})" if extra else "")
        print(line, flush=True)
        if args.count and seen >= args.count:
            break  # the channel closes with the connection
    sys.stdout.flush()
    return 0
