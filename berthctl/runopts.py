"""`berthctl run` options of issue 3b: privileges (--cap-add, --cap-drop, --privileged, --read-only, --user,
--ulimit), more cgroup limits (--memory-swap, --cpu-shares, --cpuset-cpus) and mounts (-v, --tmpfs).

Checked here, before anything is sent, with the same parsers the agent uses (pure modules, cheap to import)
so that a typo costs no round trip; the agent checks again.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from berth.units import UnitError, parse_size
from berthctl.client import CLIError

if TYPE_CHECKING:
    from berth.api import types_pb2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cap-add", action="append", default=[], metavar="CAP", help="add a Linux capability (or ALL)")
    p.add_argument("--cap-drop", action="append", default=[], metavar="CAP", help="drop a Linux capability (or ALL)")
    p.add_argument("--privileged", action="store_true",
                   help="every capability, /proc unmasked (only on hosts whose agent allows it)")
    p.add_argument("--read-only", action="store_true", help="mount the container's root filesystem read-only")
    p.add_argument("-u", "--user", default="", help="UID[:GID] or NAME[:GROUP] (default: the image's USER)")
    p.add_argument("--ulimit", action="append", default=[], metavar="NAME=SOFT[:HARD]",
                   help="a resource limit, e.g. nofile=1024:2048")
    p.add_argument("--memory-swap", help="memory plus swap, e.g. 512m; -1 for unlimited swap")
    p.add_argument("--cpu-shares", type=int, default=0, help="relative CPU weight (default 1024)")
    p.add_argument("--cpuset-cpus", default="", help="CPUs the container may use, e.g. 0-1 or 0,2")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="SRC:DST[:ro]",
                   help="a named volume (NAME:/path) or a bind mount (/host/path:/path)")
    p.add_argument("--tmpfs", action="append", default=[], metavar="DST[:OPTIONS]",
                   help="a tmpfs mount, e.g. /run:size=64m")


def fill_spec(args: argparse.Namespace, spec: types_pb2.ContainerSpec) -> None:
    from agent.runtime.mounts import MountError, check_targets, parse_tmpfs, parse_volume
    from agent.runtime.security import Security, SecurityError, capabilities, check, parse_ulimit

    try:
        for u in args.ulimit:
            parse_ulimit(u)
        sec = Security(cap_add=tuple(args.cap_add), cap_drop=tuple(args.cap_drop), user=args.user)
        capabilities(sec)
        check(sec)
        check_targets(tuple(parse_volume(v) for v in args.volume) + tuple(parse_tmpfs(m) for m in args.tmpfs))
    except (SecurityError, MountError) as exc:
        raise CLIError(str(exc)) from None
    spec.cap_add.extend(args.cap_add)
    spec.cap_drop.extend(args.cap_drop)
    spec.privileged = args.privileged
    spec.read_only = args.read_only
    spec.user = args.user
    spec.ulimits.extend(args.ulimit)
    spec.volumes.extend(args.volume)
    spec.tmpfs.extend(args.tmpfs)
    spec.cpu_shares = args.cpu_shares
    spec.cpuset_cpus = args.cpuset_cpus
    if args.memory_swap is not None:
        if args.memory_swap.strip() == "-1":
            spec.memory_swap_bytes = -1
        else:
            try:
                spec.memory_swap_bytes = parse_size(args.memory_swap, "--memory-swap")
            except UnitError as exc:
                raise CLIError(str(exc)) from None
