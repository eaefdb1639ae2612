"""The VXLAN overlay between hosts (issue 5), flannel's vxlan backend done with pyroute2: one device
`berth.vx` (VNI 1, no learning) on the link that holds the host's address, carrying `<subnet>.0/32` of the
host's subnet. For every other host (a peer from the controller's Peers stream):

    route      <peer subnet> via <peer subnet>.0 dev berth.vx onlink
    neighbour  <peer subnet>.0 lladdr <peer VTEP MAC> dev berth.vx       (permanent)
    fdb        <peer VTEP MAC> dst <peer address> dev berth.vx           (permanent)

A VTEP's MAC is derived from its host's address (02:b5:a.b.c.d), so no other exchange is needed. `sync`
adds what is missing and deletes what is no longer a peer, so it can run again at any time (reconnects,
agent restarts) without losing or duplicating an entry.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute, NetlinkError

from agent.network import VTEP, NetworkError, mac_for

VXLAN = "berth.vx"
VNI = 1
PORT = 4789
OVERHEAD = 50  # outer IPv4 + UDP + VXLAN headers


@dataclass(frozen=True)
class Peer:
    address: str  # the host's own address
    subnet: str  # its containers' subnet


def vtep_mac(address: str) -> str:
    return mac_for(address, VTEP)


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def underlay(ipr: IPRoute, address: str) -> tuple[int, int]:
    """(index, mtu) of the link holding the host's address."""
    for a in ipr.get_addr(family=socket.AF_INET):
        if a.get("address") == address:
            index = int(a["index"])
            mtu = int(ipr.get_links(index)[0].get("mtu") or 1500)
            return index, mtu
    raise NetworkError(f"no link holds this host's address {address}; give the agent --address of this host")


def ensure(ipr: IPRoute, address: str, subnet: ipaddress.IPv4Network) -> int:
    """The VXLAN device, made or fixed; returns the MTU containers must use."""
    link, mtu = underlay(ipr, address)
    mac = vtep_mac(address)
    idx = _index(ipr, VXLAN)
    if idx is not None:
        info = ipr.get_links(idx)[0]
        data = info.get(("IFLA_LINKINFO", "IFLA_INFO_DATA")) or info.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        if data is None or data.get("IFLA_VXLAN_LOCAL") != address or info.get("address") != mac:
            ipr.link("del", index=idx)
            idx = None
    if idx is None:
        ipr.link("add", ifname=VXLAN, kind="vxlan", vxlan_id=VNI, vxlan_local=address, vxlan_link=link,
                 vxlan_port=PORT, vxlan_learning=0, address=mac, mtu=mtu - OVERHEAD)
        idx = _index(ipr, VXLAN)
        if idx is None:
            raise NetworkError(f"could not create {VXLAN}")
    vtep_ip = str(subnet.network_address)
    have = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=socket.AF_INET)}
    for a, plen in have - {(vtep_ip, 32)}:
        ipr.addr("del", index=idx, address=a, prefixlen=plen)
    if (vtep_ip, 32) not in have:
        ipr.addr("add", index=idx, address=vtep_ip, prefixlen=32)
    ipr.link("set", index=idx, state="up")
    return mtu - OVERHEAD


def sync(ipr: IPRoute, own_address: str, peers: list[Peer]) -> None:
    """Routes, neighbours and FDB entries on the VXLAN device exactly for `peers` (self excluded)."""
    idx = _index(ipr, VXLAN)
    if idx is None:
        raise NetworkError(f"{VXLAN} is missing: the host's container network is not set up")
    want = {p.subnet: p for p in peers if p.address != own_address and p.subnet}
    # Routes through the device that are not wanted any more.
    for r in ipr.get_routes(family=socket.AF_INET, oif=idx):
        dst = r.get("RTA_DST")
        if dst is None or r["dst_len"] == 32:
            continue
        net = f"{dst}/{r['dst_len']}"
        if net not in want:
            with contextlib.suppress(NetlinkError):
                ipr.route("del", dst=net, oif=idx)
    wanted_macs = {vtep_mac(p.address) for p in want.values()}
    wanted_gw = {str(ipaddress.IPv4Network(s).network_address) for s in want}
    for n in ipr.get_neighbours(ifindex=idx, family=socket.AF_INET):
        dst = n.get("NDA_DST")
        if dst is not None and dst not in wanted_gw:
            with contextlib.suppress(NetlinkError):
                ipr.neigh("del", ifindex=idx, dst=dst, lladdr=n.get("NDA_LLADDR"))
    fdb: set[tuple[str, str]] = set()
    for f in ipr.get_neighbours(ifindex=idx, family=socket.AF_BRIDGE):
        lladdr, dst = f.get("NDA_LLADDR"), f.get("NDA_DST")
        if not lladdr or lladdr == "00:00:00:00:00:00" or f.get("ifindex") != idx:
            continue
        if lladdr in wanted_macs:
            fdb.add((lladdr, dst))
            continue
        with contextlib.suppress(NetlinkError):
            ipr.fdb("del", ifindex=idx, lladdr=lladdr, dst=dst)
    for subnet, p in want.items():
        gw = str(ipaddress.IPv4Network(subnet).network_address)
        mac = vtep_mac(p.address)
        if (mac, p.address) not in fdb:
            with contextlib.suppress(NetlinkError):
                ipr.fdb("del", ifindex=idx, lladdr=mac)
            ipr.fdb("add", ifindex=idx, lladdr=mac, dst=p.address)
        ipr.neigh("replace", ifindex=idx, dst=gw, lladdr=mac, state="permanent")
        ipr.route("replace", dst=subnet, gateway=gw, oif=idx, flags=4)  # RTNH_F_ONLINK


def remove(ipr: IPRoute) -> None:
    idx = _index(ipr, VXLAN)
    if idx is not None:
        ipr.link("del", index=idx)
