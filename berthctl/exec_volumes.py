"""berthctl exec and berthctl volume (issue 3b).

`exec [-i] [-t] [-e K=V] [-u USER] [-w DIR] CONTAINER COMMAND...` runs a command in a running container
through the controller and leaves with its exit code. With -t and a terminal on stdin, the terminal is put
in raw mode for the session (Ctrl-C reaches the command as a byte, and its pty turns it into SIGINT), its
size is sent at the start and on every SIGWINCH.

`volume create|ls|inspect|rm` manage named volumes; each lives on one host (`--node HOST` when the name
alone does not say which).

Imports of gRPC and the generated API stay inside the commands, as in berthctl.main.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from berthctl.client import CLIError, Connection

if TYPE_CHECKING:
    from berth.api import types_pb2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("exec", help="run a command in a running container")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open and send it")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="set an environment variable")
    p.add_argument("-u", "--user", default="", help="UID[:GID] or NAME[:GROUP] (default: the container's user)")
    p.add_argument("-w", "--workdir", default="", help="working directory (default: the container's)")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="COMMAND")
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("volume", help="manage named volumes (each lives on one host)")
    vsub = p.add_subparsers(dest="volume_command", metavar="COMMAND", required=True)
    q = vsub.add_parser("create", help="create a volume")
    q.add_argument("--node", default="", help="the host to create it on (needed when there are several)")
    q.add_argument("-l", "--label", action="append", default=[], metavar="KEY=VALUE", help="set a label")
    q.add_argument("name", metavar="NAME")
    q.set_defaults(func=cmd_volume_create)
    q = vsub.add_parser("ls", help="list volumes of every host")
    q.add_argument("--node", default="", help="only this host's")
    q.add_argument("-q", "--quiet", action="store_true", help="only names")
    q.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    q.set_defaults(func=cmd_volume_ls)
    q = vsub.add_parser("inspect", help="show volumes as JSON")
    q.add_argument("--node", default="", help="the volume's host, when several have one of that name")
    q.add_argument("names", nargs="+", metavar="NAME")
    q.set_defaults(func=cmd_volume_inspect)
    q = vsub.add_parser("rm", help="remove volumes and their data (refused while a container uses one)")
    q.add_argument("--node", default="", help="the volume's host, when several have one of that name")
    q.add_argument("names", nargs="+", metavar="NAME")
    q.set_defaults(func=cmd_volume_rm)


# ---- exec -----------------------------------------------------------------------------------------


def _window_size(fd: int) -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


def cmd_exec(args: argparse.Namespace, conn: Connection) -> int:
    import queue
    import signal
    import termios
    import threading
    import tty

    from berth.api import types_pb2 as t

    if not args.args:
        raise CLIError("no command given: berthctl exec CONTAINER COMMAND [ARG...]")
    for env in args.env:
        if "=" not in env or env.startswith("="):
            raise CLIError(f"invalid -e {env!r}: write -e KEY=VALUE")
    terminal = args.tty and os.isatty(0)
    start = t.ExecStart(container=args.container, args=args.args, env=args.env, user=args.user,
                        workdir=args.workdir, tty=args.tty, interactive=args.interactive)
    size = _window_size(0) if terminal else None
    if size is not None:
        start.size.rows, start.size.cols = size
    inputs: queue.Queue[types_pb2.ExecInput | None] = queue.Queue()
    inputs.put(t.ExecInput(start=start))

    def requests() -> Any:
        while (item := inputs.get()) is not None:
            yield item

    def read_stdin() -> None:
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            if not data:
                inputs.put(t.ExecInput(close_stdin=True))
                return
            inputs.put(t.ExecInput(stdin=data))

    if args.interactive:
        threading.Thread(target=read_stdin, daemon=True).start()
    old_attrs = None
    if terminal:
        old_attrs = termios.tcgetattr(0)
        tty.setraw(0)

        def on_winch(_signum: int, _frame: object) -> None:
            ws = _window_size(0)
            if ws is not None:
                inputs.put(t.ExecInput(resize=t.WindowSize(rows=ws[0], cols=ws[1])))

        signal.signal(signal.SIGWINCH, on_winch)
    code = 0
    try:
        for out in conn.control.Exec(requests()):
            kind = out.WhichOneof("output")
            if kind == "stdout":
                sys.stdout.buffer.write(out.stdout)
                sys.stdout.flush()
            elif kind == "stderr":
                sys.stderr.buffer.write(out.stderr)
                sys.stderr.flush()
            elif kind == "exit_code":
                code = out.exit_code
    finally:
        inputs.put(None)
        if old_attrs is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, old_attrs)
    return code


# ---- volumes --------------------------------------------------------------------------------------


def volume_json(v: types_pb2.Volume) -> dict[str, Any]:
    return {
        "name": v.name, "node": v.node_name, "node_id": v.node_id, "driver": "local", "mountpoint": v.mountpoint,
        "created_at_ns": v.created_at_ns, "labels": dict(v.labels), "used_by": list(v.used_by),
    }


def cmd_volume_create(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import types_pb2 as t

    req = t.VolumeRequest(name=args.name, node=args.node)
    for label in args.label:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise CLIError(f"invalid --label {label!r}: write --label KEY=VALUE")
        req.labels[key] = value
    v = conn.control.VolumeCreate(req, timeout=60)
    print(v.name)
    return 0


def cmd_volume_ls(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import types_pb2 as t

    reply = conn.control.VolumeList(t.VolumeListRequest(node=args.node), timeout=60)
    if args.output == "json":
        print(json.dumps([volume_json(v) for v in reply.volumes], indent=2))
    elif args.quiet:
        for v in reply.volumes:
            print(v.name)
    else:
        rows = [("DRIVER", "VOLUME NAME", "NODE", "CONTAINERS")]
        rows += [("local", v.name, v.node_name, str(len(v.used_by))) for v in reply.volumes]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_volume_inspect(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import types_pb2 as t

    out = [volume_json(conn.control.VolumeInspect(t.VolumeRequest(name=n, node=args.node), timeout=60))
           for n in args.names]
    print(json.dumps(out, indent=2))
    return 0


def cmd_volume_rm(args: argparse.Namespace, conn: Connection) -> int:
    import grpc

    from berth.api import types_pb2 as t

    failed = False
    for name in args.names:
        try:
            conn.control.VolumeRemove(t.VolumeRequest(name=name, node=args.node), timeout=60)
        except grpc.RpcError as exc:
            print(f"berthctl: {conn.error(exc)}", file=sys.stderr)
            failed = True
            continue
        print(name)
    return 1 if failed else 0
