"""berthctl node inspect|update|rm (issue 6): a host's labels and availability, and forgetting a host.

`node inspect` shows the agent's fingerprint (capacity, platform, kernel, host name) and three label sets:
`agent_labels` (the agent's own: automatic `berth.*` ones, its labels file and `--label` flags),
`user_labels` (set with `node update --label-add`, kept across the agent's re-joins) and `labels`, the two
merged with the user's winning: what constraints match.

`node update --availability drain` moves the containers that can move (those with a restart policy) off the
host and waits until they run elsewhere, as `docker node update --availability drain` does for services.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from berthctl.client import CLIError, Connection

if TYPE_CHECKING:
    from berth.api import types_pb2

CALL_TIMEOUT_S = 60.0
AVAILABILITY = ("active", "pause", "drain")
MOVABLE = ("always", "on-failure", "unless-stopped")


def register(node_sub: Any) -> None:
    q = node_sub.add_parser("inspect", help="show hosts in full, as JSON")
    q.add_argument("nodes", nargs="+", metavar="NODE")
    q.set_defaults(func=cmd_node_inspect)

    q = node_sub.add_parser("update", help="change a host's labels or availability")
    q.add_argument("--label-add", action="append", default=[], metavar="KEY=VALUE", help="add or change a label")
    q.add_argument("--label-rm", action="append", default=[], metavar="KEY", help="remove a label")
    q.add_argument("--availability", choices=AVAILABILITY,
                   help="active; pause: nothing new is placed; drain: and what can move is moved off")
    q.add_argument("--no-wait", action="store_true", help="with drain: do not wait for the moves")
    q.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a drain")
    q.add_argument("node", metavar="NODE")
    q.set_defaults(func=cmd_node_update)

    q = node_sub.add_parser("rm", help="forget hosts that are down")
    q.add_argument("-f", "--force", action="store_true", help="also a host that is up")
    q.add_argument("nodes", nargs="+", metavar="NODE")
    q.set_defaults(func=cmd_node_rm)


def node_doc(n: types_pb2.Node) -> dict[str, Any]:
    from berth.api import types_pb2 as t

    return {
        "id": n.id, "name": n.name, "address": n.address, "agent_address": n.agent_address,
        "metrics_address": n.metrics_address, "state": "ready" if n.state == t.NODE_READY else "down",
        "availability": AVAILABILITY[n.availability], "containers": n.containers, "platform": n.platform,
        "memory_bytes": n.capacity.memory_bytes, "nano_cpus": n.capacity.nano_cpus,
        "allocated_memory_bytes": n.allocated.memory_bytes, "allocated_nano_cpus": n.allocated.nano_cpus,
        "labels": {**n.labels, **n.user_labels}, "agent_labels": dict(n.labels),
        "user_labels": dict(n.user_labels),
        # issue 6: the agent's fingerprint
        "hostname": n.hostname, "kernel_version": n.kernel_version, "joined_at_ns": n.joined_at_ns,
    }


def cmd_node_inspect(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    reply = conn.control.ListNodes(control_pb2.ListNodesRequest(), timeout=CALL_TIMEOUT_S)
    docs = []
    for ref in args.nodes:
        node = next((n for n in reply.nodes if ref in (n.id, n.name)), None)
        if node is None:
            raise CLIError(f"no such node: {ref} (berthctl node ls lists them)")
        docs.append(node_doc(node))
    print(json.dumps(docs, indent=2))
    return 0


def cmd_node_update(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2
    from berth.api import types_pb2 as t

    request = control_pb2.UpdateNodeRequest(ref=args.node, label_rm=args.label_rm)
    for label in args.label_add:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise CLIError(f"invalid --label-add {label!r}: write --label-add KEY=VALUE")
        request.label_add[key] = value
    if args.availability is not None:
        request.set_availability = True
        request.availability = AVAILABILITY.index(args.availability)  # type: ignore[assignment]
    node = conn.control.UpdateNode(request, timeout=CALL_TIMEOUT_S)
    if node.availability == t.AVAILABILITY_DRAIN and not args.no_wait:
        _wait_drained(conn, node.id, args.timeout)
    print(node.name)
    return 0


def _wait_drained(conn: Connection, node_id: str, timeout: float) -> None:
    """Until no container that can move is on the node, and those moved off run again."""
    from berth.api import control_pb2
    from berth.api import types_pb2 as t

    deadline = time.monotonic() + timeout
    while True:
        containers = conn.control.List(control_pb2.ListRequest(all=True), timeout=CALL_TIMEOUT_S).containers
        moving = [c for c in containers if c.spec.restart_policy in MOVABLE and c.desired_state == t.DESIRED_RUNNING
                  and (c.node_id == node_id or (node_id in c.stale_nodes and c.status.state != t.STATE_RUNNING))]
        if not moving:
            return
        if time.monotonic() > deadline:
            names = ", ".join(c.spec.name or c.id[:12] for c in moving[:5])
            raise CLIError(f"drain of {node_id} not done after {timeout:g}s: {len(moving)} still moving ({names}); "
                           "see berthctl ps -a")
        time.sleep(0.2)


def cmd_node_rm(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    for ref in args.nodes:
        conn.control.RemoveNode(control_pb2.RemoveNodeRequest(ref=ref, force=args.force), timeout=CALL_TIMEOUT_S)
        print(ref)
    return 0
