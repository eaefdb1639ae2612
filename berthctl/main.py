"""berthctl, the command-line client. Docker users should feel at home: run, ps, logs, stop, start, rm,
inspect, wait, plus cluster verbs (node ls) and a local dev cluster (dev up|status|down).

Start-up is kept lean (`berthctl run --rm IMAGE true` is benchmarked against podman): gRPC and the
generated API are imported only by the commands that talk to a controller.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from berth.healthcheck import suffix as health_suffix
from berth.units import UnitError, parse_cpus, parse_size
from berthctl import health as berthctl_health
from berthctl import network as berthctl_network
from berthctl import runopts
from berthctl.client import CLIError, Connection, controller_address

if TYPE_CHECKING:
    import grpc

    from berth.api import types_pb2

CALL_TIMEOUT_S = 60.0


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="berthctl", description="Run and manage containers on a berth cluster.")
    parser.add_argument("--controller", help="controller address host:port, or several, comma-separated, "
                        "tried in turn (else $BERTH_CONTROLLER, "
                        "else ~/.config/berth/config.json, else 127.0.0.1:7070)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="create and start a container")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background and print its id")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("--name", default="", help="a name for the container")
    p.add_argument("-m", "--memory", help="memory limit, e.g. 256m")
    p.add_argument("--cpus", help="CPU limit, e.g. 0.5")
    p.add_argument("--pids-limit", type=int, default=0, help="maximum number of processes")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="set an environment variable")
    p.add_argument("--entrypoint", help="override the image's entrypoint")
    p.add_argument("--hostname", default="", help="the container's host name (default: its name)")
    p.add_argument("-w", "--workdir", default="", help="working directory inside the container")
    p.add_argument("-l", "--label", action="append", default=[], metavar="KEY=VALUE", help="set a label")
    p.add_argument("--restart", default="", metavar="POLICY",
                   help="no, on-failure[:N], always or unless-stopped: restart it on exit (back-off 100 ms doubling "
                   "to 1 min), and, but for no, move it to another host when its host dies")
    p.add_argument("--log-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="max-size=SIZE (rotate the log at this size), max-file=N (keep N files in all)")  # issue 3a
    p.add_argument("--constraint", action="append", default=[], metavar="EXPR",
                   help="where it may run: node.labels.KEY==VALUE, node.name!=NAME, node.platform==OS/ARCH")
    p.add_argument("--strategy", choices=("spread", "binpack"), default="",
                   help="how its host is chosen (default: the cluster's, controller --strategy)")
    runopts.add_arguments(p)  # issue 3b
    berthctl_health.add_arguments(p)  # issue 6
    p.add_argument("--pull", choices=("always", "missing", "never"), default="missing",
                   help="pull the image before the container starts: always, when missing, or never")
    berthctl_network.add_run_flags(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="COMMAND")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ps", help="list containers")
    p.add_argument("-a", "--all", action="store_true", help="also stopped containers")
    p.add_argument("-q", "--quiet", action="store_true", help="only ids")
    _add_output(p)
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("logs", help="print a container's output")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    p.add_argument("-n", "--tail", type=int, default=0, help="only the last N lines")
    p.add_argument("--since", help="only output since a time (RFC 3339, Unix seconds) or a duration ago (10m)")
    p.add_argument("-t", "--timestamps", action="store_true", help="prefix each line with its time")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("stop", help="stop containers (SIGTERM, then SIGKILL after the grace time)")
    p.add_argument("-t", "--time", type=float, default=-1, help="seconds before SIGKILL (default 10)")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("start", help="start stopped containers (their files are kept)")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("rm", help="remove containers and their writable layers")
    p.add_argument("-f", "--force", action="store_true", help="also running containers")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("inspect", help="show containers in full, as JSON")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("wait", help="wait for a container to exit and print its exit code")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("port", help="list a container's published ports")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(func=cmd_port)

    p = sub.add_parser("node", help="manage the cluster's hosts")
    node_sub = p.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    q = node_sub.add_parser("ls", help="list hosts")
    _add_output(q)
    q.set_defaults(func=cmd_node_ls)
    from berthctl import nodes

    nodes.register(node_sub)

    from berthctl import services

    services.register(sub)
    from berthctl import events

    events.register(sub)
    from berthctl import dev, exec_volumes

    dev.register(sub)
    from berthctl import images as image_verbs  # issue 4: pull, push, images, tag, rmi, save, load, ...

    image_verbs.register(sub)
    exec_volumes.register(sub)  # issue 3b: exec, volume
    from berthctl import lifecycle

    lifecycle.register(sub)  # issue 3a: create, kill, restart, pause, unpause
    from berthctl import network_verbs

    network_verbs.register(sub)  # issue 5: network create, ls, inspect, rm
    return parser


# ---- helpers --------------------------------------------------------------------------------------


def _parse_log_opts(spec: types_pb2.ContainerSpec, opts: list[str]) -> None:
    """issue 3a: --log-opt max-size=10m, --log-opt max-file=3 (Docker's json-file options)."""
    for opt in opts:
        key, sep, value = opt.partition("=")
        try:
            if key == "max-size" and sep:
                spec.log_max_size_bytes = parse_size(value, "--log-opt max-size")
            elif key == "max-file" and sep and value.isdigit() and int(value) >= 1:
                spec.log_max_files = int(value)
            else:
                raise CLIError(f"invalid --log-opt {opt!r}: write max-size=SIZE (e.g. 10m) or max-file=N (N >= 1)")
        except UnitError as exc:
            raise CLIError(str(exc)) from None


def _parse_spec(args: argparse.Namespace) -> types_pb2.ContainerSpec:
    from berth.api import types_pb2 as t

    spec = t.ContainerSpec(
        name=args.name, image=args.image, command=args.args, env=args.env, workdir=args.workdir,
        hostname=args.hostname, auto_remove=args.rm, pids_limit=args.pids_limit,
        restart_policy=args.restart, constraints=args.constraint, placement_strategy=args.strategy,
    )
    if getattr(args, "pull", "missing") != "missing":
        spec.pull_policy = args.pull
    _parse_log_opts(spec, getattr(args, "log_opt", []))  # issue 3a
    try:
        if args.memory is not None:
            spec.memory_bytes = parse_size(args.memory, "--memory")
        if args.cpus is not None:
            spec.nano_cpus = parse_cpus(args.cpus)
    except UnitError as exc:
        raise CLIError(str(exc)) from None
    if args.pids_limit < 0:
        raise CLIError(f"invalid --pids-limit {args.pids_limit}: it must be 0 (no limit) or more")
    for env in args.env:
        if "=" not in env or env.startswith("="):
            raise CLIError(f"invalid -e {env!r}: write -e KEY=VALUE")
    for label in args.label:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise CLIError(f"invalid --label {label!r}: write --label KEY=VALUE")
        spec.labels[key] = value
    if args.entrypoint is not None:
        spec.entrypoint_set = True
        if args.entrypoint:
            spec.entrypoint.append(args.entrypoint)
    runopts.fill_spec(args, spec)
    berthctl_health.fill_spec(args, spec)  # issue 6
    berthctl_network.apply_run_flags(spec, args)
    return spec


def _state(c: types_pb2.Container) -> str:
    from berth.api import types_pb2 as t

    return t.ContainerState.Name(c.status.state).removeprefix("STATE_").lower()


def _ago(ns: int, now_ns: int) -> str:
    seconds = max(0, (now_ns - ns) // 1_000_000_000)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def _status_text(c: types_pb2.Container, now_ns: int) -> str:
    from berth.api import types_pb2 as t

    s = c.status
    if s.state == t.STATE_RUNNING:
        return (f"Up {_ago(s.started_at_ns, now_ns)}" + (" (Paused)" if s.message == "paused" else "")  # 3a
                + health_suffix(s.health))  # issue 6
    if s.state == t.STATE_EXITED:
        return f"Exited ({s.exit_code}) {_ago(s.finished_at_ns, now_ns)} ago"
    if s.state == t.STATE_PENDING and c.pending_reason:
        return f"Pending: {c.pending_reason}"
    if s.state in (t.STATE_FAILED, t.STATE_LOST):
        return f"{_state(c).capitalize()}: {s.message}"
    return _state(c).capitalize()


def container_json(c: types_pb2.Container) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.spec.name,
        "image": c.spec.image,
        "command": list(c.spec.entrypoint) + list(c.spec.command),
        "state": _state(c),
        "exit_code": c.status.exit_code,
        "message": c.status.message,
        "pending_reason": c.pending_reason,
        "node": c.node_name or c.node_id,
        "created_at_ns": c.created_at_ns,
        "started_at_ns": c.status.started_at_ns,
        "finished_at_ns": c.status.finished_at_ns,
        "memory_bytes": c.spec.memory_bytes,
        "nano_cpus": c.spec.nano_cpus,
        "image_digest": c.status.image_digest,
        "pid": c.status.pid,
        "ip_address": c.status.ip_address,
        "network": c.spec.network or "bridge",  # issue 5
        "ports": berthctl_network.ports_of(c),
        "health": c.status.health.status if c.status.state == 4 else "",  # issue 6: starting, healthy, unhealthy
        **_lifecycle_json(c),
    }


def _lifecycle_json(c: types_pb2.Container) -> dict[str, Any]:
    """issue 3a: how the last run ended, restarts, pause, restart policy."""
    from berthctl.lifecycle import exit_reason

    return {
        "exit_reason": exit_reason(c.status),
        "signal": c.status.signal,
        "oom_killed": c.status.oom_killed,
        "restart_count": c.status.restart_count,
        "restart_policy": c.spec.restart_policy or "no",
        "paused": c.status.state == 4 and c.status.message == "paused",
    }


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _write_log(entry: types_pb2.LogEntry) -> None:
    out = sys.stderr if entry.stream == 1 else sys.stdout
    out.buffer.write(entry.data)
    out.flush()


# ---- commands -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    spec = _parse_spec(args)
    events = conn.control.Run(control_pb2.RunRequest(spec=spec, attach=not args.detach))
    code = 0
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "started":
            c = event.started
            if args.detach:
                print(c.id)
            if _state(c) == "pending":
                # No host fits now; it stays pending and starts when one does (Kubernetes' Pending).
                name = c.spec.name
                message = (f"container {name} is pending: {c.pending_reason}; it starts when a host fits "
                           f"(berthctl ps -a), or remove it with berthctl rm {name}")
                if args.detach:
                    print(f"berthctl: warning: {message}", file=sys.stderr)
                else:
                    raise CLIError(f"cannot attach: {message}")
            elif _state(c) == "created":  # session 6: stopped (berthctl stop) before its host started it
                name = c.spec.name
                message = (f"container {name} was stopped before it started, and removed (--rm)" if c.spec.auto_remove
                           else f"container {name} was stopped before it started: start it with berthctl start {name}")
                if args.detach:
                    print(f"berthctl: warning: {message}", file=sys.stderr)
                else:
                    raise CLIError(f"cannot attach: {message}")
        elif kind == "log":
            _write_log(event.log)
        elif kind == "exit_code":
            code = event.exit_code
    return code


def cmd_ps(args: argparse.Namespace, conn: Connection) -> int:
    import time

    from berth.api import control_pb2

    reply = conn.control.List(control_pb2.ListRequest(all=args.all), timeout=CALL_TIMEOUT_S)
    if args.output == "json":
        print(json.dumps([container_json(c) for c in reply.containers], indent=2))
        return 0
    if args.quiet:
        for c in reply.containers:
            print(c.id[:12])
        return 0
    now = time.time_ns()
    rows = [("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "HOST", "NAMES")]
    for c in reply.containers:
        command = " ".join([*c.spec.entrypoint, *c.spec.command])
        if len(command) > 22:
            command = command[:19] + "..."
        rows.append((c.id[:12], c.spec.image, json.dumps(command) if command else "",
                     f"{_ago(c.created_at_ns, now)} ago", _status_text(c, now),
                     ", ".join(berthctl_network.ports_of(c)), c.node_name, c.spec.name))
    print(_table(rows))
    return 0


def cmd_logs(args: argparse.Namespace, conn: Connection) -> int:
    import time

    from berth.api import control_pb2
    from berthctl.lifecycle import parse_since, write_entry  # issue 3a: --since, --timestamps

    since = parse_since(args.since, time.time()) if args.since else 0
    request = control_pb2.LogsRequest(ref=args.container, follow=args.follow, tail=args.tail, since_ns=since)
    for entry in conn.control.Logs(request):
        write_entry(entry, args.timestamps)
    return 0


def _each(conn: Connection, refs: list[str], action: Callable[[str], object]) -> int:
    """Docker's way with several containers: go on past a failure, report it, exit 1 at the end."""
    import grpc

    failed = False
    for ref in refs:
        try:
            action(ref)
        except grpc.RpcError as exc:
            print(f"berthctl: {conn.error(exc)}", file=sys.stderr)
            failed = True
            continue
        print(ref)
    return 1 if failed else 0


def _warn_if_lost(ref: str, done: str, c: types_pb2.Container) -> None:
    """Start's and Stop's answer for a container whose host is down (lost): the change is recorded and carried out
    by the host's agent when it is back; say so."""
    from berth.api import types_pb2 as t

    if c.status.state == t.STATE_LOST:
        print(f"berthctl: warning: {ref}: {c.status.message or 'its host is down'}; it is {done} when its host is "
              "back (or berthctl rm -f it)", file=sys.stderr)


def cmd_stop(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    def stop(ref: str) -> None:
        _warn_if_lost(ref, "stopped", conn.control.Stop(control_pb2.StopRequest(ref=ref, timeout_s=args.time),
                                                        timeout=max(args.time, 10) + 60))

    return _each(conn, args.containers, stop)


def cmd_start(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    def start(ref: str) -> None:
        _warn_if_lost(ref, "started", conn.control.Start(control_pb2.ContainerRef(ref=ref)))

    return _each(conn, args.containers, start)


def cmd_rm(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    return _each(conn, args.containers, lambda ref: conn.control.Remove(
        control_pb2.RemoveRequest(ref=ref, force=args.force), timeout=CALL_TIMEOUT_S))


def cmd_inspect(args: argparse.Namespace, conn: Connection) -> int:
    from google.protobuf import json_format

    from berth.api import control_pb2

    out = []
    for ref in args.containers:
        c = conn.control.Inspect(control_pb2.ContainerRef(ref=ref), timeout=CALL_TIMEOUT_S)
        doc = json_format.MessageToDict(c, preserving_proto_field_name=True)
        doc["State"] = container_json(c)
        out.append(doc)
    print(json.dumps(out, indent=2))
    return 0


def cmd_port(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    c = conn.control.Inspect(control_pb2.ContainerRef(ref=args.container), timeout=CALL_TIMEOUT_S)
    for line in berthctl_network.port_lines(c):
        print(line)
    return 0


def cmd_wait(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2

    reply = conn.control.Wait(control_pb2.ContainerRef(ref=args.container))
    print(reply.exit_code)
    return 0


def cmd_node_ls(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import control_pb2
    from berth.api import types_pb2 as t
    from berth.units import format_size

    reply = conn.control.ListNodes(control_pb2.ListNodesRequest(), timeout=CALL_TIMEOUT_S)
    docs: list[dict[str, Any]] = [
        {
            "id": n.id, "name": n.name, "address": n.address, "agent_address": n.agent_address,
            "metrics_address": n.metrics_address,
            "state": "ready" if n.state == t.NODE_READY else "down",
            "containers": n.containers, "platform": n.platform,
            "memory_bytes": n.capacity.memory_bytes, "nano_cpus": n.capacity.nano_cpus,
            "allocated_memory_bytes": n.allocated.memory_bytes, "allocated_nano_cpus": n.allocated.nano_cpus,
            "labels": {**n.labels, **n.user_labels},
            "availability": ("active", "pause", "drain")[n.availability],
        }
        for n in reply.nodes
    ]
    if args.output == "json":
        print(json.dumps(docs, indent=2))
        return 0
    rows = [("NAME", "ADDRESS", "STATUS", "CONTAINERS", "MEMORY", "CPUS", "PLATFORM")]
    for n in reply.nodes:
        rows.append((
            n.name, n.address, "Ready" if n.state == t.NODE_READY else "Down", str(n.containers),
            f"{format_size(n.allocated.memory_bytes)}/{format_size(n.capacity.memory_bytes)}",
            f"{n.allocated.nano_cpus / 1e9:g}/{n.capacity.nano_cpus / 1e9:g}", n.platform,
        ))
    print(_table(rows))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "dev":  # the local cluster needs no controller
        sys.exit(args.func(args))
    conn: Connection | None = None
    try:
        conn = Connection(controller_address(args.controller))
        code = args.func(args, conn)
    except CLIError as exc:
        print(f"berthctl: {exc}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        import grpc

        if not isinstance(exc, grpc.RpcError) or conn is None:
            raise
        error: grpc.RpcError = exc
        cli_error = conn.error(error)
        print(f"berthctl: {cli_error}", file=sys.stderr)
        code = cli_error.code
    finally:
        if conn is not None:
            conn.close()
    sys.exit(code)
