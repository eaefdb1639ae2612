"""Container networking, the controller's side (issue 5): each node gets its own subnet of the cluster's
container CIDR at join, claimed in etcd (controller.store, /berth/subnets/) so that no two nodes ever share
one and a node that joins again (agent or controller restart) gets the same one back; and the overlay's
peers (every host's address and subnet) streamed to the agents, which keep their VXLAN routes, neighbour
and forwarding entries in line with them (agent.network.overlay).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Iterable

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from controller.store import REMOVED_NODE, Store, StoreError

DEFAULT_CIDR = "10.88.0.0/16"
DEFAULT_PREFIXLEN = 24


class NetworkConfigError(ValueError):
    """A bad --container-cidr / --node-subnet-size."""


class SubnetsExhausted(StoreError):
    """Every subnet of the container CIDR is taken."""


class SubnetAllocator:
    def __init__(self, store: Store, cidr: str = DEFAULT_CIDR, prefixlen: int = DEFAULT_PREFIXLEN) -> None:
        try:
            self.cidr = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as e:
            raise NetworkConfigError(f"invalid container CIDR {cidr!r}: {e}; give e.g. 10.88.0.0/16") from e
        if not self.cidr.prefixlen <= prefixlen <= 29:
            raise NetworkConfigError(
                f"node subnet size /{prefixlen} does not fit in {self.cidr}; give /{self.cidr.prefixlen}../29"
            )
        self.prefixlen = prefixlen
        self.store = store
        # issue 6: this controller's joins claim one after another; at once they all chose the same first free
        # subnet, and hundreds of hosts joining together failed their five tries
        self._claiming = asyncio.Lock()

    async def subnet_for(self, node_id: str, known: str = "") -> str:
        """The node's subnet: the one it has, else the first free one (claimed atomically). `known`: the subnet
        its stored node record names, checked with one read of that claim (a rejoin, e.g. every host after a
        controller restart, does not read every claim; issue 6)."""
        if known and _within(known, self.cidr) and await self.store.subnet_owner(known) == node_id:
            return known
        async with self._claiming:
            return await self._subnet_for(node_id)

    async def _subnet_for(self, node_id: str) -> str:
        for _ in range(5):
            claims = await self.store.subnet_claims()
            for subnet, owner in sorted(claims.items()):
                if owner == node_id and ipaddress.IPv4Network(subnet).subnet_of(self.cidr):
                    return subnet
            # issue 6: claims of another size (the node subnet size changed) parsed once, not per candidate;
            # same-size ones overlap a candidate only when equal
            other_sizes = [n for n in map(ipaddress.IPv4Network, claims) if n.prefixlen != self.prefixlen]
            for net in self.cidr.subnets(new_prefix=self.prefixlen):
                subnet = str(net)
                if subnet in claims or any(net.overlaps(other) for other in other_sizes):
                    continue
                if await self.store.claim_subnet(subnet, node_id):
                    return subnet
                break  # someone claimed it at the same time: read again
            else:
                orphan = await self._orphaned(claims)
                if orphan is None:
                    raise SubnetsExhausted(f"no free /{self.prefixlen} left in container CIDR {self.cidr}")
                if await self.store.claim_subnet(orphan, node_id, replacing=claims[orphan]):
                    return orphan
        raise StoreError("could not claim a container subnet (too many concurrent joins); the agent will retry")


    async def _orphaned(self, claims: dict[str, str]) -> str | None:
        """A subnet of the CIDR kept by a removed node (`node rm` keeps it while containers of the node are left)
        that no container names any more: free to give to another."""
        removed = REMOVED_NODE.decode()
        named = await self.store.named_nodes()
        for subnet, owner in sorted(claims.items()):
            if (owner.startswith(removed) and owner.removeprefix(removed) not in named
                    and ipaddress.IPv4Network(subnet).subnet_of(self.cidr)):
                return subnet
        return None


def _within(subnet: str, cidr: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.IPv4Network(subnet).subnet_of(cidr)
    except ValueError:
        return False


def peers_message(nodes: Iterable[t.Node]) -> d.PeersMessage:
    """The peer set of these nodes: every one with a subnet, by id."""
    return d.PeersMessage(peers=sorted(
        (d.NetworkPeer(node_id=n.id, address=n.address, subnet=n.subnet) for n in nodes if n.subnet),
        key=lambda p: p.node_id,
    ))


async def peers(store: Store) -> AsyncIterator[d.PeersMessage]:
    """The full peer set now, then again after every change of a node (join, address, removal)."""
    revision = await store.revision()
    last: d.PeersMessage | None = None
    while True:
        msg = peers_message(await store.list_nodes())
        if msg != last:
            yield msg
            last = msg
        async with contextlib.aclosing(store.watch_nodes(revision)) as changes:
            async for _ in changes:
                break
        revision = await store.revision()
