"""The cluster state in etcd: the key layout, in this one place, and typed reads and writes over it.

Keys (values are serialized protobuf messages from berth.api.types):

    /berth/containers/<id>                 Container: spec, desired state, assignment (API + controller)
    /berth/status/<id>                     ContainerStatus (written for the agent that runs it; an agent's
                                           status only over an older one of its run, by its seq: the write
                                           compares the mod_revision of the status whose seq was checked).
                                           A Run group-committed on the leader (create_placed) has none
                                           until its first report (issue 6): an absent status is what the
                                           container implies (implied_status: assigned with a node, else
                                           pending)
    /berth/names/<name>                    the id owning a container name (uniqueness by txn)
    (/berth/assignments/<node-id>/<id>     no longer written (issue 6): what a node must run is derived from
                                           the container keys, which name its node and the nodes keeping a
                                           stopped copy (controller.assigned); keys left by an older
                                           controller are deleted at start, drop_assignment_keys)
    /berth/nodes/<node-id>                 Node
    /berth/alive/<node-id>                 attached to the node's lease: present while the node is ready
    /berth/leader                          the leading controller's id, attached to its lease (issue 6)
    /berth/services/<id>                   Service (issue 6); its containers carry its id
    /berth/service-names/<name>            the id owning a service name
    /berth/subnets/<net>_<len>             the node id a container subnet belongs to (issue 5; claimed by txn
                                           create-only, so two nodes never share one; kept across restarts)
    /berth/networks/<id>                   Network: a user network (issue 5; controller.user_networks)
    /berth/networks-rev                    rewritten by every network create/rm, whose transactions compare
                                           its mod_revision: they run one at a time (names, subnets, VNIs)
    /berth/network-open/<name>             "open" while containers may be created on the user network of
                                           that name, "closed" while `network rm` looks for its users: every
                                           creation of a container (or service) on a user network compares it
                                           is "open", so none is created after rm closed it; rm deletes the
                                           network with a compare on the revision of its own close, or puts
                                           "open" back. Put with the network, deleted with it; put for
                                           networks older than it (and reopened) at controller start
    /berth/network-ips/<net-id>/<ip>       who holds an address of a user network: c/<container-id> or
                                           gw/<node-id> (that host's gateway on the network's bridge; kept
                                           while the node exists, deleted with it unless a container of it
                                           is on the network)
    /berth/network-attachments/<id>        "<net-id> <ip>": the container's address; deleted with the
                                           container, and its c/ claim right after (a claim left by a crash
                                           in between is stale, so free again)

Every write that changes who owns a container (placement, desired state) compares the container key's
mod_revision, so two controllers can never both place one container: the loser gets Conflict and retries
on a fresh read. A container placed as it is created (create_placed) compares that its key and its name do
not exist yet instead: it is created, and placed, once.

Exceptions:

    StoreError
     +-- NotFound         no such object
         +-- NetworkClosed  a container (or service) created on a user network that is gone or being removed
     +-- NameInUse        a container name already taken (carries the owner's id)
     +-- Conflict         a compare-and-swap lost against a concurrent writer
     +-- Unavailable      etcd cannot be reached
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import grpc
import grpc.aio
from aetcd import rpc as etcdrpc
from google.protobuf.message import Message

from berth.api import types_pb2 as t
from controller.assigned import assignment_for, nodes_of

PREFIX = b"/berth/"
CONTAINERS = PREFIX + b"containers/"
STATUS = PREFIX + b"status/"
NAMES = PREFIX + b"names/"
ASSIGNMENTS = PREFIX + b"assignments/"  # no longer written (issue 6): left by older controllers, dropped at start
NODES = PREFIX + b"nodes/"
ALIVE = PREFIX + b"alive/"
LEADER = PREFIX + b"leader"
SERVICES = PREFIX + b"services/"
SERVICE_NAMES = PREFIX + b"service-names/"
SUBNETS = PREFIX + b"subnets/"
REMOVED_NODE = b"removed/"  # a subnet claim's owner: a node removed while containers of it were left
NETWORKS = PREFIX + b"networks/"  # issue 5: user networks
NETWORKS_REV = PREFIX + b"networks-rev"
NETWORK_IPS = PREFIX + b"network-ips/"
NETWORK_ATTACHMENTS = PREFIX + b"network-attachments/"
NETWORK_OPEN = PREFIX + b"network-open/"  # issue 5 (order, session 4): network rm vs run --network
OPEN, CLOSED = b"open", b"closed"
NOT_USER_NETWORKS = ("", "bridge", "host", "none")  # a ContainerSpec.network that names no user network
READ_PAGE_KEYS = 2_000  # keys per Range reply of read_prefixes (session 7)
ETCD_RECEIVE_BYTES = 64 * 1024 * 1024  # the largest etcd reply the controller takes (grpc's default: 4 MiB)

M = TypeVar("M", bound=Message)


class StoreError(Exception):
    """Base of every store failure."""


class NotFound(StoreError):
    pass


class NetworkClosed(NotFound):
    """A container (or service) created on a user network that does not exist or is being removed: nothing
    was created (or a service updated onto one: nothing was changed)."""

    def __init__(self, name: str, nothing_was: str = "created") -> None:
        super().__init__(f"network {name!r} does not exist or is being removed, so nothing was {nothing_was}; "
                         f"see `berthctl network ls`, or create it with `berthctl network create {name}`")
        self.name = name


class NameInUse(StoreError):
    def __init__(self, name: str, owner: str) -> None:
        super().__init__(f"name {name!r} is in use by container {owner[:12]}")
        self.name = name
        self.owner = owner


class Conflict(StoreError):
    """A compare-and-swap lost; re-read and try again."""


class Unavailable(StoreError):
    pass


def container_key(cid: str) -> bytes:
    return CONTAINERS + cid.encode()


def status_key(cid: str) -> bytes:
    return STATUS + cid.encode()


def name_key(name: str) -> bytes:
    return NAMES + name.encode()


def assignment_prefix(node_id: str) -> bytes:
    return ASSIGNMENTS + node_id.encode() + b"/"


def assignment_key(node_id: str, cid: str) -> bytes:
    return assignment_prefix(node_id) + cid.encode()


def node_key(node_id: str) -> bytes:
    return NODES + node_id.encode()


def alive_key(node_id: str) -> bytes:
    return ALIVE + node_id.encode()


def network_open_key(name: str) -> bytes:
    return NETWORK_OPEN + name.encode()


def user_network(network: str) -> bool:
    """Whether a ContainerSpec.network names a user network (not a built-in, not none)."""
    return network not in NOT_USER_NETWORKS


def implied_status(c: t.Container) -> t.ContainerStatus:
    """The status of a container that has no status key (issue 6: created placed, no report yet): assigned
    when it has a node, pending otherwise, of its current run."""
    return t.ContainerStatus(state=implied_state(c), generation=c.generation)


def implied_state(c: t.Container) -> t.ContainerState.ValueType:
    """implied_status's state, without building the status (the metrics count it for every container)."""
    return t.STATE_ASSIGNED if c.node_id else t.STATE_PENDING


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix`."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _parse(cls: type[M], data: bytes) -> M:
    msg = cls()
    msg.ParseFromString(data)
    return msg


@dataclass(frozen=True)
class Versioned:
    """A container as read, with the mod_revision to compare against when writing it back."""

    container: t.Container
    mod_revision: int


@dataclass(frozen=True)
class AssignmentEvent:
    revision: int
    container_id: str
    assignment: t.Assignment | None  # None: removed


@dataclass(frozen=True)
class StatusEvent:
    revision: int
    status: t.ContainerStatus | None  # None: deleted


@dataclass(frozen=True)
class Change:
    """One key's change (issue 6's events)."""

    revision: int
    put: bool  # False: deleted
    key: bytes
    value: bytes
    previous: bytes  # the value before, empty if none
    version: int  # 1 for a key's creation


def _translate(exc: Exception) -> StoreError:
    if isinstance(exc, aetcd.exceptions.ConnectionFailedError | aetcd.exceptions.ConnectionTimeoutError):
        return Unavailable(f"etcd is unreachable: {exc}")
    return StoreError(str(exc))


class Store:
    """Typed access to the cluster state. One per controller process."""

    def __init__(self, endpoint: str) -> None:
        url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        self.endpoint = endpoint
        self._client: Any = aetcd.Client(
            host=url.hostname or "127.0.0.1", port=url.port or 2379, timeout=10,
            # as berth's own channels (berth/rpc.py): grpc's default of 4 MiB is less than a prefix read or a
            # watch reply of a big cluster (read_prefixes also reads in pages)
            options={"grpc.max_receive_message_length": ETCD_RECEIVE_BYTES},
        )
        self._tx: Any = self._client.transactions

    async def connect(self) -> None:
        await self._client.connect()
        await self.revision()  # fail now, with a clear error, if etcd is not there

    async def close(self) -> None:
        keeper = getattr(self, "_keeper", None)
        if keeper is not None and keeper.task is not None:
            keeper.task.cancel()  # the shared lease keep-alive stream ends with the client, not pending for ever
            await asyncio.gather(keeper.task, return_exceptions=True)
        await self._client.close()

    async def revision(self) -> int:
        try:
            result = await self._client.get_prefix(PREFIX + b"\x00none", keys_only=True)
        except aetcd.exceptions.ClientError as exc:
            raise _translate(exc) from exc
        return int(result.header.revision)

    # ---- containers -------------------------------------------------------------------------------

    async def create_container(self, c: t.Container) -> int:
        """Store a new container, its first (pending) status, and claim its name, atomically. Raises
        NameInUse. (A container created by create_placed has no status key until its first report; watch_status
        follows its container key for the removal.)"""
        tx = self._tx
        pending = t.ContainerStatus(state=t.STATE_PENDING, generation=c.generation)
        compares = [tx.version(name_key(c.spec.name)) == 0, tx.version(container_key(c.id)) == 0]
        if user_network(c.spec.network):  # not on a network `network rm` has closed (or removed)
            compares.append(tx.value(network_open_key(c.spec.network)) == OPEN)
        ok, responses = await self._txn(
            compares,
            [
                tx.put(name_key(c.spec.name), c.id.encode()),
                tx.put(container_key(c.id), c.SerializeToString()),
                tx.put(status_key(c.id), pending.SerializeToString()),
            ],
            [tx.get(name_key(c.spec.name))],
        )
        if not ok:
            if responses and responses[0]:
                raise NameInUse(c.spec.name, responses[0][0][0].decode())
            if user_network(c.spec.network):
                raise NetworkClosed(c.spec.network)
            raise NameInUse(c.spec.name, "?")
        return int(responses[0].response_put.header.revision)

    async def get_container(self, cid: str) -> Versioned:
        kv = await self._get(container_key(cid))
        if kv is None:
            raise NotFound(f"no such container: {cid}")
        return Versioned(_parse(t.Container, kv.value), int(kv.mod_revision))

    async def get_status(self, cid: str) -> tuple[t.ContainerStatus, int]:
        """The status and the revision it was read at, in one read: a watch from that revision misses nothing,
        also when there is no status yet (reading the revision apart could land after a first report)."""
        reply = await self._rpc(self._client.kvstub.Range, etcdrpc.RangeRequest(key=status_key(cid)))
        status = _parse(t.ContainerStatus, reply.kvs[0].value) if reply.kvs else t.ContainerStatus()
        return status, int(reply.header.revision)

    async def list_containers(self) -> list[Versioned]:
        """Every container, with its status filled in (implied_status when it has none)."""
        containers = await self._get_prefix(CONTAINERS)
        statuses = {
            kv.key[len(STATUS) :].decode(): _parse(t.ContainerStatus, kv.value)
            for kv in await self._get_prefix(STATUS)
        }
        out = []
        for kv in containers:
            c = _parse(t.Container, kv.value)
            c.status.CopyFrom(statuses[c.id] if c.id in statuses else implied_status(c))
            out.append(Versioned(c, int(kv.mod_revision)))
        return out

    async def resolve(self, ref: str) -> str:
        """A container id from a name, a full id or a unique id prefix."""
        if not ref:
            raise NotFound("no container named: give a name or an id")
        kv = await self._get(name_key(ref))
        if kv is not None:
            return bytes(kv.value).decode()
        matches: list[str] = [
            bytes(kv.key[len(CONTAINERS) :]).decode()
            for kv in await self._get_prefix(CONTAINERS + ref.encode(), keys_only=True)
        ]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound(f"no such container: {ref}")
        raise NotFound(f"{ref!r} matches {len(matches)} containers; give more of the id or the name")

    async def update_container(
        self,
        old: Versioned,
        new: t.Container,
        *,
        status: t.ContainerStatus | None = None,
    ) -> int:
        """Write a container back if nobody changed it since it was read (else Conflict), with its status when
        given. Its node's assignment changes with it (controller.assigned: derived from the container key)."""
        tx = self._tx
        ops = [tx.put(container_key(new.id), new.SerializeToString())]
        if status is not None:
            ops.append(tx.put(status_key(new.id), status.SerializeToString()))
        ok, responses = await self._txn([tx.mod(container_key(new.id)) == old.mod_revision], ops, [])
        if not ok:
            raise Conflict(f"container {new.id[:12]} changed concurrently")
        return int(responses[0].response_put.header.revision)

    async def delete_container(self, old: Versioned) -> None:
        """Remove a container and everything hanging off it, its name included, in one transaction, if unchanged
        since read (its name only if still its own: a nested transaction compares it). One transaction, so a
        name is never freed before its container is gone, nor left behind by a crash in between (issue 6)."""
        c = old.container
        key = container_key(c.id)
        ops = [_delete(key), _delete(status_key(c.id))]  # its assignments go with the container key (issue 6)
        # issue 5: its user network address, read in the same transaction that deletes it (no claim can come
        # after: a claim needs the container) and then freed below
        attachment_at = len(ops)
        attachment = NETWORK_ATTACHMENTS + c.id.encode()
        ops += [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=attachment)), _delete(attachment)]
        name = name_key(c.spec.name)
        ops.append(etcdrpc.RequestOp(request_txn=etcdrpc.TxnRequest(
            compare=[etcdrpc.Compare(key=name, result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.VALUE,
                                     value=c.id.encode())],
            success=[_delete(name)])))
        reply = await self._rpc(self._client.kvstub.Txn,
                                etcdrpc.TxnRequest(compare=[_mod_is(key, old.mod_revision)], success=ops))
        if not reply.succeeded:
            raise Conflict(f"container {c.id[:12]} changed concurrently")
        found = reply.responses[attachment_at].response_range.kvs
        if found:
            net_id, _, ip = bytes(found[0].value).decode().partition(" ")
            claim = NETWORK_IPS + f"{net_id}/{ip}".encode()
            tx = self._tx
            # only if still this container's; left behind (a controller crash just here) it is stale, so free
            await self._txn([tx.value(claim) == f"c/{c.id}".encode()], [tx.delete(claim)], [])

    async def put_status(self, cid: str, status: t.ContainerStatus, mod_revision: int,
                         status_revision: int | None = None) -> bool:
        """Record one agent's report, only if its container is unchanged since the mod_revision given (its
        generation was checked on that version) and, given `status_revision`, its status too, as put_statuses
        does for several. False if either changed or the container is gone: read again before deciding."""
        return bool(await self.put_statuses([(cid, status, mod_revision, status_revision)]))

    async def held_status(self, cid: str) -> tuple[t.ContainerStatus | None, int]:
        """The container's status and its mod_revision ((None, 0): it has none), to decide on and compare with
        (a report is written only over the status it was checked against: Orchestrator.on_status)."""
        kv = await self._get(status_key(cid))
        return (_parse(t.ContainerStatus, kv.value), int(kv.mod_revision)) if kv is not None else (None, 0)

    async def watch_status(self, cid: str, after_revision: int) -> AsyncIterator[StatusEvent]:
        """Changes of one container's status after a revision, in order; a None status (and the end) means it
        was removed: its container key's deletion, followed too, as a container created placed has no status
        key until its first report (issue 6)."""
        statuses = _status_events(self._watch(status_key(cid), after_revision + 1, prefix=False))
        containers = self._watch(container_key(cid), after_revision + 1, prefix=False)

        async def removal() -> StatusEvent:
            async for kind, kv in containers:
                if kind != "PUT":
                    return StatusEvent(int(kv.mod_revision), None)
            raise StoreError("etcd watch ended")

        removed = asyncio.ensure_future(removal())
        status: asyncio.Future[StatusEvent] | None = None
        seen = after_revision  # the revision of the last status given
        try:
            while True:
                status = asyncio.ensure_future(anext(statuses))
                await asyncio.wait((status, removed), return_when=asyncio.FIRST_COMPLETED)
                if status.done():
                    event, status = status.result(), None
                else:
                    event = removed.result()
                    # the two watches are apart: the removal can come before the status put just before it (an
                    # --rm container's last report, review session 6: that status was never given), so the
                    # status as it was just before the removal is given first when it is newer
                    last = await self._status_before(cid, event.revision)
                    if last is not None and last.revision > seen:
                        yield last
                if event.status is not None:
                    seen = event.revision
                yield event
                if event.status is None:
                    return
        finally:
            for pending in (removed, status):
                if pending is not None:
                    pending.cancel()
                    await asyncio.gather(pending, return_exceptions=True)
            await statuses.aclose()  # type: ignore[attr-defined]

    # ---- assignments ------------------------------------------------------------------------------

    async def assignments(self, node_id: str) -> tuple[int, list[t.Assignment]]:
        """The node's whole assignment set and the revision it was read at: derived from every container key
        (issue 6; controller.assigned), so this reads them all: the cluster cache's streams do not call it."""
        result = await self._call(self._client.get_prefix, CONTAINERS)
        out = []
        for kv in result:
            a = assignment_for(_parse(t.Container, kv.value), node_id)
            if a is not None:
                out.append(a)
        return int(result.header.revision), out

    async def watch_assigned(self, node_id: str, after_revision: int) -> AsyncIterator[AssignmentEvent]:
        """The node's assignment changes after a revision, from a watch on every container key with its previous
        value (issue 6): a container that names the node (placed there, or keeping a stopped copy there) after
        the change gives its assignment, one that named it before and no longer does (removed, placed back
        elsewhere) a removal."""
        async for change in self.watch_changes(after_revision, CONTAINERS):
            cid = change.key[len(CONTAINERS):].decode()
            new = _parse(t.Container, change.value) if change.put else None
            a = assignment_for(new, node_id) if new is not None else None
            if a is not None:
                yield AssignmentEvent(change.revision, cid, a)
            elif change.previous and node_id in nodes_of(_parse(t.Container, change.previous)):
                yield AssignmentEvent(change.revision, cid, None)

    async def drop_assignment_keys(self) -> int:
        """Delete the /berth/assignments/ keys an older controller wrote (issue 6: what a node runs is derived
        from the container keys now; a stale node's stopped copy is told apart by generation 0 instead of its
        old one). Run at controller start; returns how many there were."""
        reply = await self._rpc(self._client.kvstub.DeleteRange, etcdrpc.DeleteRangeRequest(
            key=ASSIGNMENTS, range_end=_prefix_end(ASSIGNMENTS)))
        return int(reply.deleted)

    # ---- nodes ------------------------------------------------------------------------------------

    async def grant_lease(self, ttl_s: int) -> int:
        lease = await self._call(self._client.lease, ttl_s)
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> int:
        """Keep a lease alive; returns the TTL left, 0 if the lease has expired."""
        reply = await self._call(self._client.refresh_lease, lease_id)
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        with contextlib.suppress(StoreError):  # an expired lease has nothing left to revoke
            await self._call(self._client.revoke_lease, lease_id)

    async def put_node(self, node: t.Node) -> None:
        """Store a node and mark it alive under its lease."""
        tx = self._tx
        await self._txn(
            [],
            [
                tx.put(node_key(node.id), node.SerializeToString()),
                tx.put(alive_key(node.id), str(node.lease_id).encode(), lease=node.lease_id),
            ],
            [],
        )

    async def get_node(self, node_id: str) -> t.Node | None:
        kv = await self._get(node_key(node_id))
        return _parse(t.Node, kv.value) if kv is not None else None

    async def list_nodes(self) -> list[t.Node]:
        """Every node, with state filled in from its lease key."""
        alive = {kv.key[len(ALIVE) :].decode() for kv in await self._get_prefix(ALIVE, keys_only=True)}
        nodes = []
        for kv in await self._get_prefix(NODES):
            node = _parse(t.Node, kv.value)
            node.state = t.NODE_READY if node.id in alive else t.NODE_DOWN
            nodes.append(node)
        return nodes

    async def node_state(self, node_id: str) -> t.Node | None:
        """One node, with state filled in from its lease key (issue 6: cheaper than list_nodes)."""
        node = await self.get_node(node_id)
        if node is not None:
            node.state = t.NODE_READY if await self._get(alive_key(node_id)) is not None else t.NODE_DOWN
        return node

    async def watch_alive(self, after_revision: int) -> AsyncIterator[tuple[str, bool]]:
        """(node id, alive) as nodes come and go."""
        async for kind, kv in self._watch(ALIVE, after_revision + 1, prefix=True):
            yield kv.key[len(ALIVE) :].decode(), kind == "PUT"

    async def watch_containers(self, after_revision: int) -> AsyncIterator[tuple[str, Versioned | None]]:
        """(container id, the container or None when deleted) for every change."""
        async for kind, kv in self._watch(CONTAINERS, after_revision + 1, prefix=True):
            cid = kv.key[len(CONTAINERS) :].decode()
            if kind == "PUT":
                yield cid, Versioned(_parse(t.Container, kv.value), int(kv.mod_revision))
            else:
                yield cid, None

    async def watch_statuses(self, after_revision: int) -> AsyncIterator[tuple[str, t.ContainerStatus | None]]:
        """(container id, its status or None when deleted) for every change (issue 5: the DNS records)."""
        async for kind, kv in self._watch(STATUS, after_revision + 1, prefix=True):
            yield kv.key[len(STATUS) :].decode(), _parse(t.ContainerStatus, kv.value) if kind == "PUT" else None

    # ---- issue 6: leadership, batched placement, node updates ----------------------------------------

    async def campaign(self, identity: str, lease_id: int) -> str:
        """Become leader if nobody is: put /berth/leader under our lease when it is absent. Returns the
        leader's identity (ours when we won)."""
        tx = self._tx
        ok, responses = await self._txn(
            [tx.version(LEADER) == 0],
            [tx.put(LEADER, identity.encode(), lease=lease_id)],
            [tx.get(LEADER)],
        )
        if ok:
            return identity
        return bytes(responses[0][0][0]).decode() if responses and responses[0] else ""

    async def leader(self) -> str:
        kv = await self._get(LEADER)
        return bytes(kv.value).decode() if kv is not None else ""

    async def resign(self, identity: str) -> None:
        tx = self._tx
        await self._txn([tx.value(LEADER) == identity.encode()], [tx.delete(LEADER)], [])

    async def update_containers(self, writes: list[tuple[Versioned, t.Container, t.ContainerStatus]]) -> int:
        """Place several containers in one transaction: each written back with its status (its assignment is
        the container key, issue 6), all or none, and only if none of them changed since read. The revision,
        0 on a conflict (retry one by one)."""
        compares = []
        ops = []
        for old, new, status in writes:
            compares.append(_mod_is(container_key(new.id), old.mod_revision))
            ops.append(_put(container_key(new.id), new.SerializeToString()))
            ops.append(_put(status_key(new.id), status.SerializeToString()))
        return await self._raw_txn(compares, ops)  # issue 6: the revision, for the cluster cache

    async def move_off(self, old: Versioned, new: t.Container, status: t.ContainerStatus) -> int:
        """Take a container off a dead host: the container goes back to pending and names the host among its
        stale_nodes, whose assignment then says stopped (controller.assigned: it stops its copy when it comes
        back, keeping the files)."""
        tx = self._tx
        ops = [
            tx.put(container_key(new.id), new.SerializeToString()),
            tx.put(status_key(new.id), status.SerializeToString()),
        ]
        ok, responses = await self._txn([tx.mod(container_key(new.id)) == old.mod_revision], ops, [])
        if not ok:
            raise Conflict(f"container {new.id[:12]} changed concurrently")
        return int(responses[0].response_put.header.revision)

    async def update_node(self, node_id: str, change: Any) -> t.Node:
        """Apply change(node) to a stored node with a compare on its mod_revision, retrying on conflict."""
        tx = self._tx
        for _ in range(10):
            kv = await self._get(node_key(node_id))
            if kv is None:
                raise NotFound(f"no such node: {node_id}")
            node = _parse(t.Node, kv.value)
            change(node)
            ok, _ = await self._txn(
                [tx.mod(node_key(node_id)) == int(kv.mod_revision)], [tx.put(node_key(node_id), node.SerializeToString())], []  # noqa: E501
            )
            if ok:
                return node
        raise Conflict(f"node {node_id} kept changing; try again")

    async def named_nodes(self, network: str | None = None) -> set[str]:
        """The nodes that containers (those on `network`, when given) are on or keep a stopped copy on: a removed
        node's subnet and gateways stay its own while one of them names it."""
        named: set[str] = set()
        for v in await self.list_containers():
            if network is None or v.container.spec.network == network:
                named.add(v.container.node_id)
                named.update(v.container.stale_nodes)
        return named

    async def delete_node(self, node_id: str) -> None:
        """Forget a node; free its subnet of the container CIDR when no container of it is left (running there,
        lost there or with a stopped copy there), and its gateway address on each user network that no such
        container is on (issue 5): a host keeps its gateway on a network
        while it exists, so without this host churn would use a network up; a host that comes back holds its
        old gateway on the bridge of the networks its containers are on, so those stay its own."""
        tx = self._tx
        await self._txn([], [tx.delete(node_key(node_id)), tx.delete(alive_key(node_id))], [])
        _, nets = await self.list_networks()
        names = {n.id: n.name for n in nets}
        its = [v.container for v in await self.list_containers()
               if node_id == v.container.node_id or node_id in v.container.stale_nodes]
        # Its subnet of the container CIDR: freed, so that host churn does not use the CIDR up; or, while
        # containers of it are left (they hold addresses in it), marked as a removed node's, given to a new
        # node once none is left (controller.network). A node that joins again under the name gets a new one.
        for kv in await self._get_prefix(SUBNETS):
            if bytes(kv.value) == node_id.encode():
                then = [tx.put(bytes(kv.key), REMOVED_NODE + node_id.encode())] if its else [tx.delete(bytes(kv.key))]
                await self._txn([tx.value(bytes(kv.key)) == node_id.encode()], then, [])
        kept = {c.spec.network for c in its}
        owner = f"gw/{node_id}".encode()
        for kv in await self._get_prefix(NETWORK_IPS):
            net_id = bytes(kv.key[len(NETWORK_IPS):]).decode().partition("/")[0]
            if bytes(kv.value) == owner and names.get(net_id) not in kept:  # deleted only if still this node's
                await self._txn([tx.value(bytes(kv.key)) == owner], [tx.delete(bytes(kv.key))], [])

    # ---- issue 6: services -------------------------------------------------------------------------

    async def create_service(self, svc: t.Service) -> None:
        tx = self._tx
        name = SERVICE_NAMES + svc.spec.name.encode()
        network = svc.spec.template.network
        compares = [tx.version(name) == 0]
        if user_network(network):  # as create_container: not on a network `network rm` has closed
            compares.append(tx.value(network_open_key(network)) == OPEN)
        ok, responses = await self._txn(
            compares,
            [tx.put(name, svc.id.encode()), tx.put(SERVICES + svc.id.encode(), svc.SerializeToString())],
            [tx.get(name)],
        )
        if not ok:
            if not (responses and responses[0]) and user_network(network):
                raise NetworkClosed(network)
            owner = responses[0][0][0].decode() if responses and responses[0] else "?"
            raise NameInUse(svc.spec.name, owner)

    async def get_service(self, ref: str) -> tuple[t.Service, int]:
        """A service by name, id or unique id prefix, with its mod_revision."""
        kv = await self._get(SERVICE_NAMES + ref.encode())
        sid = bytes(kv.value).decode() if kv is not None else ref
        kv = await self._get(SERVICES + sid.encode())
        if kv is None:
            matches = await self._get_prefix(SERVICES + ref.encode()) if ref else []
            if len(matches) != 1:
                raise NotFound(f"no such service: {ref}" if not matches else f"{ref!r} matches several services")
            kv = matches[0]
        return _parse(t.Service, kv.value), int(kv.mod_revision)

    async def list_services(self) -> list[tuple[t.Service, int]]:
        return [(_parse(t.Service, kv.value), int(kv.mod_revision)) for kv in await self._get_prefix(SERVICES)]

    async def put_service(self, svc: t.Service, mod_revision: int, network_open: bool = False) -> None:
        """Write a service back if unchanged since read (else Conflict). With `network_open` (a user's update: its
        template may name another network), only while the user network it names is open, as create_service
        compares (else NetworkClosed: nothing changed)."""
        tx = self._tx
        key = SERVICES + svc.id.encode()
        network = svc.spec.template.network
        compares = [tx.mod(key) == mod_revision]
        checked = network_open and user_network(network)
        if checked:
            compares.append(tx.value(network_open_key(network)) == OPEN)
        ok, responses = await self._txn(compares, [tx.put(key, svc.SerializeToString())],
                                        [tx.get(network_open_key(network))] if checked else [])
        if not ok:
            if checked and not (responses and responses[0] and responses[0][0][0] == OPEN):
                raise NetworkClosed(network, "changed")
            raise Conflict(f"service {svc.spec.name} changed concurrently; try again")

    async def delete_service(self, svc: t.Service) -> None:
        tx = self._tx
        await self._txn([], [tx.delete(SERVICES + svc.id.encode())], [])
        await self._txn([tx.value(SERVICE_NAMES + svc.spec.name.encode()) == svc.id.encode()],
                        [tx.delete(SERVICE_NAMES + svc.spec.name.encode())], [])

    # ---- issue 6: events ---------------------------------------------------------------------------

    async def _kv_at(self, key: bytes, revision: int) -> Any | None:
        """A key's value as it was at a revision (None: it did not exist then, or that revision was compacted
        away)."""
        request = self._client._build_get_range_request(key)
        request.revision = revision
        try:
            reply = await self._client.kvstub.Range(request, timeout=10, metadata=self._client.metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(f"etcd is unreachable: {exc.details()}") from exc
            return None  # compacted
        return reply.kvs[0] if reply.kvs else None

    async def _status_before(self, cid: str, revision: int) -> StatusEvent | None:
        """A container's status as it was just before a revision, with its own revision (None: it had none, or
        that revision was compacted away)."""
        kv = await self._kv_at(status_key(cid), revision - 1)
        return None if kv is None else StatusEvent(int(kv.mod_revision), _parse(t.ContainerStatus, kv.value))

    async def container_at(self, cid: str, revision: int) -> t.Container | None:
        """A container as it was at a revision (None if it did not exist then or was compacted away)."""
        kv = await self._kv_at(container_key(cid), revision)
        return None if kv is None else _parse(t.Container, kv.value)

    async def watch_changes(self, after_revision: int, prefix: bytes = PREFIX) -> AsyncIterator[Change]:
        """Every change under /berth/ (or a prefix of it) after a revision, with the value before it."""
        queue: asyncio.Queue[tuple[str, Any] | BaseException] = asyncio.Queue()
        watch = await self._call(self._client.watch_prefix, prefix, start_revision=after_revision + 1,
                                 prev_kv=True)
        pump = asyncio.create_task(_pump_events(watch, queue))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise _translate(item) if isinstance(item, Exception) else item
                kind, event = item
                kv, prev = event.kv, event.prev_kv
                yield Change(int(kv.mod_revision), kind == "PUT", bytes(kv.key), bytes(kv.value or b""),
                             bytes(prev.value) if prev is not None else b"", int(kv.version))
        finally:
            pump.cancel()
            with contextlib.suppress(Exception):  # the channel may already be gone; nothing to undo
                await watch.cancel()

    # ---- container subnets (issue 5) ---------------------------------------------------------------

    async def subnet_claims(self) -> dict[str, str]:
        """subnet (e.g. 10.88.3.0/24) -> the node id that owns it."""
        out: dict[str, str] = {}
        for kv in await self._get_prefix(SUBNETS):
            out[kv.key[len(SUBNETS) :].decode().replace("_", "/")] = kv.value.decode()
        return out

    async def watch_nodes(self, after_revision: int) -> AsyncGenerator[str, None]:
        """The id of each node stored, changed or deleted after a revision (issue 5: the overlay's peers)."""
        async for _kind, kv in self._watch(NODES, after_revision + 1, prefix=True):
            yield kv.key[len(NODES) :].decode()

    async def subnet_owner(self, subnet: str) -> str:
        """Who holds one subnet's claim ("" when nobody): one key read, not every claim (issue 6)."""
        kv = await self._get(SUBNETS + subnet.replace("/", "_").encode())
        return bytes(kv.value).decode() if kv is not None else ""

    async def claim_subnet(self, subnet: str, node_id: str, replacing: str = "") -> bool:
        """Give `subnet` to `node_id` unless another node already has it (or, with `replacing`, unless it is no
        longer that removed node's); True when claimed."""
        key = SUBNETS + subnet.replace("/", "_").encode()
        compare = self._tx.value(key) == replacing.encode() if replacing else self._tx.version(key) == 0
        ok, _ = await self._txn([compare], [self._tx.put(key, node_id.encode())], [])
        return ok

    # ---- user networks (issue 5) --------------------------------------------------------------------

    async def list_networks(self) -> tuple[int, list[t.Network]]:
        """Every user network, and the mod_revision of NETWORKS_REV to give back to create/delete_network."""
        kv = await self._get(NETWORKS_REV)
        rev = int(kv.mod_revision) if kv is not None else 0
        return rev, [_parse(t.Network, kv.value) for kv in await self._get_prefix(NETWORKS)]

    async def create_network(self, net: t.Network, rev: int) -> bool:
        """Store a network, open (containers may be created on it), if no network was created or removed since
        `rev` was read; False if one was."""
        tx = self._tx
        ok, _ = await self._txn(
            [tx.mod(NETWORKS_REV) == rev],
            [tx.put(NETWORKS + net.id.encode(), net.SerializeToString()), tx.put(NETWORKS_REV, net.id.encode()),
             tx.put(network_open_key(net.name), OPEN)],
            [],
        )
        return ok

    async def close_network(self, net: t.Network) -> int:
        """Close a network (`network rm`'s first step): from the revision returned on, no container or service
        can be created on it (their transactions compare it is open). 0 when the network is gone."""
        return await self._raw_txn([_version_is(NETWORKS + net.id.encode(), 0, etcdrpc.Compare.GREATER)],
                                   [_put(network_open_key(net.name), CLOSED)])

    async def reopen_network(self, net: t.Network, closed_at: int) -> bool:
        """Undo close_network (the network is kept: it has users), unless its open key changed since (another
        `network rm` closed it again, or a controller start reopened it). True when reopened here."""
        return bool(await self._raw_txn([_mod_is(network_open_key(net.name), closed_at)],
                                        [_put(network_open_key(net.name), OPEN)]))

    async def open_networks(self) -> int:
        """At controller start: put the open key of every network that has none (made before there was one), and
        reopen one left closed (a `network rm` that ended between its close and its delete); a removal in
        flight meanwhile sees its close undone and starts over. Returns how many were (re)opened."""
        opened = 0
        for net in (await self.list_networks())[1]:
            key = network_open_key(net.name)
            kv = await self._get(key)
            if kv is not None and bytes(kv.value) == OPEN:
                continue
            held = _mod_is(key, int(kv.mod_revision)) if kv is not None else _version_is(key, 0)
            exists = _version_is(NETWORKS + net.id.encode(), 0, etcdrpc.Compare.GREATER)
            opened += bool(await self._raw_txn([held, exists], [_put(key, OPEN)]))
        return opened

    async def delete_network(self, net: t.Network, rev: int, closed_at: int) -> bool:
        """Remove a network, its open key and every address claim in it, if no network changed since `rev` and
        the network is still as closed at `closed_at` (close_network) left it: no container was created on it
        since that close."""
        tx = self._tx
        ips = NETWORK_IPS + net.id.encode() + b"/"
        ok, _ = await self._txn(
            [tx.mod(NETWORKS_REV) == rev, tx.mod(network_open_key(net.name)) == closed_at],
            [tx.delete(NETWORKS + net.id.encode()), tx.delete(ips, range_end=_prefix_end(ips)),
             tx.put(NETWORKS_REV, net.id.encode()), tx.delete(network_open_key(net.name))],
            [],
        )
        return ok

    async def network_ips(self, net_id: str) -> dict[str, str]:
        """address -> owner (c/<container-id> or gw/<node-id>) of one network's claims, stale ones too."""
        prefix = NETWORK_IPS + net_id.encode() + b"/"
        return {bytes(kv.key[len(prefix):]).decode(): bytes(kv.value).decode() for kv in await self._get_prefix(prefix)}

    async def network_attachments(self) -> dict[str, tuple[str, str]]:
        """container id -> (network id, address) of every container on a user network."""
        out: dict[str, tuple[str, str]] = {}
        for kv in await self._get_prefix(NETWORK_ATTACHMENTS):
            net_id, _, ip = bytes(kv.value).decode().partition(" ")
            out[bytes(kv.key[len(NETWORK_ATTACHMENTS):]).decode()] = (net_id, ip)
        return out

    async def claim_network_ip(self, net_id: str, ip: str, owner: str, stale: str = "", cid: str = "") -> bool:
        """Give address `ip` of a network to `owner`: a free one, or one whose claim is still the `stale`
        owner's. With `cid`, also the container's attachment, only while the container exists and has
        none. Only while the network exists. True when claimed."""
        tx = self._tx
        key = NETWORK_IPS + net_id.encode() + b"/" + ip.encode()
        compares = [tx.version(NETWORKS + net_id.encode()) > 0,
                    tx.value(key) == stale.encode() if stale else tx.version(key) == 0]
        ops = [tx.put(key, owner.encode())]
        if cid:
            compares += [tx.version(container_key(cid)) > 0, tx.version(NETWORK_ATTACHMENTS + cid.encode()) == 0]
            ops.append(tx.put(NETWORK_ATTACHMENTS + cid.encode(), f"{net_id} {ip}".encode()))
        ok, _ = await self._txn(compares, ops, [])
        return ok

    # ---- plumbing ---------------------------------------------------------------------------------

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except aetcd.exceptions.ClientError as exc:
            raise _translate(exc) from exc

    async def _get(self, key: bytes) -> Any:
        return await self._call(self._client.get, key)

    async def _get_prefix(self, prefix: bytes, keys_only: bool = False) -> list[Any]:
        result = await self._call(self._client.get_prefix, prefix, keys_only=keys_only)
        return list(result)

    async def _txn(self, compare: list[Any], success: list[Any], failure: list[Any]) -> tuple[bool, list[Any]]:
        ok, responses = await self._call(self._client.transaction, compare, success, failure)
        return bool(ok), list(responses)

    async def _watch(self, key: bytes, start_revision: int, *, prefix: bool) -> AsyncIterator[tuple[str, Any]]:
        """Events on a key (or prefix) from a revision on, as (kind, kv), in revision order."""
        async for item in await self._open_watch(key, start_revision, prefix=prefix):
            yield item

    async def _open_watch(
        self, key: bytes, start_revision: int | None, *, prefix: bool
    ) -> AsyncIterator[tuple[str, Any]]:
        """Create a watch now (from start_revision, or from the next revision when None) and return its
        events. A watch made from the next revision is "synced" in etcd and gets events at once; one
        made from a past revision is caught up by etcd's background loop, every 100 ms."""
        fn = self._client.watch_prefix if prefix else self._client.watch
        watch = await self._call(fn, key, start_revision=start_revision)
        return _drain(watch)

    async def open_status_watch(self, cid: str) -> AsyncIterator[StatusEvent]:
        """Like watch_status, from the next revision on, with the watch already in place when this returns:
        open it before the writes whose effects you wait for.

        All of them share one etcd watch on the status prefix (issue 6): a watch per call made etcd's and
        aetcd's watch creation the bottleneck of Run at a few hundred calls in flight."""
        hub = getattr(self, "_status_hub", None)
        if hub is None:
            hub = self._status_hub = _StatusHub(self)
        return await hub.subscribe(cid)


    # ---- session 7: what ends a Stop's wait besides its container's status (controller.stop_wait) ---------

    def watch_host_down(self, node_id: str) -> AsyncGenerator[int, None]:
        """0 once a watch on the node's lease key is in place (from the next revision: read whether the node is
        up after that), then the revision at which the key is deleted (its lease expired or was revoked)."""
        return self._deletions(alive_key(node_id))

    async def watch_removal(self, cid: str) -> AsyncGenerator[int, None]:
        """0 once a watch on the container's key is in place (from the next revision), then the revision at which
        the container is removed if it had no status key then (created placed, no report yet: issue 6). One with
        a status key shows its removal on a status watch (open_status_watch), after its last status."""
        deletions = self._deletions(container_key(cid))
        try:
            async for revision in deletions:
                if not revision or await self._status_before(cid, revision) is None:
                    yield revision
        finally:
            await deletions.aclose()

    async def _deletions(self, key: bytes) -> AsyncGenerator[int, None]:
        """0 once a watch on one key is in place (from the next revision), then the revision of each deletion of
        it. aclose() it when done: that cancels the watch (also when nothing was read after the 0)."""
        watch = await self._call(self._client.watch, key)
        try:
            yield 0
            async for event in watch:
                if str(event.kind) != "PUT":
                    yield int(event.kv.mod_revision)
            raise Unavailable("etcd ended a watch")
        except aetcd.exceptions.ClientError as exc:
            raise _translate(exc) from exc
        finally:
            with contextlib.suppress(Exception):  # the channel may already be gone; nothing to undo
                await watch.cancel()

    # ---- issue 6 (throughput): the cluster cache's reads, shared lease keep-alives, big transactions ----

    async def read_prefixes(self, prefixes: tuple[bytes, ...]) -> tuple[int, dict[bytes, list[tuple[bytes, bytes, int]]]]:  # noqa: E501
        """(key, value, mod_revision) of every key under each prefix, all read at one revision, and that
        revision (watch from the next one to follow them without a gap)."""
        out: dict[bytes, list[tuple[bytes, bytes, int]]] = {}
        revision = 0
        for prefix in prefixes:
            request = self._client._build_get_range_request(prefix, range_end=_prefix_end(prefix))
            request.limit = READ_PAGE_KEYS  # in pages: one reply of every container outgrew what grpc receives
            kvs = out[prefix] = []
            while True:
                if revision:
                    request.revision = revision
                reply = await self._rpc(self._client.kvstub.Range, request)
                revision = revision or int(reply.header.revision)
                kvs += [(bytes(kv.key), bytes(kv.value), int(kv.mod_revision)) for kv in reply.kvs]
                if not reply.more or not reply.kvs:
                    break
                request.key = bytes(reply.kvs[-1].key) + b"\0"  # the next page starts after the last key
        return revision, out

    async def watch_prefix(self, prefix: bytes, after_revision: int) -> AsyncIterator[tuple[bool, bytes, bytes, int]]:
        """(put, key, value, mod_revision) of every change under a prefix after a revision, in order."""
        async for kind, kv in self._watch(prefix, after_revision + 1, prefix=True):
            yield kind == "PUT", bytes(kv.key), bytes(kv.value), int(kv.mod_revision)

    async def watch_batches(self, prefix: bytes, after_revision: int) -> AsyncIterator[list[tuple[bool, bytes, bytes, int]]]:  # noqa: E501
        """Like watch_prefix, on a Watch stream of its own, each etcd reply's events at once: (put, key, value,
        mod_revision) lists in revision order, without a task, a queue and a parse per event on the way."""
        request = etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=prefix, range_end=_prefix_end(prefix), start_revision=after_revision + 1))
        closed = asyncio.Event()
        put = etcdrpc.Event.PUT

        async def requests() -> AsyncIterator[Any]:
            yield request
            await closed.wait()

        call = etcdrpc.WatchStub(self._client.channel).Watch(requests(), metadata=self._client.metadata)
        try:
            async for reply in call:
                if reply.compact_revision:
                    raise StoreError(f"etcd compacted revision {after_revision + 1} away ({reply.compact_revision})")
                if reply.canceled:
                    raise StoreError(f"etcd cancelled a watch: {reply.cancel_reason or 'no reason given'}")
                if reply.events:
                    yield [(e.type == put, (kv := e.kv).key, kv.value, kv.mod_revision) for e in reply.events]
            raise Unavailable("etcd ended a watch")
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"etcd is unreachable: {exc.details()}") from exc
        finally:
            closed.set()
            call.cancel()

    async def create_placed(self, items: list[t.Container], values: list[bytes] | None = None) -> int:
        """Create several containers in one transaction, each with its name claimed (placed or not: its node's
        assignment is the container key, and it has no status key until its first report, implied_status;
        issue 6): all or none, only if none of the names and ids exist (and the user networks they are on are
        open, as create_container checks). `values`: the containers serialized, when the caller has them.
        Returns the revision, 0 when a compare failed (a name in use, a network closed: create them one by one
        to learn which)."""
        # session 6: the request's messages are added in place (a third of the cost of building each message
        # and copying it in), the same request as _raw_txn([_version_is(...), ...], [_put(...), ...]) would send
        request = etcdrpc.TxnRequest()
        compare, success = request.compare.add, request.success.add
        for i, c in enumerate(items):
            spec = c.spec
            name, cid = name_key(spec.name), c.id
            key = CONTAINERS + cid.encode()
            compare(key=name, version=0)  # result EQUAL, target VERSION: the defaults
            compare(key=key, version=0)
            network = spec.network
            if user_network(network):  # as create_container: not on a network `network rm` has closed
                compare(key=network_open_key(network), target=etcdrpc.Compare.VALUE, value=OPEN)
            put = success().request_put
            put.key, put.value = name, cid.encode()
            put = success().request_put
            put.key, put.value = key, values[i] if values is not None else c.SerializeToString()
        return await self._commit(request)

    async def put_statuses(self, items: list[tuple[str, t.ContainerStatus, int, int | None]]) -> int:
        """Record several agents' reports in one transaction, each only if its container is unchanged since
        the mod_revision given (its generation was checked on that version) and, where a status revision is
        given (0: none yet), its status is still the one the report follows: a report delivered late (its
        agent's stream broke while it was in etcd's hands, and the agent sent it again, and newer ones, to
        another controller) cannot overwrite a newer status of the same run. Returns the revision, 0 when a
        compare failed (record them one by one)."""
        # the request's messages added in place, as create_placed does (session 6)
        request = etcdrpc.TxnRequest()
        compare, success, by_mod = request.compare.add, request.success.add, etcdrpc.Compare.MOD
        for cid, _, mod, _ in items:
            compare(key=CONTAINERS + cid.encode(), target=by_mod, mod_revision=mod)
        for cid, _, _, rev in items:
            if rev is not None:
                compare(key=STATUS + cid.encode(), target=by_mod, mod_revision=rev)
        for cid, status, _, _ in items:
            put = success().request_put
            put.key, put.value = STATUS + cid.encode(), status.SerializeToString()
        return await self._commit(request)

    async def keep_alive(self, lease_id: int) -> int:
        """Like refresh_lease, over one LeaseKeepAlive stream shared by every call (a heartbeat costs a
        message each way instead of a new etcd stream). Returns the TTL left, 0 if the lease expired."""
        keeper = getattr(self, "_keeper", None)
        if keeper is None:
            keeper = self._keeper = _KeepAlive(self._client)
        return await keeper.refresh(lease_id)

    async def _rpc(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=10, metadata=self._client.metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"etcd is unreachable: {exc.details()}") from exc
            raise StoreError(f"etcd: {exc.details()}") from exc

    async def _raw_txn(self, compares: list[Any], ops: list[Any]) -> int:
        """A transaction built straight from etcd's messages (aetcd's builders cost more than the write
        for a few hundred operations). The revision it committed at, 0 if a compare failed."""
        return await self._commit(etcdrpc.TxnRequest(compare=compares, success=ops))

    async def _commit(self, request: Any) -> int:
        """Send a transaction; the revision it committed at, 0 if a compare failed."""
        reply = await self._rpc(self._client.kvstub.Txn, request)
        return int(reply.header.revision) if reply.succeeded else 0


def _version_is(key: bytes, version: int, result: Any = etcdrpc.Compare.EQUAL) -> Any:
    return etcdrpc.Compare(key=key, result=result, target=etcdrpc.Compare.VERSION, version=version)


def _value_is(key: bytes, value: bytes) -> Any:
    return etcdrpc.Compare(key=key, result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.VALUE, value=value)


def _mod_is(key: bytes, revision: int) -> Any:
    return etcdrpc.Compare(key=key, result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.MOD,
                           mod_revision=revision)


def _put(key: bytes, value: bytes) -> Any:
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value))


def _delete(key: bytes) -> Any:
    return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))


class _KeepAlive:
    """One LeaseKeepAlive stream to etcd for every lease this controller refreshes (issue 6)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.waiters: dict[int, list[asyncio.Future[int]]] = {}
        self.task: asyncio.Task[None] | None = None

    async def refresh(self, lease_id: int) -> int:
        if self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._run(self.queue))
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(lease_id, []).append(future)
        self.queue.put_nowait(lease_id)
        try:
            async with asyncio.timeout(10):
                return await future
        except TimeoutError:
            raise Unavailable("etcd did not answer a lease keep-alive in 10 s") from None
        finally:
            waiting = self.waiters.get(lease_id)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self.waiters[lease_id]

    async def _run(self, queue: asyncio.Queue[int]) -> None:
        async def requests() -> AsyncIterator[Any]:
            while True:
                yield etcdrpc.LeaseKeepAliveRequest(ID=await queue.get())

        error: StoreError = Unavailable("etcd closed the lease keep-alive stream")
        try:
            async for reply in self.client.leasestub.LeaseKeepAlive(requests(), metadata=self.client.metadata):
                for future in self.waiters.pop(int(reply.ID), []):
                    if not future.done():
                        future.set_result(int(reply.TTL))
        except grpc.aio.AioRpcError as exc:
            error = Unavailable(f"etcd is unreachable: {exc.details()}")
        finally:
            waiters, self.waiters = self.waiters, {}
            for futures in waiters.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(error)


class _StatusHub:
    """One watch on /berth/status/, its events handed to the subscribers of each container."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.subscribers: dict[str, list[asyncio.Queue[StatusEvent | BaseException]]] = {}
        self.task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    async def subscribe(self, cid: str) -> AsyncIterator[StatusEvent]:
        async with self.lock:
            if self.task is None or self.task.done():
                events = await self.store._open_watch(STATUS, None, prefix=True)
                self.task = asyncio.create_task(self._pump(events))
        queue: asyncio.Queue[StatusEvent | BaseException] = asyncio.Queue()
        self.subscribers.setdefault(cid, []).append(queue)
        return self._events(cid, queue)

    async def _pump(self, events: AsyncIterator[tuple[str, Any]]) -> None:
        try:
            async for kind, kv in events:
                cid = bytes(kv.key[len(STATUS):]).decode()
                queues = self.subscribers.get(cid)
                if not queues:
                    continue
                status = _parse(t.ContainerStatus, kv.value) if kind == "PUT" else None
                event = StatusEvent(int(kv.mod_revision), status)
                for q in queues:
                    q.put_nowait(event)
        except Exception as exc:  # noqa: BLE001 - every subscriber gets it; the next subscribe watches anew
            for queues in self.subscribers.values():
                for q in queues:
                    q.put_nowait(exc)

    async def _events(self, cid: str, queue: asyncio.Queue[StatusEvent | BaseException]) -> AsyncIterator[StatusEvent]:
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise _translate(item) if isinstance(item, Exception) and not isinstance(item, StoreError) else item
                yield item
                if item.status is None:
                    return
        finally:
            queues = self.subscribers.get(cid, [])
            if queue in queues:
                queues.remove(queue)
            if not queues:
                self.subscribers.pop(cid, None)


async def _status_events(events: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[StatusEvent]:
    async for kind, kv in events:
        if kind != "PUT":
            yield StatusEvent(int(kv.mod_revision), None)
            return
        yield StatusEvent(int(kv.mod_revision), _parse(t.ContainerStatus, kv.value))


async def _drain(watch: Any) -> AsyncIterator[tuple[str, Any]]:
    queue: asyncio.Queue[tuple[str, Any] | BaseException] = asyncio.Queue()
    pump = asyncio.create_task(_pump(watch, queue))
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise _translate(item) if isinstance(item, Exception) else item
            yield item
    finally:
        pump.cancel()
        with contextlib.suppress(Exception):  # the channel may already be gone; nothing to undo
            await watch.cancel()


async def _pump_events(watch: Any, queue: asyncio.Queue[tuple[str, Any] | BaseException]) -> None:
    try:
        async for event in watch:
            await queue.put((str(event.kind), event))
        await queue.put(StoreError("etcd watch ended"))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
        await queue.put(exc)


async def _pump(watch: Any, queue: asyncio.Queue[tuple[str, Any] | BaseException]) -> None:
    try:
        async for event in watch:
            await queue.put((str(event.kind), event.kv))
        await queue.put(StoreError("etcd watch ended"))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
        await queue.put(exc)

