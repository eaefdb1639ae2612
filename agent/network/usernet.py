"""User networks on one host (issue 5): what the host needs for each user network that one of its containers
is on, made when the first such container arrives and removed when the last one goes.

    bridge  bn<id[:12]>   holds this host's gateway address on the network (<gateway>/<network prefix>);
                          the containers' veths are its ports
    vxlan   bx<id[:12]>   the network's VNI, UDP 4789, MAC learning on; a port of the bridge, so the network
                          is one layer-2 segment across hosts
    fdb     00:00:00:00:00:00 dst <host> on the vxlan device, one per other host of the cluster (head-end
                          replication): broadcasts (ARP) reach every host; the replies teach the vxlan device
                          and the bridge where each container's MAC lives

Addresses come from the controller (controller.user_networks): the container's, and this host's gateway, one
address each of the network's subnet. `<state-dir>/network/networks.json` keeps what the controller said about
each network present here, so an agent restart sets it up again without asking and without duplicating it.

Isolation between networks (the nftables forward chain) is in agent.network.nat.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from agent.network import NetworkError
from agent.network.bridge import ensure as ensure_bridge
from agent.network.ipam import Ipam
from agent.network.overlay import PORT, underlay

BRIDGE_PREFIX = "bn"
VXLAN_PREFIX = "bx"
ZERO_MAC = "00:00:00:00:00:00"


@dataclass(frozen=True)
class Lease:
    """A user network as present on this host."""

    id: str
    name: str
    subnet: str  # the whole network's, e.g. 10.128.0.0/24
    vni: int
    gateway: str  # this host's address on the network's bridge

    @property
    def bridge(self) -> str:
        return BRIDGE_PREFIX + self.id[:12]

    @property
    def vxlan(self) -> str:
        return VXLAN_PREFIX + self.id[:12]

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        """The gateway with the network's prefix length, as on the bridge."""
        return ipaddress.IPv4Interface(f"{self.gateway}/{ipaddress.IPv4Network(self.subnet).prefixlen}")


def is_ours(ifname: str) -> bool:
    return len(ifname) == 14 and ifname[:2] in (BRIDGE_PREFIX, VXLAN_PREFIX)


class Leases:
    """The networks present on this host, by id, kept in `<state-dir>/network/networks.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "network" / "networks.json"
        self.by_id: dict[str, Lease] = {}
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            raw = {}
        except ValueError as e:
            raise NetworkError(f"{self.path} is damaged ({e}); remove it and restart the agent") from e
        for net_id, fields in raw.items():
            self.by_id[net_id] = Lease(**fields)

    def find(self, network: str) -> Lease | None:
        """By name or id."""
        return self.by_id.get(network) or next((x for x in self.by_id.values() if x.name == network), None)

    def put(self, lease: Lease) -> None:
        if self.by_id.get(lease.id) != lease:
            self.by_id[lease.id] = lease
            self.save()

    def drop(self, net_id: str) -> None:
        if self.by_id.pop(net_id, None) is not None:
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in sorted(self.by_id.items())}))
        os.replace(tmp, self.path)


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def ensure(ipr: IPRoute, lease: Lease, address: str, mtu: int) -> None:
    """The network's bridge with the gateway, and (with the host's `address`) its vxlan device, made or fixed."""
    br = ensure_bridge(ipr, lease.bridge, lease.interface)
    if address:
        link, _ = underlay(ipr, address)
        vx = _index(ipr, lease.vxlan)
        if vx is not None:
            info = ipr.get_links(vx)[0]
            data = info.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
            if data is None or data.get("IFLA_VXLAN_ID") != lease.vni or data.get("IFLA_VXLAN_LOCAL") != address:
                ipr.link("del", index=vx)
                vx = None
        if vx is None:
            ipr.link("add", ifname=lease.vxlan, kind="vxlan", vxlan_id=lease.vni, vxlan_local=address,
                     vxlan_link=link, vxlan_port=PORT, vxlan_learning=1, **({"mtu": mtu} if mtu else {}))
            vx = _index(ipr, lease.vxlan)
            if vx is None:
                raise NetworkError(f"could not create {lease.vxlan}")
        ipr.link("set", index=vx, master=br)
        ipr.link("set", index=vx, state="up")
    ipr.link("set", index=br, state="up")


def sync_flood(ipr: IPRoute, lease: Lease, own_address: str, peers: list[str]) -> None:
    """All-zeros FDB entries on the network's vxlan device exactly for these hosts (self excluded)."""
    vx = _index(ipr, lease.vxlan)
    if vx is None:
        return
    want = {p for p in peers if p and p != own_address}
    have: set[str] = set()
    for f in ipr.get_neighbours(ifindex=vx, family=socket.AF_BRIDGE):
        if f.get("ifindex") != vx or f.get("NDA_LLADDR") != ZERO_MAC:
            continue
        dst = f.get("NDA_DST")
        if dst in want:
            have.add(dst)
        else:
            with contextlib.suppress(NetlinkError):
                ipr.fdb("del", ifindex=vx, lladdr=ZERO_MAC, dst=dst)
    for dst in sorted(want - have):
        ipr.fdb("append", ifindex=vx, lladdr=ZERO_MAC, dst=dst)


