"""berthctl's networking flags and verbs (issue 5): `run -p/--publish`, `run --network`, `port`, and how
published ports are shown (`0.0.0.0:8080->80/tcp`, as Docker)."""

from __future__ import annotations

import argparse
import ipaddress
from typing import TYPE_CHECKING

from berthctl.client import CLIError

if TYPE_CHECKING:
    from berth.api import types_pb2

NETWORK_MODES = ("bridge", "none", "host")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--publish", action="append", default=[], metavar="[HOSTIP:]HOSTPORT:PORT[/PROTO]",
                   help="publish a container port on the host (PORT alone: a free host port is chosen)")
    p.add_argument("--dns", action="append", default=[], metavar="IP", help="a nameserver for /etc/resolv.conf")
    p.add_argument("--add-host", action="append", default=[], metavar="NAME:IP", help="a line for /etc/hosts")
    p.add_argument("--network", default="bridge", metavar="NETWORK",
                   help="bridge (default: the host's container network), none (only lo), host, or the name of a "
                        "user network (berthctl network create)")


def _port(text: str, what: str, flag: str, allow_zero: bool = False) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not (0 if allow_zero else 1) <= n <= 65535:
        raise CLIError(f"invalid -p {flag!r}: {what} {text!r} is not a port number (1-65535)")
    return n


def parse_publish(flag: str) -> types_pb2.PortMapping:
    """`[HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]` or `CONTAINERPORT[/proto]`."""
    from berth.api import types_pb2 as t

    body, _, proto = flag.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp"):
        raise CLIError(f"invalid -p {flag!r}: protocol must be tcp or udp")
    parts = body.rsplit(":", 2)
    host_ip, host_port = "", "0"
    if len(parts) == 1:
        container = parts[0]
    elif len(parts) == 2:
        host_port, container = parts
    else:
        host_ip, host_port, container = parts
    if host_ip:
        try:
            ipaddress.IPv4Address(host_ip)
        except ValueError:
            raise CLIError(f"invalid -p {flag!r}: {host_ip!r} is not an IPv4 address") from None
    return t.PortMapping(
        host_ip=host_ip,
        host_port=_port(host_port or "0", "host port", flag, allow_zero=True),
        container_port=_port(container, "container port", flag),
        protocol=proto,
    )


def apply_run_flags(spec: types_pb2.ContainerSpec, args: argparse.Namespace) -> None:
    if not args.network:
        raise CLIError("invalid --network '': give bridge, none, host or a user network's name")
    spec.network = "" if args.network == "bridge" else args.network
    for flag in args.publish:
        spec.ports.append(parse_publish(flag))
    for server in args.dns:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise CLIError(f"invalid --dns {server!r}: give a nameserver's IP address") from None
        spec.dns.append(server)
    for item in args.add_host:
        name, sep, ip = item.partition(":")
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise CLIError(f"invalid --add-host {item!r}: write NAME:IP, e.g. db:10.0.0.5")
        spec.extra_hosts.append(item)
    if spec.ports and spec.network in ("none", "host"):
        raise CLIError(f"-p needs the bridge network or a user network, not --network {spec.network}")


def port_text(p: types_pb2.PortMapping) -> str:
    return f"{p.host_ip or '0.0.0.0'}:{p.host_port}->{p.container_port}/{p.protocol or 'tcp'}"


def ports_of(c: types_pb2.Container) -> list[str]:
    """Bound ports as reported by the agent, else those asked for (host port 0 until bound)."""
    return [port_text(p) for p in (c.status.ports or c.spec.ports)]


def port_lines(c: types_pb2.Container) -> list[str]:
    """`berthctl port`: `80/tcp -> 0.0.0.0:8080`."""
    return [f"{p.container_port}/{p.protocol or 'tcp'} -> {p.host_ip or '0.0.0.0'}:{p.host_port}"
            for p in c.status.ports]
