"""User networks (issue 5), the controller's side: the network objects (`berthctl network create|ls|inspect|rm`)
and their address management, both in etcd (key layout in controller.store).

A network's subnet is allocated cluster-wide, not split per host (docs/networking.md says why): each
container on it gets one address of the whole subnet, claimed when its agent first asks (NetworkAttach), and
each host where the network is present gets one address too, its gateway on the network's bridge. A claim is
a create-only transaction on /berth/network-ips/<net>/<ip>; a container's claim is deleted with the container
(controller.store.delete_container; one a crash left behind is stale, as its attachment key is gone, and free
for the next one). A host keeps its gateway on a network while it exists, even with no container of it on
the network any more: the agent's bridge may still hold that address, and the controller does not know when
the agent has removed it. `node rm` (controller.store.delete_node) frees the host's gateways, except on a
network that a container of the host (lost there, or with a stopped copy there) is on, as the host would put
that address on its bridge again if it came back; such a gateway is taken (`_orphan_gateways`) once no
container names the host any more and the network has no other free address. Removing a network deletes
every claim in it, and is refused while a container (running or not) or a service is on it: `remove` first
closes the network (its /berth/network-open/ key, which every creation of a container or service on it
compares), then looks for users, then deletes it with a compare on its close, or opens it again and refuses;
so a `run --network` racing it either comes first (and is a user) or fails with a clear error, leaving
nothing behind, instead of a container created on a network removed under it.

Creates and removes compare one revision key, so they run one at a time and two networks never get the same
name, VNI or overlapping subnets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import secrets
import time

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from controller.store import NotFound, Store, StoreError

log = logging.getLogger(__name__)

BUILTIN = ("bridge", "host", "none")
DEFAULT_POOL = "10.128.0.0/12"
DEFAULT_PREFIXLEN = 24
FIRST_VNI = 256  # VNI 1 is the default network's overlay; leave room below for later built-ins
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$")
RETRIES = 10
Claims = list[tuple[str, str]]  # (address, owner); the class's own `list` method hides the builtin in it


class NetworkRequestError(StoreError):
    """A request that cannot be done as asked (bad name or subnet, overlap, in use); the message says what to do."""


class AddressesExhausted(StoreError):
    """Every address of a network is taken."""


def _net(subnet: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(subnet)


class UserNetworks:
    def __init__(self, store: Store, container_cidr: str, pool: str = DEFAULT_POOL) -> None:
        self.store = store
        self.container_cidr = ipaddress.IPv4Network(container_cidr)
        self.pool = ipaddress.IPv4Network(pool)
        self._reopening: set[asyncio.Future[bool]] = set()  # remove()'s undoing of its close, kept referenced

    # ---- objects --------------------------------------------------------------------------------------

    async def create(self, name: str, subnet: str = "") -> t.Network:
        if not NAME_RE.match(name):
            raise NetworkRequestError(f"invalid network name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
        if name in BUILTIN:
            raise NetworkRequestError(f"network {name!r} is built in; choose another name")
        asked = self._parse_subnet(subnet) if subnet else None
        for _ in range(RETRIES):
            rev, nets = await self.store.list_networks()
            for n in nets:
                if n.name == name:
                    raise NetworkRequestError(
                        f"network {name!r} already exists (id {n.id[:12]}); choose another name or remove it first"
                    )
            taken = [(n.name, _net(n.subnet)) for n in nets]
            chosen = asked if asked is not None else self._free_subnet(taken)
            for other, theirs in taken:
                if chosen.overlaps(theirs):
                    raise NetworkRequestError(
                        f"subnet {chosen} overlaps network {other!r} ({theirs}); choose another --subnet"
                    )
            used_vnis = {n.vni for n in nets}
            vni = next(v for v in range(FIRST_VNI, FIRST_VNI + len(nets) + 1) if v not in used_vnis)
            net = t.Network(id=secrets.token_hex(32), name=name, subnet=str(chosen), vni=vni,
                            created_at_ns=time.time_ns())
            if await self.store.create_network(net, rev):
                return net
        raise StoreError("networks kept changing while creating this one; try again")

    def _parse_subnet(self, subnet: str) -> ipaddress.IPv4Network:
        try:
            net = ipaddress.IPv4Network(subnet, strict=True)
        except ValueError as e:
            raise NetworkRequestError(f"invalid --subnet {subnet!r}: {e}; give a CIDR such as 10.130.0.0/24") from None
        if net.prefixlen > 29:
            raise NetworkRequestError(f"--subnet {net} is too small; give a /29 or larger")
        if net.overlaps(self.container_cidr):
            raise NetworkRequestError(
                f"subnet {net} overlaps the cluster's container CIDR {self.container_cidr} (the default network); "
                "choose another --subnet"
            )
        return net

    def _free_subnet(self, taken: list[tuple[str, ipaddress.IPv4Network]]) -> ipaddress.IPv4Network:
        for net in self.pool.subnets(new_prefix=max(DEFAULT_PREFIXLEN, self.pool.prefixlen)):
            if not net.overlaps(self.container_cidr) and not any(net.overlaps(n) for _, n in taken):
                return net
        raise NetworkRequestError(f"no free /{DEFAULT_PREFIXLEN} left in the network pool {self.pool}; give --subnet")

    async def get(self, ref: str) -> t.Network:
        """A network by name, id or unique id prefix (built-ins included)."""
        if ref in BUILTIN:
            return self._builtin(ref)
        _, nets = await self.store.list_networks()
        for n in nets:
            if ref in (n.name, n.id):
                return n
        matches = [n for n in nets if ref and n.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise NotFound(f"{ref!r} matches {len(matches)} networks; give more of the id or the name")
        raise NotFound(f"no such network: {ref} (berthctl network ls lists them; network create makes one)")

    def _builtin(self, name: str) -> t.Network:
        if name == "bridge":
            return t.Network(id=name, name=name, subnet=str(self.container_cidr), vni=1)
        return t.Network(id=name, name=name)

    async def list(self) -> list[t.Network]:
        _, nets = await self.store.list_networks()
        return [self._builtin(b) for b in BUILTIN] + sorted(nets, key=lambda n: n.name)

    async def inspect(self, ref: str) -> t.Network:
        net = t.Network()
        net.CopyFrom(await self.get(ref))
        if net.name in BUILTIN:
            return net
        ips = await self.store.network_ips(net.id)
        attachments = await self.store.network_attachments()
        containers = {v.container.id: v.container for v in await self.store.list_containers()}
        for ip, owner in sorted(ips.items(), key=lambda x: ipaddress.IPv4Address(x[0])):
            kind, _, who = owner.partition("/")
            if kind == "gw":
                net.endpoints.add(address=ip, node_id=who)
            elif attachments.get(who) == (net.id, ip) and who in containers:
                c = containers[who]
                net.endpoints.add(address=ip, container_id=who, container_name=c.spec.name, node_id=c.node_id)
        return net

    async def remove(self, ref: str) -> t.Network:
        """Close the network (no container or service can be created on it from then on), look for its users
        (every one created before the close is visible now), then delete it, or open it again and refuse."""
        if ref in BUILTIN:
            raise NetworkRequestError(f"network {ref!r} is built in and cannot be removed")
        for _ in range(RETRIES):
            net = await self.get(ref)
            rev, _ = await self.store.list_networks()
            closed_at = await self.store.close_network(net)
            if not closed_at:
                continue  # removed meanwhile: get() says so
            try:
                users = [v.container.spec.name for v in await self.store.list_containers()
                         if v.container.spec.network == net.name]
                users += [f"service {svc.spec.name}" for svc, _ in await self.store.list_services()
                          if svc.spec.template.network == net.name]
            except BaseException:  # etcd failed, or the caller went away: not removed, so open again (review)
                await self._reopen_anyway(net, closed_at)
                raise
            if users:
                await self.store.reopen_network(net, closed_at)
                shown = ", ".join(sorted(users)[:5]) + (", ..." if len(users) > 5 else "")
                raise NetworkRequestError(
                    f"network {net.name!r} is in use by {len(users)} container(s) or service(s) ({shown}); "
                    "remove them first"
                )
            try:
                deleted = await self.store.delete_network(net, rev, closed_at)
            except BaseException:  # maybe deleted: reopening compares the close, so it undoes nothing else
                await self._reopen_anyway(net, closed_at)
                raise
            if deleted:
                return net
            await self.store.reopen_network(net, closed_at)  # another network changed meanwhile: start over
        raise StoreError("networks kept changing while removing this one; try again")

    async def _reopen_anyway(self, net: t.Network, closed_at: int) -> None:
        """Open a network again that a `remove` closed and did not finish (etcd failed, or its caller went
        away): left closed, every creation on it would fail until a controller restarted (open_networks). Done
        in a task of its own, so that the cancellation of the caller does not stop it; a failure is logged."""
        reopen = asyncio.ensure_future(self.store.reopen_network(net, closed_at))
        self._reopening.add(reopen)
        reopen.add_done_callback(self._reopened)
        with contextlib.suppress(BaseException):  # what ended the removal is what its caller gets
            await asyncio.shield(reopen)

    def _reopened(self, reopen: asyncio.Future[bool]) -> None:
        self._reopening.discard(reopen)
        if not reopen.cancelled() and reopen.exception() is not None:
            log.warning("network rm did not finish, and opening the network again failed (a controller restart "
                        "opens it): %s", reopen.exception())

    async def check_spec(self, spec: t.ContainerSpec) -> None:
        """Raise NotFound when a container asks for a user network that does not exist."""
        if spec.network and spec.network not in BUILTIN:
            try:
                await self.get(spec.network)
            except NotFound:
                raise NotFound(
                    f"network {spec.network!r} not found; create it with `berthctl network create {spec.network}` "
                    "or see `berthctl network ls`"
                ) from None

    # ---- addresses ------------------------------------------------------------------------------------

    async def attach(self, node_id: str, cid: str) -> d.NetworkAttachment:
        """The container's address on its user network and the host's gateway on it, claimed on first call."""
        c = (await self.store.get_container(cid)).container
        if not c.spec.network or c.spec.network in BUILTIN:
            raise NetworkRequestError(f"container {cid[:12]} is not on a user network")
        try:
            net = await self.get(c.spec.network)
        except NotFound:
            raise NotFound(f"network {c.spec.network!r} does not exist (removed?); "
                           f"create it with `berthctl network create {c.spec.network}`") from None
        gateway = await self._claim(net, f"gw/{node_id}", "")
        address = await self._claim(net, f"c/{cid}", cid)
        return d.NetworkAttachment(network_id=net.id, name=net.name, subnet=net.subnet, vni=net.vni,
                                   gateway=gateway, address=address)

    async def _claim(self, net: t.Network, owner: str, cid: str) -> str:
        for _ in range(RETRIES):
            ips = await self.store.network_ips(net.id)
            attachments = await self.store.network_attachments()
            for ip, who in ips.items():
                if who == owner and (not cid or attachments.get(cid) == (net.id, ip)):
                    return ip
            if cid and cid in attachments:
                other, ip = attachments[cid]
                raise NetworkRequestError(f"container {cid[:12]} already has address {ip} on network {other[:12]}")

            free: Claims = []
            for host in _net(net.subnet).hosts():
                ip = str(host)
                held = ips.get(ip)
                kind, _, holder = (held or "").partition("/")
                if held is None or (kind == "c" and attachments.get(holder) != (net.id, ip)):  # free or stale
                    free = [(ip, held or "")]
                    break
            if not free:  # only when full, as it costs two more reads: the gateways of removed hosts
                free = await self._orphan_gateways(net, ips)
            if not free:
                raise AddressesExhausted(
                    f"network {net.name!r} has no free address left in {net.subnet}; remove containers from it "
                    "or use a network with a larger --subnet"
                )
            ip, held = free[0]
            if await self.store.claim_network_ip(net.id, ip, owner, stale=held, cid=cid):
                return ip
            # someone took it meanwhile (or the network or container went): read again
        raise StoreError(f"could not claim an address on network {net.name!r} (it or the container changed); "
                         "the agent will retry")

    async def _orphan_gateways(self, net: t.Network, ips: dict[str, str]) -> Claims:
        """(address, claim) of the gateways on `net` of hosts that were removed (`node rm`) while a container of
        theirs was on it (Store.delete_node keeps those) and that no container on it names any more."""
        nodes = {n.id for n in await self.store.list_nodes()}
        named = await self.store.named_nodes(net.name)
        return sorted(((ip, who) for ip, who in ips.items()
                       if who.startswith("gw/") and who[3:] not in nodes and who[3:] not in named),
                      key=lambda x: ipaddress.IPv4Address(x[0]))
