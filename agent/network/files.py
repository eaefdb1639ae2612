"""A container's /etc/hosts and /etc/resolv.conf (issue 5), written by the agent under
`<state-dir>/network/files/<id>/` and bind-mounted over the image's files, as Docker does:

    /etc/hosts        localhost, the container's own address with its hostname and name, then --add-host
    /etc/resolv.conf  --dns servers, else the host's own nameservers (loopback ones left out: a container
                      cannot reach the host's 127.0.0.1), with the host's search domains; or, where the
                      containers' DNS server runs (agent.network.dns), that server alone, which forwards to
                      the --dns servers (else the host's)

Removed with the container's network (HostNetwork.detach).
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

from agent.network import NetworkError

HOST_RESOLV = Path("/etc/resolv.conf")


def files_dir(state_dir: Path, cid: str) -> Path:
    return state_dir / "network" / "files" / cid


def parse_extra_host(item: str) -> tuple[str, str]:
    name, sep, ip = item.partition(":")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise NetworkError(f"invalid --add-host {item!r}: write NAME:IP, e.g. db:10.0.0.5") from None
    if not sep or not name:
        raise NetworkError(f"invalid --add-host {item!r}: write NAME:IP, e.g. db:10.0.0.5")
    return name, ip


def hosts_text(hostname: str, name: str, address: str, extra_hosts: list[str]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if address:
        names = " ".join(dict.fromkeys(n for n in (hostname, name) if n))
        lines.append(f"{address}\t{names}")
    for item in extra_hosts:
        host, ip = parse_extra_host(item)
        lines.append(f"{ip}\t{host}")
    return "\n".join(lines) + "\n"


def resolv_text(dns: list[str], host_resolv: Path = HOST_RESOLV, nameserver: str = "") -> str:
    """With `nameserver` (the containers' DNS server, agent.network.dns) that is the only one, and the --dns
    servers are its upstreams for this container instead, as Docker does with 127.0.0.11."""
    servers: list[str] = []
    search: list[str] = []
    for server in dns:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise NetworkError(f"invalid --dns {server!r}: give a nameserver's IP address") from None
        servers.append(server)
    try:
        host_lines = host_resolv.read_text().splitlines()
    except OSError:
        host_lines = []
    for line in host_lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "search":
            search = parts[1:]
        elif not dns and len(parts) >= 2 and parts[0] == "nameserver":
            try:
                if not ipaddress.ip_address(parts[1]).is_loopback:
                    servers.append(parts[1])
            except ValueError:
                continue
    out = [f"nameserver {s}" for s in ([nameserver] if nameserver else servers)]
    if search:
        out.append("search " + " ".join(search))
    if nameserver:
        out.append("options ndots:0")  # a single-label name is a container's: asked first as it is
    return "\n".join(out) + "\n"


def write(state_dir: Path, cid: str, hosts: str, resolv: str) -> tuple[Path, Path]:
    """The two files, written; returns their paths (hosts, resolv.conf)."""
    d = files_dir(state_dir, cid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts").write_text(hosts)
    (d / "resolv.conf").write_text(resolv)
    return d / "hosts", d / "resolv.conf"


def remove(state_dir: Path, cid: str) -> None:
    shutil.rmtree(files_dir(state_dir, cid), ignore_errors=True)
