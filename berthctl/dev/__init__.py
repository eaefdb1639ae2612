"""`berthctl dev`: a whole berth cluster on this machine, for development and tests (like kind or minikube).

    berthctl dev up [--hosts 3] [--name berth] [--subnet 10.77.0.0/24] [--state-dir /var/lib/berth/dev]
                    [--label [HOST:]KEY=VALUE]...
    berthctl dev status [--name berth] [-o table|json]
    berthctl dev down [--name berth]

Modules: `netns` (bridge, veths, host namespaces), `etcd` (the etcd server), `cluster` (up, status, down;
the `ClusterInfo` record kept in `<state-dir>/<name>/cluster.json`). The registry and its busybox seed
come from `registry` and `seed`.

Exceptions (each message is one line that says what to do):

    DevError
     ├── ClusterExistsError   `up` on a name that is already up (or half down)
     ├── NoClusterError       `status` on a name that is not up
     ├── NetworkError         netlink or namespace work failed (netns.py)
     ├── StartError           a component did not come up; names the log to read
     └── TeardownError        `down` could not remove something; says what is left

This module stays import-light (the CLI imports it at start-up); the work is imported when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_NAME = "berth"
DEFAULT_HOSTS = 3
DEFAULT_SUBNET = "10.77.0.0/24"
DEFAULT_STATE_DIR = Path("/var/lib/berth/dev")


class DevError(Exception):
    """Base of every error `berthctl dev` reports to the user."""


class ClusterExistsError(DevError):
    pass


class NoClusterError(DevError):
    pass


class StartError(DevError):
    """A component did not start; `log` is the file that says why."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        self.message = message
        self.log = log
        super().__init__(f"{message}; read {log}" if log is not None else message)


class TeardownError(DevError):
    pass


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `dev` command (up, status, down) to the berthctl parser."""
    dev = subparsers.add_parser(
        "dev",
        help="run a local berth cluster on this machine (needs root)",
        description="A local berth cluster: hosts are network namespaces on a bridge, with a real etcd, "
        "registry, controller and agents.",
    )
    dev.set_defaults(func=_missing_subcommand(dev))
    sub = dev.add_subparsers(dest="dev_command", metavar="{up,status,down}")

    up = sub.add_parser("up", help="create and start a dev cluster")
    _common(up)
    up.add_argument("--hosts", type=int, default=DEFAULT_HOSTS, help="number of hosts (default %(default)s)")
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help="IPv4 subnet for the bridge (default %(default)s)")
    up.add_argument("--controllers", type=int, default=1,
                    help="controllers on one etcd, one of them the leader (default %(default)s)")
    up.add_argument("--label", action="append", default=[], metavar="[HOST:]KEY=VALUE",
                    help="a label for one host's agent (host2:disk=ssd) or, without HOST, every host's; repeatable")
    up.add_argument(
        "--no-berth",
        action="store_true",
        help="infrastructure only: network, etcd and registry, no controller or agents",
    )
    up.set_defaults(func=_up)

    status = sub.add_parser("status", help="show a dev cluster's addresses and processes")
    _common(status)
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.set_defaults(func=_status)

    down = sub.add_parser("down", help="stop a dev cluster and remove everything it made")
    _common(down)
    down.set_defaults(func=_down)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=DEFAULT_NAME, help="cluster name (default %(default)s)")
    parser.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="where clusters keep state (default %(default)s)"
    )


def _missing_subcommand(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        parser.print_usage(sys.stderr)
        print("berthctl dev: choose one of up, status, down", file=sys.stderr)
        return 2

    return run


def _fail(error: DevError) -> int:
    print(f"berthctl: {error}", file=sys.stderr, flush=True)
    return 1


def _up(args: argparse.Namespace) -> int:
    import time

    from berthctl.dev import cluster

    started = time.monotonic()
    try:
        info = cluster.up(
            args.name,
            args.hosts,
            args.subnet,
            args.state_dir,
            infra_only=args.no_berth,
            progress=lambda msg: print(msg, flush=True),
            controllers=args.controllers,
            labels=args.label,
        )
    except DevError as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("berthctl: interrupted; what was started has been removed", file=sys.stderr, flush=True)
        return 130
    print(cluster.usage(info, time.monotonic() - started), flush=True)
    return 0


def _status(args: argparse.Namespace) -> int:
    from berthctl.dev import cluster

    try:
        info = cluster.load(args.name, args.state_dir)
    except DevError as e:
        return _fail(e)
    if args.output == "json":
        print(cluster.status_json(info), flush=True)
    else:
        print(cluster.status_table(info), flush=True)
    return 0


def _down(args: argparse.Namespace) -> int:
    from berthctl.dev import cluster

    said: list[str] = []

    def say(msg: str) -> None:
        said.append(msg)
        print(msg, flush=True)

    try:
        cluster.down(args.name, args.state_dir, progress=say)
    except DevError as e:
        return _fail(e)
    if said:  # quiet when there was nothing to remove
        print(f"dev cluster {args.name!r} removed", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `berthctl dev ...` on its own (tests, or before the main CLI wires it in)."""
    parser = argparse.ArgumentParser(prog="berthctl")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code
