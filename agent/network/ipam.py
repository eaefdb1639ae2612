"""Address and port bookkeeping of one host, kept on disk so an agent restart neither loses nor duplicates
an allocation: `<state-dir>/network/ipam.json`

    {"subnet": "10.88.3.0/24",
     "containers": {"<id>": {"address": "10.88.3.2", "ports": [[host_ip, host_port, container_port, proto]]}}}

A container on a user network (agent.network.usernet) has the address the controller gave it, and
"network": the network's id.

The subnet's first address is the bridge's (the containers' gateway); containers get the lowest free one
after it. Written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from agent.network import AddressesExhausted, NetworkError, PortInUse

# Ports chosen for `-p CONTAINERPORT` come from here (Linux's default ephemeral range).
EPHEMERAL = (32768, 60999)


@dataclass(frozen=True)
class Port:
    host_ip: str  # "" : every address of the host
    host_port: int
    container_port: int
    protocol: str  # tcp | udp

    def clashes(self, other: Port) -> bool:
        if self.protocol != other.protocol or self.host_port != other.host_port:
            return False
        return not self.host_ip or not other.host_ip or self.host_ip == other.host_ip


@dataclass
class Allocation:
    address: str
    ports: list[Port] = field(default_factory=list)
    network: str = ""  # a user network's id ("": the host's default network)


class Ipam:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "network" / "ipam.json"
        self.subnet: ipaddress.IPv4Network | None = None
        self.containers: dict[str, Allocation] = {}
        raw = None
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            pass
        except ValueError as e:
            raise NetworkError(f"{self.path} is damaged ({e}); remove it and restart the agent") from e
        if raw:
            self.subnet = ipaddress.IPv4Network(raw["subnet"]) if raw.get("subnet") else None
            for cid, a in raw.get("containers", {}).items():
                self.containers[cid] = Allocation(a["address"], [Port(*p) for p in a.get("ports", [])],
                                                  a.get("network", ""))

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        if self.subnet is None:
            raise NetworkError("this host has no container subnet yet")
        return ipaddress.IPv4Interface(f"{self.subnet[1]}/{self.subnet.prefixlen}")

    def set_subnet(self, subnet: str) -> None:
        net = ipaddress.IPv4Network(subnet)
        if self.subnet is not None and net != self.subnet and self.containers:
            raise NetworkError(
                f"the controller gave subnet {net} but containers here use {self.subnet}; remove them first"
            )
        self.subnet = net
        self.save()

    def allocate(self, cid: str, ports: list[Port], address: str = "", network: str = "") -> Allocation:
        """The container's allocation: the existing one, or a new address and its ports (0: a free one).
        On a user network (`network`: its id) the address is the controller's."""
        have = self.containers.get(cid)
        if have is not None:
            return have
        if self.subnet is None and not network:
            raise NetworkError("this host has no container subnet yet")
        if not network:
            assert self.subnet is not None
            taken = {a.address for a in self.containers.values()}
            address = next((str(ip) for ip in list(self.subnet.hosts())[1:] if str(ip) not in taken), "")
            if not address:
                raise AddressesExhausted(f"no free address left in this host's subnet {self.subnet}")
        bound: list[Port] = []
        for asked in ports:
            p = asked
            if p.host_port == 0:
                p = Port(p.host_ip, self._free_port(p, bound), p.container_port, p.protocol)
            for other_id, other in self.containers.items():
                if any(p.clashes(q) for q in other.ports):
                    raise PortInUse(
                        f"port {p.host_port}/{p.protocol} is already published by container {other_id[:12]} "
                        "on this host; choose another host port"
                    )
            if any(p.clashes(q) for q in bound):
                raise PortInUse(f"port {p.host_port}/{p.protocol} is published twice; give it once")
            bound.append(p)
        a = self.containers[cid] = Allocation(address, bound, network)
        self.save()
        return a

    def _free_port(self, want: Port, bound: list[Port]) -> int:
        used = {q.host_port for a in self.containers.values() for q in a.ports} | {q.host_port for q in bound}
        lo, hi = EPHEMERAL
        start = random.randint(lo, hi)
        for i in range(hi - lo + 1):
            port = lo + (start - lo + i) % (hi - lo + 1)
            if port not in used:
                return port
        raise PortInUse(f"no free host port left for container port {want.container_port}")

    def release(self, cid: str) -> None:
        if self.containers.pop(cid, None) is not None:
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "subnet": str(self.subnet) if self.subnet else "",
            "containers": {
                cid: {"address": a.address, "ports": [[p.host_ip, p.host_port, p.container_port, p.protocol]
                                                        for p in a.ports],
                      **({"network": a.network} if a.network else {})}
                for cid, a in sorted(self.containers.items())
            },
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
