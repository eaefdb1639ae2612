"""berthctl service create|ls|ps|inspect|scale|update|rollback|rm (issue 6), as in `docker service`.

create, scale, update and rollback wait until the service has converged (or the update paused or rolled
back) unless -d is given; an update that did not complete exits 1 with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from berth.units import UnitError, parse_cpus, parse_size
from berthctl import health
from berthctl.client import CLIError, Connection
from berthctl.network import parse_publish

if TYPE_CHECKING:
    from berth.api import types_pb2

CALL_TIMEOUT_S = 60.0
DONE = ("", "completed", "rolled_back", "paused")


def _update_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--update-parallelism", type=int, help="containers replaced at once (default 1)")
    p.add_argument("--update-delay", type=float, help="seconds between batches (default 0)")
    p.add_argument("--update-order", choices=("stop-first", "start-first"), help="default stop-first")
    p.add_argument("--update-failure-action", choices=("pause", "rollback"), help="default pause")
    p.add_argument("--update-monitor", type=float, help="seconds a new container must stay up (default 5)")
    p.add_argument("-d", "--detach", action="store_true", help="do not wait for the service to converge")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default %(default)s)")


def register(sub: Any) -> None:
    p = sub.add_parser("service", help="manage services (replicated or global containers)")
    ssub = p.add_subparsers(dest="service_command", metavar="COMMAND", required=True)

    q = ssub.add_parser("create", help="create a service")
    q.add_argument("--name", required=True, help="the service's name")
    q.add_argument("--replicas", type=int, default=1, help="containers to run (default 1)")
    q.add_argument("--mode", choices=("replicated", "global"), default="replicated", help="global: one per host")
    q.add_argument("--constraint", action="append", default=[], metavar="EXPR", help="as in berthctl run")
    q.add_argument("--strategy", choices=("spread", "binpack"), default="",
                   help="how hosts are chosen for its containers (default: the cluster's)")
    q.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("-m", "--memory", help="memory limit per container, e.g. 256m")
    q.add_argument("--cpus", help="CPU limit per container")
    q.add_argument("--restart", choices=("no", "always", "on-failure", "unless-stopped"),
                   help="default always: a container moves when its host dies")
    q.add_argument("-p", "--publish", action="append", default=[], metavar="[HOSTIP:]HOSTPORT:PORT[/PROTO]",
                   help="publish a port on each container's host (host mode: one container per host and port)")
    health.add_arguments(q)  # issue 6
    q.add_argument("--network", default="", metavar="NETWORK",  # issue 5: user networks
                   help="bridge (default), host, none or a user network (berthctl network create)")
    _update_flags(q)
    q.add_argument("image", metavar="IMAGE")
    q.add_argument("args", nargs=argparse.REMAINDER, metavar="COMMAND")
    q.set_defaults(func=cmd_create)

    q = ssub.add_parser("ls", help="list services")
    q.add_argument("-o", "--output", choices=("table", "json"), default="table")
    q.set_defaults(func=cmd_ls)

    q = ssub.add_parser("ps", help="list a service's containers")
    q.add_argument("-o", "--output", choices=("table", "json"), default="table")
    q.add_argument("service", metavar="SERVICE")
    q.set_defaults(func=cmd_ps)

    q = ssub.add_parser("inspect", help="show services in full, as JSON")
    q.add_argument("services", nargs="+", metavar="SERVICE")
    q.set_defaults(func=cmd_inspect)

    q = ssub.add_parser("scale", help="set replicas: SERVICE=N ...")
    q.add_argument("-d", "--detach", action="store_true")
    q.add_argument("--timeout", type=float, default=300.0)
    q.add_argument("pairs", nargs="+", metavar="SERVICE=N")
    q.set_defaults(func=cmd_scale)

    q = ssub.add_parser("update", help="change a service; a new image or command rolls out gradually")
    q.add_argument("--image")
    q.add_argument("--replicas", type=int)
    q.add_argument("--env-add", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--args", help="a new command, as one shell-like string")
    q.add_argument("--force", action="store_true", help="replace every container even with no change")
    q.add_argument("--publish-add", action="append", default=[], metavar="[HOSTIP:]HOSTPORT:PORT[/PROTO]",
                   help="publish another port (or change the host port of a container port)")
    q.add_argument("--publish-rm", action="append", default=[], metavar="PORT[/PROTO]",
                   help="stop publishing a container port")
    health.add_arguments(q)  # issue 6
    _update_flags(q)
    q.add_argument("service", metavar="SERVICE")
    q.set_defaults(func=cmd_update)

    q = ssub.add_parser("rollback", help="go back to the spec before the last update")
    q.add_argument("-d", "--detach", action="store_true")
    q.add_argument("--timeout", type=float, default=300.0)
    q.add_argument("service", metavar="SERVICE")
    q.set_defaults(func=cmd_rollback)

    q = ssub.add_parser("rm", help="remove services and their containers")
    q.add_argument("services", nargs="+", metavar="SERVICE")
    q.set_defaults(func=cmd_rm)


def _apply_update_flags(spec: types_pb2.ServiceSpec, args: argparse.Namespace) -> None:
    u = spec.update
    if args.update_parallelism is not None:
        u.parallelism = args.update_parallelism
    if args.update_delay is not None:
        u.delay_s = args.update_delay
    if args.update_order is not None:
        u.order = args.update_order
    if args.update_failure_action is not None:
        u.failure_action = args.update_failure_action
    if args.update_monitor is not None:
        u.monitor_s = args.update_monitor


def cmd_create(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import types_pb2 as t

    template = t.ContainerSpec(image=args.image, command=args.args, env=args.env, constraints=args.constraint,
                               restart_policy=args.restart or "", placement_strategy=args.strategy)
    try:
        if args.memory is not None:
            template.memory_bytes = parse_size(args.memory, "--memory")
        if args.cpus is not None:
            template.nano_cpus = parse_cpus(args.cpus)
    except UnitError as exc:
        raise CLIError(str(exc)) from None
    for flag in args.publish:  # issue 6: host-mode published ports
        template.ports.append(parse_publish(flag))
    template.network = "" if args.network == "bridge" else args.network  # issue 5
    health.fill_spec(args, template)  # issue 6
    spec = t.ServiceSpec(name=args.name, template=template, replicas=args.replicas,
                         global_mode=args.mode == "global")
    _apply_update_flags(spec, args)
    svc = conn.control.CreateService(spec, timeout=CALL_TIMEOUT_S)
    if not args.detach:
        _wait(conn, svc.id, args.timeout)
    print(svc.id)
    return 0


def service_doc(s: types_pb2.Service) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    doc: dict[str, Any] = MessageToDict(s, preserving_proto_field_name=True)
    return doc


def cmd_ls(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    services = conn.control.ListServices(control_pb2.ListServicesRequest(), timeout=CALL_TIMEOUT_S).services
    if args.output == "json":
        print(json.dumps([service_doc(s) for s in services], indent=2))
        return 0
    rows = [("ID", "NAME", "MODE", "REPLICAS", "IMAGE", "UPDATE")]
    for s in services:
        rows.append((s.id[:12], s.spec.name, "global" if s.spec.global_mode else "replicated",
                     f"{s.running}/{s.desired}", s.spec.template.image, s.update_state))
    print(_table(rows))
    return 0


def _tasks(conn: Connection, svc: types_pb2.Service) -> list[types_pb2.Container]:
    from berth.api import control_pb2

    containers = conn.control.List(control_pb2.ListRequest(all=True), timeout=CALL_TIMEOUT_S).containers
    return sorted((c for c in containers if c.service_id == svc.id), key=lambda c: (c.slot, c.service_version))


def cmd_ps(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2
    from berthctl.main import container_json

    svc = conn.control.InspectService(control_pb2.ServiceRef(ref=args.service), timeout=CALL_TIMEOUT_S)
    tasks = _tasks(conn, svc)
    docs = [{**container_json(c), "slot": c.slot, "service_version": c.service_version} for c in tasks]
    if args.output == "json":
        print(json.dumps(docs, indent=2))
        return 0
    rows = [("ID", "NAME", "IMAGE", "HOST", "STATE", "VERSION", "PORTS", "ERROR")]
    for d in docs:
        error = d["pending_reason"] if d["state"] == "pending" else d["message"] if d["state"] != "running" else ""
        state = d["state"] + (f" ({d['health']})" if d["health"] else "")  # issue 6
        rows.append((d["id"][:12], d["name"], d["image"], d["node"], state, str(d["service_version"]),
                     ", ".join(d["ports"]), error))
    print(_table(rows))
    return 0


def cmd_inspect(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2
    from berthctl.network import port_text

    docs = []
    for ref in args.services:
        svc = conn.control.InspectService(control_pb2.ServiceRef(ref=ref), timeout=CALL_TIMEOUT_S)
        doc = service_doc(svc)
        if svc.spec.template.ports:  # issue 6: where each container publishes, as Swarm's host mode
            doc["endpoint"] = {
                "mode": "host",
                "ports": [{"published_port": p.host_port, "target_port": p.container_port,
                           "protocol": p.protocol or "tcp", "host_ip": p.host_ip} for p in svc.spec.template.ports],
                "published": {c.spec.name: [f"{c.node_name or c.node_id} {port_text(p)}" for p in c.status.ports]
                              for c in _tasks(conn, svc) if c.status.ports},
            }
        docs.append(doc)
    print(json.dumps(docs, indent=2))
    return 0


def _update_ports(template: types_pb2.ContainerSpec, add: list[str], rm: list[str]) -> None:
    """issue 6: service update --publish-add/--publish-rm; a container port is published once."""
    for flag in rm:
        port, _, proto = flag.partition("/")
        if not port.isdigit():
            raise CLIError(f"invalid --publish-rm {flag!r}: write the container port, e.g. 80 or 53/udp")
        kept = [p for p in template.ports
                if not (p.container_port == int(port) and (p.protocol or "tcp") == (proto or "tcp"))]
        del template.ports[:]
        template.ports.extend(kept)
    for flag in add:
        mapping = parse_publish(flag)
        kept = [p for p in template.ports
                if not (p.container_port == mapping.container_port and p.protocol == mapping.protocol)]
        del template.ports[:]
        template.ports.extend([*kept, mapping])


def cmd_scale(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    for pair in args.pairs:
        name, sep, n = pair.partition("=")
        if not sep or not n.isdigit():
            raise CLIError(f"invalid {pair!r}: write SERVICE=REPLICAS")
        svc = conn.control.InspectService(control_pb2.ServiceRef(ref=name), timeout=CALL_TIMEOUT_S)
        if svc.spec.global_mode:
            raise CLIError(f"service {name} is global: it runs one container per host and cannot be scaled")
        svc.spec.replicas = int(n)
        conn.control.UpdateService(control_pb2.UpdateServiceRequest(ref=svc.id, spec=svc.spec),
                                   timeout=CALL_TIMEOUT_S)
        if not args.detach:
            _wait(conn, svc.id, args.timeout)
        print(f"{name} scaled to {n}")
    return 0


def cmd_update(args: argparse.Namespace, conn: Connection) -> int:
    import shlex

    from berth.api import control_pb2

    svc = conn.control.InspectService(control_pb2.ServiceRef(ref=args.service), timeout=CALL_TIMEOUT_S)
    spec = svc.spec
    if args.image:
        spec.template.image = args.image
    if args.replicas is not None:
        spec.replicas = args.replicas
    if args.args is not None:
        spec.template.ClearField("command")
        spec.template.command.extend(shlex.split(args.args))
    for env in args.env_add:
        spec.template.env.append(env)
    if args.force:
        spec.template.labels["berth.force-update"] = str(time.time_ns())
    _update_ports(spec.template, args.publish_add, args.publish_rm)  # issue 6
    health.fill_spec(args, spec.template)  # issue 6
    _apply_update_flags(spec, args)
    svc = conn.control.UpdateService(control_pb2.UpdateServiceRequest(ref=svc.id, spec=spec), timeout=CALL_TIMEOUT_S)
    return _finish(conn, svc, args)


def cmd_rollback(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    svc = conn.control.UpdateService(control_pb2.UpdateServiceRequest(ref=args.service, rollback=True),
                                     timeout=CALL_TIMEOUT_S)
    return _finish(conn, svc, args)


def _finish(conn: Connection, svc: types_pb2.Service, args: argparse.Namespace) -> int:
    if args.detach:
        print(svc.spec.name)
        return 0
    svc = _wait(conn, svc.id, args.timeout)
    if svc.update_state in ("", "completed") or (svc.update_state == "rolled_back" and args.func is cmd_rollback):
        print(svc.spec.name)
        return 0
    raise CLIError(f"service {svc.spec.name}: update {svc.update_state.replace('_', ' ')}: {svc.update_message}",
                   1)


def _wait(conn: Connection, sid: str, timeout: float) -> types_pb2.Service:
    """Until the update is over and every slot runs a container of the current version, or (issue 6) waits
    for a host with the scheduler's reason (said in a warning)."""
    from berth.api import control_pb2
    from berth.api import types_pb2 as t

    deadline = time.monotonic() + timeout
    checking: list[types_pb2.Container] = []
    while True:
        svc = conn.control.InspectService(control_pb2.ServiceRef(ref=sid), timeout=CALL_TIMEOUT_S)
        if svc.update_state == "paused":
            return svc
        if svc.update_state in DONE and (svc.desired or not svc.spec.global_mode):
            tasks = _tasks(conn, svc)
            waiting = [c for c in tasks if c.service_version == svc.version and not c.node_id and c.pending_reason
                       and c.status.state == t.STATE_PENDING]
            # issue 6: with a health check, a running container counts once it is healthy (as Swarm)
            checking = [c for c in tasks if c.status.state == t.STATE_RUNNING and c.status.health.status
                        and c.status.health.status != "healthy"]
            if svc.running + len(waiting) >= svc.desired and len(tasks) == svc.desired and not checking:
                if waiting:
                    print(f"berthctl: warning: {len(waiting)} of {svc.desired} containers of service "
                          f"{svc.spec.name} are pending: {waiting[0].pending_reason}; they start when a host fits "
                          f"(berthctl service ps {svc.spec.name})", file=sys.stderr)
                return svc
        if time.monotonic() > deadline:
            raise CLIError(f"service {svc.spec.name} did not converge in {timeout:g}s: {svc.running}/{svc.desired} "
                           f"running ({svc.update_state or 'no update'})"
                           + (f", {len(checking)} not healthy" if checking else "")
                           + f"; see berthctl service ps {svc.spec.name}")
        time.sleep(0.2)


def cmd_rm(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    for ref in args.services:
        conn.control.RemoveService(control_pb2.ServiceRef(ref=ref), timeout=CALL_TIMEOUT_S)
        print(ref)
    return 0


def _table(rows: Sequence[Sequence[str]]) -> str:
    from berthctl.main import _table as table

    return table(rows)