def remove(ipr: IPRoute, lease: Lease) -> None:
    """The network's links (their addresses, routes and FDB entries go with them)."""
    for name in (lease.vxlan, lease.bridge):
        idx = _index(ipr, name)
        if idx is not None:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=idx)


def prune(ipr: IPRoute, keep: list[Lease]) -> None:
    """Delete every user network link of no network in `keep` (left by a crash or a removed network)."""
    wanted = {x.bridge for x in keep} | {x.vxlan for x in keep}
    for link in ipr.get_links():
        name = link.get("ifname") or ""
        if is_ours(name) and name not in wanted:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=link["index"])


class Present:
    """The user networks present on this host: those some allocation (agent.network.ipam) is on. Used by
    agent.network.host.HostNetwork, under its lock, in its worker thread."""

    def __init__(self, state_dir: Path) -> None:
        self.leases = Leases(state_dir)
        # every host's address (the Peers stream), for the flood entries; None until the stream has said, so
        # that a set-up at join (an agent restart) keeps the entries there are instead of emptying them first
        self.peers: list[str] | None = None

    def in_use(self, ipam: Ipam) -> list[Lease]:
        ids = {a.network for a in ipam.containers.values() if a.network}
        return [self.leases.by_id[i] for i in sorted(ids) if i in self.leases.by_id]

    def setup(self, ipr: IPRoute, lease: Lease, address: str, mtu: int) -> None:
        self.leases.put(lease)
        ensure(ipr, lease, address, mtu)
        if address and self.peers is not None:
            sync_flood(ipr, lease, address, self.peers)

    def reconcile(self, ipr: IPRoute, ipam: Ipam, address: str, mtu: int) -> None:
        """Exactly the networks in use here, set up; the links and leases of any other removed."""
        used = self.in_use(ipam)
        for lease in used:
            self.setup(ipr, lease, address, mtu)
        prune(ipr, used)
        for net_id in set(self.leases.by_id) - {x.id for x in used}:
            self.leases.drop(net_id)

    def release_if_unused(self, ipr: IPRoute, ipam: Ipam, net_id: str) -> None:
        lease = self.leases.by_id.get(net_id)
        if lease is not None and all(a.network != net_id for a in ipam.containers.values()):
            remove(ipr, lease)
            self.leases.drop(net_id)

    def set_peers(self, ipr: IPRoute, ipam: Ipam, address: str, peers: list[str]) -> None:
        self.peers = list(peers)
        if address:
            for lease in self.in_use(ipam):
                sync_flood(ipr, lease, address, self.peers)

    def nat(self, ipam: Ipam) -> list[tuple[str, str]]:
        """(bridge, subnet) of each network in use, for agent.network.nat."""
        return [(x.bridge, x.subnet) for x in self.in_use(ipam)]


def attacher(ask: Callable[[str], Awaitable[Any]]) -> Callable[[str], Awaitable[tuple[Lease, str]]]:
    """HostNetwork.attacher over the controller's NetworkAttach (`ask`: container id -> NetworkAttachment);
    its failures become one NetworkError saying what the controller said."""
    import grpc.aio

    async def attach(cid: str) -> tuple[Lease, str]:
        try:
            r = await ask(cid)
        except grpc.aio.AioRpcError as e:
            raise NetworkError(e.details() or e.code().name) from None
        except ConnectionError as e:
            raise NetworkError(f"cannot get an address on the container's network: {e}") from None
        return Lease(r.network_id, r.name, r.subnet, int(r.vni), r.gateway), str(r.address)

    return attach
