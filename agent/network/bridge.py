"""A container network's bridge on this host, holding the network's gateway address: the default network's
(`berth0`, agent.network.host) and each user network's (agent.network.usernet). Its MAC address is fixed,
derived from the gateway address (agent.network.mac_for says why)."""

from __future__ import annotations

import ipaddress
import socket

from pyroute2 import IPRoute

from agent.network import GATEWAY, NetworkError, mac_for


def ensure(ipr: IPRoute, name: str, gateway: ipaddress.IPv4Interface) -> int:
    """The bridge `name` made, or fixed, to hold exactly the address `gateway` and its MAC; its index. It is
    left as it was up or down."""
    mac = mac_for(str(gateway.ip), GATEWAY)
    found = ipr.link_lookup(ifname=name)
    if not found:
        ipr.link("add", ifname=name, kind="bridge", address=mac)
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise NetworkError(f"could not create bridge {name}")
    idx = int(found[0])
    if ipr.get_links(idx)[0].get("address") != mac:  # made by an older agent, or the gateway moved
        ipr.link("set", index=idx, address=mac)
    have = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=socket.AF_INET)}
    for old, prefixlen in have - {(str(gateway.ip), gateway.network.prefixlen)}:
        ipr.addr("del", index=idx, address=old, prefixlen=prefixlen)
    if (str(gateway.ip), gateway.network.prefixlen) not in have:
        ipr.addr("add", index=idx, address=str(gateway.ip), prefixlen=gateway.network.prefixlen)
    return idx
