"""The dev cluster's network: one bridge in the root namespace, one network namespace per host.

    root namespace                         <name>-host<i> namespace
    bb-<name>  (bridge, <subnet>.1)  ◀──  bv<i>-<name> ═══ eth0 (<subnet>.(10+i), default via .1)

Namespaces are made the way `ip netns add` makes them (a bind mount under /var/run/netns), with
pyroute2, so `ip netns exec` works on them too. All netlink work goes through pyroute2; nothing
shells out to `ip`. Every function here is idempotent in the direction it goes: `remove_*` on
something already gone does nothing, so a half-built network can always be torn down.

Errors: `NetworkError` (a `berthctl.dev.DevError`) carries one line saying what failed and what to do.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from berthctl.dev import DevError

IFNAMSIZ = 15  # the kernel's limit on an interface name, without the NUL
NETNS_DIR = "/var/run/netns"


class NetworkError(DevError):
    """A netlink or namespace operation failed; the message says which and what to do."""


@dataclass(frozen=True)
class HostLink:
    """The names and address of one host's link to the bridge."""

    index: int  # 1-based host number
    netns: str  # network namespace name, <name>-host<i>
    veth: str  # the veth end that stays in the root namespace, on the bridge
    peer: str  # the other end's name until it is moved and renamed eth0
    address: ipaddress.IPv4Interface  # the host's address with the subnet's prefix


def bridge_name(name: str) -> str:
    return f"bb-{name}"


def gateway(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Interface:
    """The bridge's address: the subnet's .1."""
    return ipaddress.IPv4Interface(f"{subnet[1]}/{subnet.prefixlen}")


def host_link(name: str, subnet: ipaddress.IPv4Network, index: int) -> HostLink:
    return HostLink(
        index=index,
        netns=f"{name}-host{index}",
        veth=f"bv{index}-{name}",
        peer=f"bp{index}-{name}",
        address=ipaddress.IPv4Interface(f"{subnet[10 + index]}/{subnet.prefixlen}"),
    )


def check_names(name: str, hosts: int) -> None:
    """Raise NetworkError if an interface name for this cluster would pass the kernel's limit."""
    longest = max(len(bridge_name(name)), len(host_link(name, ipaddress.IPv4Network("10.0.0.0/8"), hosts).veth))
    if longest > IFNAMSIZ:
        raise NetworkError(
            f"cluster name {name!r} is too long for interface names with {hosts} hosts "
            f"(limit {IFNAMSIZ} characters); choose a shorter --name"
        )


@contextmanager
def _iproute(namespace: str | None = None) -> Iterator[Any]:
    ipr = IPRoute(netns=namespace) if namespace else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _lookup(ipr: Any, ifname: str) -> int | None:
    found: list[int] = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def list_namespaces() -> list[str]:
    return sorted(netns.listnetns())


def namespace_exists(ns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, ns))


def link_names() -> list[str]:
    """Names of every link in the root namespace."""
    with _iproute() as ipr:
        return [str(link.get("ifname")) for link in ipr.get_links()]


def subnet_users(subnet: ipaddress.IPv4Network) -> list[str]:
    """Root-namespace interfaces that already hold an address inside `subnet`."""
    users: list[str] = []
    with _iproute() as ipr:
        names = {link["index"]: str(link.get("ifname")) for link in ipr.get_links()}
        for addr in ipr.get_addr(family=2):
            ip = ipaddress.IPv4Address(addr.get("IFA_ADDRESS"))
            if ip in subnet:
                users.append(names.get(addr["index"], f"#{addr['index']}"))
    return sorted(set(users))


def create_bridge(name: str, subnet: ipaddress.IPv4Network) -> str:
    """Create bb-<name> with the subnet's .1 and bring it up; returns its name."""
    bridge = bridge_name(name)
    gw = gateway(subnet)
    try:
        with _iproute() as ipr:
            ipr.link("add", ifname=bridge, kind="bridge")
            idx = _lookup(ipr, bridge)
            ipr.addr("add", index=idx, address=str(gw.ip), prefixlen=gw.network.prefixlen)
            ipr.link("set", index=idx, state="up")
    except NetlinkError as e:
        raise NetworkError(f"cannot create bridge {bridge}: {os.strerror(e.code)}") from e
    return bridge


