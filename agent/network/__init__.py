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


class NetworkError(Exception):
    """Base of every networking failure."""


class PortInUse(NetworkError):
    """A host port asked for is already published by another container on this host."""


class AddressesExhausted(NetworkError):
    """No free address left in the host's subnet."""
