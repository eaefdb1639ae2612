"""berthctl network create|ls|inspect|rm (issue 5): user networks, made and kept by the controller
(controller.user_networks). `run --network NAME` puts a container on one."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from berthctl.client import Connection

if TYPE_CHECKING:
    from berth.api import types_pb2

CALL_TIMEOUT_S = 60.0


def register(sub: Any) -> None:
    p = sub.add_parser("network", help="manage user networks")
    net_sub = p.add_subparsers(dest="network_command", metavar="COMMAND", required=True)

    q = net_sub.add_parser("create", help="create a user network")
    q.add_argument("--subnet", default="", metavar="CIDR",
                   help="its addresses, e.g. 10.130.0.0/24 (default: a free /24 of the controller's pool)")
    q.add_argument("name", metavar="NAME")
    q.set_defaults(func=cmd_create)

    q = net_sub.add_parser("ls", help="list networks")
    q.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    q.add_argument("-q", "--quiet", action="store_true", help="only names")
    q.set_defaults(func=cmd_ls)

    q = net_sub.add_parser("inspect", help="show networks in full: subnet, VNI, gateways and containers")
    q.add_argument("-o", "--output", choices=("table", "json"), default="json", help="output format")
    q.add_argument("networks", nargs="+", metavar="NETWORK")
    q.set_defaults(func=cmd_inspect)

    q = net_sub.add_parser("rm", help="remove user networks (none of their containers may remain)")
    q.add_argument("networks", nargs="+", metavar="NETWORK")
    q.set_defaults(func=cmd_rm)


def _driver(n: types_pb2.Network) -> str:
    return n.name if n.name in ("host", "none") else ("bridge" if n.name == "bridge" else "overlay")


def network_doc(n: types_pb2.Network) -> dict[str, Any]:
    return {
        "id": n.id, "name": n.name, "driver": _driver(n), "subnet": n.subnet, "vni": n.vni,
        "created_at_ns": n.created_at_ns,
        "gateways": {e.node_id: e.address for e in n.endpoints if not e.container_id},
        "containers": [{"id": e.container_id, "name": e.container_name, "address": e.address, "node": e.node_id}
                       for e in n.endpoints if e.container_id],
    }


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_create(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    n = conn.control.NetworkCreate(control_pb2.NetworkCreateRequest(name=args.name, subnet=args.subnet),
                                   timeout=CALL_TIMEOUT_S)
    print(n.id)
    return 0


def cmd_ls(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    nets = conn.control.NetworkList(control_pb2.NetworkListRequest(), timeout=CALL_TIMEOUT_S).networks
    if args.output == "json":
        print(json.dumps([network_doc(n) for n in nets], indent=2))
    elif args.quiet:
        for n in nets:
            print(n.name)
    else:
        rows: list[tuple[str, ...]] = [("NETWORK ID", "NAME", "DRIVER", "SUBNET")]
        rows += [(n.id[:12], n.name, _driver(n), n.subnet) for n in nets]
        print(_table(rows))
    return 0


def cmd_inspect(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    docs = [network_doc(conn.control.NetworkInspect(control_pb2.NetworkRef(name=ref), timeout=CALL_TIMEOUT_S))
            for ref in args.networks]
    if args.output == "json":
        print(json.dumps(docs, indent=2))
        return 0
    for doc in docs:
        print(f"{doc['name']} ({doc['id'][:12]}) {doc['driver']} {doc['subnet']} vni {doc['vni']}")
        for node, address in sorted(doc["gateways"].items()):
            print(f"  gateway  {address:<15}  {node}")
        for c in doc["containers"]:
            print(f"  {c['name']:<8} {c['address']:<15}  {c['node']}")
    return 0


def cmd_rm(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    for ref in args.networks:
        conn.control.NetworkRemove(control_pb2.NetworkRef(name=ref), timeout=CALL_TIMEOUT_S)
        print(ref)
    return 0