def create_host(name: str, subnet: ipaddress.IPv4Network, index: int) -> HostLink:
    """Create host <index>'s namespace and wire it to the bridge.

    Order: namespace, veth pair in the root namespace, root end onto the bridge and up, other end moved
    into the namespace, renamed eth0, addressed, up; lo up; default route via the bridge's .1.
    """
    link = host_link(name, subnet, index)
    gw = gateway(subnet)
    step = "create namespace"
    try:
        netns.create(link.netns)
        step = f"create veth {link.veth}"
        with _iproute() as ipr:
            ipr.link("add", ifname=link.veth, kind="veth", peer={"ifname": link.peer})
            veth = _lookup(ipr, link.veth)
            peer = _lookup(ipr, link.peer)
            bridge = _lookup(ipr, bridge_name(name))
            ipr.link("set", index=veth, master=bridge)
            ipr.link("set", index=veth, state="up")
            step = f"move {link.peer} into {link.netns}"
            ipr.link("set", index=peer, net_ns_fd=link.netns)
        step = f"configure eth0 in {link.netns}"
        with _iproute(link.netns) as ns:
            eth0 = _lookup(ns, link.peer)
            ns.link("set", index=eth0, ifname="eth0")
            ns.addr("add", index=eth0, address=str(link.address.ip), prefixlen=subnet.prefixlen)
            ns.link("set", index=eth0, state="up")
            ns.link("set", index=_lookup(ns, "lo"), state="up")
            ns.route("add", dst="default", gateway=str(gw.ip))
    except NetlinkError as e:
        raise NetworkError(f"cannot {step} for host{index}: {os.strerror(e.code)}") from e
    except OSError as e:
        raise NetworkError(f"cannot {step} for host{index}: {e.strerror or e}") from e
    return link


def _delete_link(ifname: str) -> None:
    with _iproute() as ipr:
        idx = _lookup(ipr, ifname)
        if idx is None:
            return
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise NetworkError(f"cannot delete link {ifname}: {os.strerror(e.code)}") from e


def remove_host(name: str, index: int) -> None:
    """Delete host <index>'s veth pair and namespace, whichever of them exist."""
    link = host_link(name, ipaddress.IPv4Network("10.0.0.0/8"), index)
    _delete_link(link.veth)
    _delete_link(link.peer)  # a half-made pair whose peer never moved
    if namespace_exists(link.netns):
        try:
            netns.remove(link.netns)
        except OSError as e:
            raise NetworkError(f"cannot remove network namespace {link.netns}: {e.strerror or e}") from e


def remove_bridge(name: str) -> None:
    _delete_link(bridge_name(name))


def cluster_namespaces(name: str) -> list[str]:
    """Every namespace named like one of this cluster's hosts (found even without cluster.json)."""
    prefix = f"{name}-host"
    return [ns for ns in list_namespaces() if ns.startswith(prefix) and ns[len(prefix) :].isdigit()]


def cluster_links(name: str) -> list[str]:
    """Every root-namespace link named after this cluster."""
    pattern = re.compile(rf"^(bb|b[vp][0-9]+)-{re.escape(name)}$")
    return [ifname for ifname in link_names() if pattern.match(ifname)]


def remove_all(name: str, timeout: float = 10.0) -> None:
    """Remove every namespace and link of cluster `name`, then wait until the kernel shows none.

    A namespace's links go away asynchronously once its last user is gone, so this polls.
    """
    for ns in cluster_namespaces(name):
        suffix = ns[len(f"{name}-host") :]
        remove_host(name, int(suffix))
    for ifname in cluster_links(name):
        _delete_link(ifname)
    deadline = time.monotonic() + timeout
    while True:
        left = cluster_namespaces(name) + cluster_links(name)
        if not left:
            return
        if time.monotonic() > deadline:
            raise NetworkError(f"network of dev cluster {name!r} still present after {timeout:.0f}s: {left}")
        for ifname in cluster_links(name):
            _delete_link(ifname)
        time.sleep(0.05)
