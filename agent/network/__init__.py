"""Container networking on one host: the host's bridge, one network namespace per container wired to it by
a veth, addresses from the host's subnet (agent.network.ipam), published ports and outbound masquerade
(agent.network.nat). Every netlink operation goes through pyroute2.

The namespace is made and configured BEFORE the container starts; the container's first process joins it
(ContainerConfig.netns) instead of making an empty one, so the application never runs without its network.

Exceptions:

    NetworkError             base of every networking failure; the message is meant for a user
     +-- PortInUse           a host port asked for is already published on this host
     +-- AddressesExhausted  the host's subnet has no free address left
     +-- DnsError            (agent.network.dns) a DNS message that cannot be read, or port 53 not bindable
"""

from __future__ import annotations

import ipaddress

# The second byte of the MAC addresses berth derives from IPv4 addresses (mac_for).
VTEP, GATEWAY, CONTAINER = 0xB5, 0xB6, 0xB7


def mac_for(address: str, role: int) -> str:
    """The fixed MAC address of the device holding `address`: 02:<role>:<the address's four bytes> (locally
    administered, unicast), as Docker derives 02:42:<address>. Neighbours' ARP caches stay right when the
    device is replaced: a container whose address is given to a new one, or moved to another host on a
    user network, has the same MAC there. A bridge given its own MAC also keeps it; otherwise the kernel
    gives a bridge the lowest MAC of its ports, which changes when a container's veth leaves, and every
    container on it then sends to its gateway (and the DNS server there) at an address that no longer
    answers until its ARP entry expires (about 10 s)."""
    return f"02:{role:02x}:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(address).packed)


class NetworkError(Exception):
    """Base of every networking failure."""


class PortInUse(NetworkError):
    """A host port asked for is already published by another container on this host."""


class AddressesExhausted(NetworkError):
    """No free address left in the host's subnet."""
