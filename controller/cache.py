"""An in-memory copy of the containers, statuses and hosts in etcd, fed by an etcd watch (issue 6): the leader's
sweeps and the status path read it instead of every container from etcd (kube-scheduler's informers,
swarmkit's memdb). Its watch also feeds `Run`'s status waits (`StatusWaiter`), every agent's assignment
stream (`follow_assignments`: the containers naming the agent's node, controller.assigned), the DNS
records (`follow_containers`) and the overlay's peers (`follow_nodes`); `ps` and `inspect` read it once it
is `consistent` (caught up with etcd's revision).

It is loaded with one read per prefix at one revision, then follows one watch on /berth/ from the next
revision, in revision order, so the copy is etcd as of one revision plus this controller's own writes. It
keeps the indexes the scheduler needs without a scan: the pending containers (in creation order), what is
placed on each host (memory, CPU, count, host ports), the containers of each host and of services.

The copy is a hint, never the authority: every decision taken on it is committed with a compare on the
container's mod_revision (controller.store), or, for a Run created already placed, on its id and name being
new, so a stale entry costs a retry on a fresh read, never a double placement. Writes this controller
commits are applied at once with the revision etcd gave them (`put_container`, `put_status`), so the next
decision sees them before their watch event arrives; an event older than what is held is ignored. A failed
watch drops the copy (`ready` false: callers read etcd) and loads it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import NamedTuple, TypeVar

from berth.api import types_pb2 as t
from controller import scheduler
from controller.assigned import nodes_of
from controller.feed import Feed
from controller.store import (
    ALIVE,
    CONTAINERS,
    NODES,
    PREFIX,
    STATUS,
    NotFound,
    Store,
    StoreError,
    Unavailable,
    Versioned,
    implied_state,
    implied_status,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BEHIND = 10_000  # assignment changes queued for one agent session before its stream is ended


class RawAssignment(NamedTuple):
    """One change of a node's assignments as the cache's watch saw it (issue 6): the container whose key
    changed, as parsed once by the cache (the agent session fills its message from it for its node,
    controller.assigned.fill: the container may have left the node, which makes it a removal); None when the
    container was removed."""

    revision: int
    container_id: str
    container: t.Container | None


class StatusWaiter:
    """One container's statuses from the moment it was opened, fed by the cache's watch (what `Run` waits
    on, issue 6): the cache hands each status to it as the event is applied, and the caller is woken only
    when the status it waits for comes (or the container's removal, or a failure of the watch), with no task,
    queue or condition of its own."""

    __slots__ = ("_cache", "_future", "_generation", "_states", "_then", "cid", "error", "gone", "history")

    def __init__(self, cache: ClusterCache, cid: str) -> None:
        self.cid = cid
        self.history: list[t.ContainerStatus] = []
        self.gone = False
        self.error: StoreError | None = None
        self._cache = cache
        self._future: asyncio.Future[t.ContainerStatus] | None = None
        self._generation = 0
        self._states: frozenset[int] = frozenset()
        self._then: Callable[[t.ContainerStatus | StoreError], None] | None = None

    def seed(self, status: t.ContainerStatus) -> None:
        """Add a status read directly (it is no older than the events already seen)."""
        self._add(status)

    async def wait(self, generation: int, states: Iterable[int], timeout_s: float) -> t.ContainerStatus:
        """The first status seen of this generation (or later) in one of the states. Raises NotFound when the
        container is removed first, the watch's StoreError when the cache stopped following etcd, and
        TimeoutError after timeout_s."""
        wanted = frozenset(states)
        for status in self.history:
            if status.generation >= generation and status.state in wanted:
                return status
        self._raise_if_over()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[t.ContainerStatus] = loop.create_future()
        self._future = future
        self._generation, self._states = generation, wanted
        expiry = loop.call_later(timeout_s, _expire, future)
        try:
            return await future
        finally:
            expiry.cancel()
            self._future = None

    def then(self, generation: int, states: Iterable[int],
             callback: Callable[[t.ContainerStatus | StoreError], None]) -> None:
        """Call `callback` once with the first status seen of this generation (or later) in one of the states,
        or with NotFound when the container is removed first, or the watch's StoreError (session 5: what
        RunStream's requests wait with, no future, task or timer each). It may be called before this returns,
        else from the cache's watch: it must not close this waiter there (close it later)."""
        wanted = frozenset(states)
        for status in self.history:
            if status.generation >= generation and status.state in wanted:
                callback(status)
                return
        if self.gone:
            callback(NotFound(f"container {self.cid[:12]} was removed"))
        elif self.error is not None:
            callback(self.error)
        else:
            self._then, self._generation, self._states = callback, generation, wanted

    def close(self) -> None:
        """Stop following (idempotent)."""
        self._then = None
        self._cache._drop_waiter(self)

    def _add(self, status: t.ContainerStatus | None) -> None:
        if status is None:
            self.gone = True
        else:
            self.history.append(status)
        then = self._then
        if then is not None:
            if status is not None and status.generation >= self._generation and status.state in self._states:
                self._then = None
                then(status)
            elif self.gone:
                self._then = None
                then(NotFound(f"container {self.cid[:12]} was removed"))
            return
        future = self._future
        if future is None or future.done():
            return
        if status is not None and status.generation >= self._generation and status.state in self._states:
            future.set_result(status)
        elif self.gone:
            future.set_exception(NotFound(f"container {self.cid[:12]} was removed"))

    def _fail(self, exc: StoreError) -> None:
        self.error = exc
        then, self._then = self._then, None
        if then is not None:
            then(exc)
        if self._future is not None and not self._future.done():
            self._future.set_exception(exc)

    def _raise_if_over(self) -> None:
        if self.gone:
            raise NotFound(f"container {self.cid[:12]} was removed")
        if self.error is not None:
            raise self.error


def _expire(future: asyncio.Future[t.ContainerStatus]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


# how long a feed that follows the cache (DNS records, overlay peers) waits for a loading cache before it
# reads etcd itself
CACHE_WAIT_S = 10.0


async def take_all(queue: Feed[T | BaseException]) -> list[T]:
    """A follower's next items (follow_containers, follow_nodes): waits for one, then takes every one already
    queued, as they make one change to apply; raises the failure queued among them (the feed ends with it)."""
    items: list[T] = []
    for item in await queue.take_all():
        if isinstance(item, BaseException):
            raise item
        items.append(item)
    return items


def _parse_container(data: bytes) -> t.Container:
    c = t.Container()
    c.ParseFromString(data)
    return c


def _parse_status(data: bytes) -> t.ContainerStatus:
    s = t.ContainerStatus()
    s.ParseFromString(data)
    return s


class ClusterCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.ready = False
        self._synced = asyncio.Event()
        self.revision = 0  # etcd's revision as of which the copy is complete
        self._subscribers: dict[str, list[StatusWaiter]] = {}
        # session 6: controller.feed's Feed, not an asyncio.Queue each (no getpid(2) per wait, less per item)
        self._sessions: dict[str, list[Feed[RawAssignment | BaseException]]] = {}
        self._followers: list[Feed[str | BaseException]] = []  # follow_containers (the DNS records)
        self._node_followers: list[Feed[str | BaseException]] = []  # follow_nodes (the overlay's peers)
        self._reset()

    def _reset(self) -> None:
        self.containers: dict[str, Versioned] = {}
        self.statuses: dict[str, tuple[t.ContainerStatus, int]] = {}
        self.nodes: dict[str, tuple[t.Node, int]] = {}
        self.alive: set[str] = set()
        self.drained: set[str] = set()  # session 6: the nodes drained, for the leader's heal (each sweep)
        self.pending: dict[str, None] = {}  # an ordered set: first come, first placed
        self.on_node: dict[str, set[str]] = {}
        # issue 6 (keys): the nodes each container has an assignment on (its node, its stale nodes) and the
        # containers with an assignment on each node, as of `revision` (updated by the watch only, in etcd's
        # order, unlike the indexes above that this controller's own writes update first): what the agents'
        # streams send and their complete sets are read from
        self.assigned: dict[str, tuple[str, ...]] = {}
        self.assigned_on: dict[str, set[str]] = {}
        self.of_services: set[str] = set()
        self._usage: dict[str, list[int]] = {}  # node -> [memory, cpus, containers]
        self._ports: dict[str, Counter[tuple[str, int]]] = {}
        self._views: dict[str, scheduler.HostView] = {}
        self._positions: dict[str, int] | None = None  # host_index()
        # container id -> revision of its deletion, so that a write of ours committed before it and applied
        # after its event does not bring the container back (bounded: the oldest go first)
        self._deleted: dict[str, int] = {}

    # ---- reads ------------------------------------------------------------------------------------

    async def wait_ready(self) -> None:
        await self._synced.wait()

    async def caught_up(self, revision: int, timeout_s: float = 1.0) -> bool:
        """Wait (a little) until the copy has every change up to a revision; False if it has not."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.revision < revision:
            if not self.ready or asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def consistent(self) -> bool:
        """Wait until the copy holds every change committed before this call, as a linearizable read of etcd
        would (one read of etcd's revision, then the watch catching up to it): True, then read the copy; False
        when it is not following etcd or does not catch up within a second: read etcd instead."""
        if not self.ready:
            return False
        return await self.caught_up(await self.store.revision())

    def container(self, cid: str) -> Versioned | None:
        return self.containers.get(cid)

    def status(self, cid: str) -> t.ContainerStatus | None:
        entry = self.statuses.get(cid)
        return entry[0] if entry is not None else None

    def hosts(self) -> list[scheduler.HostView]:
        """The scheduler's view of every host, as controller.orchestrator.Orchestrator.hosts builds it (kept
        up to date as containers and hosts change, not built per call)."""
        return list(self._views.values())

    def host_index(self) -> dict[str, int]:
        """Each host's position in what `hosts()` returns (read it, do not change it): kept while the set of
        hosts stays the same, instead of built for every batch of placements (issue 6)."""
        if self._positions is None:
            self._positions = {node_id: i for i, node_id in enumerate(self._views)}
        return self._positions

    def _view(self, node_id: str) -> None:
        entry = self.nodes.get(node_id)
        if entry is None:
            if self._views.pop(node_id, None) is not None:
                self._positions = None
            return
        if node_id not in self._views:
            self._positions = None
        ports = self._ports.get(node_id)
        self._views[node_id] = scheduler.host_view(entry[0], node_id in self.alive, self._usage.get(node_id, (0, 0, 0)),
                                                   frozenset(ports) if ports else frozenset())

    def _usage_changed(self, node_id: str, ports_same: bool = False) -> None:
        """A host's view after a container came or went (its node and state unchanged): the usage and ports
        put into the view held, without building the rest again (issue 6: once per placement). `ports_same`:
        the container published no host port, so the view's ports stand."""
        old = self._views.get(node_id)
        if old is None:
            self._view(node_id)
            return
        u = self._usage.get(node_id, (0, 0, 0))
        if ports_same:
            view_ports = old.ports
        else:
            ports = self._ports.get(node_id)
            view_ports = frozenset(ports) if ports else scheduler.NO_PORTS
        self._views[node_id] = scheduler.HostView(
            old.id, old.name, old.ready, old.memory_bytes, old.nano_cpus, u[0], u[1], u[2], old.labels,
            old.platform, old.schedulable, view_ports)

    def node_list(self) -> list[t.Node]:
        """Every node with its state filled in (copies)."""
        out = []
        for node_id, (n, _) in self.nodes.items():
            node = t.Node()
            node.CopyFrom(n)
            node.state = t.NODE_READY if node_id in self.alive else t.NODE_DOWN
            out.append(node)
        return out

    def with_status(self, cids: Iterable[str]) -> list[Versioned]:
        """Copies of these containers with their status filled in (implied_status when they have none, issue
        6), as Store.list_containers gives them."""
        out = []
        for cid in cids:
            v = self.containers.get(cid)
            if v is None:
                continue
            c = t.Container()
            c.CopyFrom(v.container)
            status = self.status(cid)
            c.status.CopyFrom(status if status is not None else implied_status(c))
            out.append(Versioned(c, v.mod_revision))
        return out

    def state_counts(self) -> Counter[int]:
        """Containers by status state (for the metrics)."""
        statuses = self.statuses  # session 6: every 2 s over every container, so counted in one pass in C
        return Counter((entry[0].state if (entry := statuses.get(cid)) is not None
                        else implied_state(v.container)) or t.STATE_PENDING
                       for cid, v in self.containers.items())

    # ---- status watches (what Run waits on) ----------------------------------------------------------

    def status_waiter(self, cid: str) -> StatusWaiter | None:
        """A waiter on the container's statuses, fed by the cache's own watch (no second etcd watch on the
        statuses, no task per caller): every status of the container committed after this returns is seen.
        None when the cache is not following etcd now: use the store's watch. Close it when done."""
        if not self.ready:
            return None
        waiter = StatusWaiter(self, cid)
        self._subscribers.setdefault(cid, []).append(waiter)
        return waiter

    def waiters(self) -> int:
        """How many status waiters are open (the controller's metrics: each is a Run waiting)."""
        return sum(len(waiters) for waiters in self._subscribers.values())

    def _drop_waiter(self, waiter: StatusWaiter) -> None:
        waiters = self._subscribers.get(waiter.cid)
        if waiters is None:
            return
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            del self._subscribers[waiter.cid]

    def _fail_subscribers(self, exc: StoreError) -> None:
        subscribers, self._subscribers = self._subscribers, {}
        for waiters in subscribers.values():
            for waiter in waiters:
                waiter._fail(exc)
        sessions, self._sessions = self._sessions, {}
        for session_queues in sessions.values():
            for session_queue in session_queues:
                session_queue.put_nowait(Unavailable(f"the controller's copy of etcd is being reloaded: {exc}"))
        followers, self._followers = self._followers + self._node_followers, []
        self._node_followers = []
        for follower in followers:
            follower.put_nowait(Unavailable(f"the controller's copy of etcd is being reloaded: {exc}"))

    def follow_containers(self, want: Callable[[str], bool] | None = None) -> Feed[str | BaseException] | None:
        """A queue of the id of each container whose container or status key changes after this returns, in
        etcd's order, fed by the cache's watch (controller.dns's records without watches of their own), or
        the StoreError that ended it; None when the cache is not following etcd now. Read the changed state
        from the cache; give the queue back with `unfollow_containers`. `want` (session 6): only the ids it
        says yes to, asked once the change is applied to the cache."""
        if not self.ready:
            return None
        queue: Feed[str | BaseException] = Feed(want=want)
        self._followers.append(queue)
        return queue

    def unfollow_containers(self, queue: Feed[str | BaseException]) -> None:
        if queue in self._followers:
            self._followers.remove(queue)

    def follow_nodes(self) -> Feed[str | BaseException] | None:
        """As follow_containers, for the nodes: the id of each node stored, changed or removed (controller.
        peer_feed's peers without an etcd watch per agent). Give it back with `unfollow_nodes`."""
        if not self.ready:
            return None
        queue: Feed[str | BaseException] = Feed()
        self._node_followers.append(queue)
        return queue

    def unfollow_nodes(self, queue: Feed[str | BaseException]) -> None:
        if queue in self._node_followers:
            self._node_followers.remove(queue)

    def follow_assignments(self, node_id: str) -> tuple[int, Feed[RawAssignment | BaseException]] | None:
        """A queue of the node's assignment changes after the returned revision, fed by the cache's watch
        (one etcd watch for every agent session instead of one each); None when the cache is not following
        etcd now. Give the queue back with `unfollow_assignments`."""
        if not self.ready:
            return None
        queue: Feed[RawAssignment | BaseException] = Feed()
        self._sessions.setdefault(node_id, []).append(queue)
        return self.revision, queue

    def assigned_to(self, node_id: str) -> list[t.Container]:
        """The containers with an assignment on a node as of `revision` (call it in the same step as
        follow_assignments, so that the queue holds every change after them): each as held now, which may be
        a write of this controller's that the watch has not brought yet (its change comes through the queue
        too, and is sent again: harmless)."""
        out = []
        for cid in self.assigned_on.get(node_id, ()):
            v = self.containers.get(cid)
            if v is not None:
                out.append(v.container)
        return out

    def _assign(self, cid: str, c: t.Container | None, mod: int) -> None:
        """A container's change in the watch's order: the index of its assignments, and the change queued for
        the agent sessions of every node it had or has an assignment on."""
        old = self.assigned.get(cid, ())
        new = nodes_of(c) if c is not None else ()
        if new:
            self.assigned[cid] = new
        else:
            self.assigned.pop(cid, None)
        if old != new:
            for node_id in old:
                if node_id not in new:
                    on = self.assigned_on.get(node_id)
                    if on is not None:
                        on.discard(cid)
                        if not on:
                            del self.assigned_on[node_id]
            for node_id in new:
                self.assigned_on.setdefault(node_id, set()).add(cid)
        if not self._sessions:
            return
        change: RawAssignment | None = None
        for node_id in (*old, *(n for n in new if n not in old)):
            sessions = self._sessions.get(node_id)
            if not sessions:
                continue
            if change is None:
                change = RawAssignment(mod, cid, c)
            for session in list(sessions):
                if session.qsize() >= MAX_BEHIND:  # an agent that stopped reading: end its stream
                    session.put_nowait(Unavailable(f"agent {node_id} is {MAX_BEHIND} assignment changes "
                                                   "behind; it resumes from its revision when it reconnects"))
                    self.unfollow_assignments(node_id, session)
                else:
                    session.put_nowait(change)

    def unfollow_assignments(self, node_id: str, queue: Feed[RawAssignment | BaseException]) -> None:
        queues = self._sessions.get(node_id, [])
        if queue in queues:
            queues.remove(queue)
        if not queues:
            self._sessions.pop(node_id, None)

    # ---- writes this controller committed -----------------------------------------------------------

    def put_container(self, c: t.Container, revision: int) -> None:
        old = self.containers.get(c.id)
        # held as of this revision already: the same value (one key, one revision), most often from the watch,
        # whose event comes before the transaction's own reply (session 6: ~9 in 10 placements of the bench),
        # which then need not be indexed again
        if (old is not None and old.mod_revision >= revision) or self._deleted.get(c.id, 0) > revision:
            return
        self._unindex(old)
        v = Versioned(c, revision)
        self.containers[c.id] = v
        self._index(v)

    def put_status(self, cid: str, status: t.ContainerStatus, revision: int) -> None:
        old = self.statuses.get(cid)
        if (old is None or old[1] <= revision) and self._deleted.get(cid, 0) <= revision:
            self.statuses[cid] = (status, revision)

    def _delete_container(self, cid: str, revision: int) -> None:
        old = self.containers.get(cid)
        if old is not None and old.mod_revision <= revision:
            self._unindex(old)
            del self.containers[cid]
        self._deleted[cid] = revision
        if len(self._deleted) > 100_000:
            for gone in list(self._deleted)[:50_000]:
                del self._deleted[gone]

    def _index(self, v: Versioned) -> None:
        c = v.container
        cid, node_id = c.id, c.node_id  # each protobuf field read once (session 6: once per placement)
        if c.service_id:
            self.of_services.add(cid)
        if not node_id:
            if c.desired_state == t.DESIRED_RUNNING:
                self.pending[cid] = None
            return
        self.on_node.setdefault(node_id, set()).add(cid)
        spec = c.spec
        if c.desired_state == t.DESIRED_RUNNING:
            u = self._usage.setdefault(node_id, [0, 0, 0])
            u[0] += spec.memory_bytes
            u[1] += spec.nano_cpus
            u[2] += 1
        if spec.ports:
            self._ports.setdefault(node_id, Counter()).update(scheduler.host_ports(spec))
            self._usage_changed(node_id)
        else:
            self._usage_changed(node_id, ports_same=True)

    def _unindex(self, v: Versioned | None) -> None:
        if v is None:
            return
        c = v.container
        cid, node_id = c.id, c.node_id
        self.of_services.discard(cid)
        self.pending.pop(cid, None)
        if not node_id:
            return
        on = self.on_node.get(node_id)
        if on is not None:
            on.discard(cid)
        spec = c.spec
        if c.desired_state == t.DESIRED_RUNNING:
            u = self._usage[node_id]
            u[0] -= spec.memory_bytes
            u[1] -= spec.nano_cpus
            u[2] -= 1
        if spec.ports:
            ports = self._ports[node_id]
            ports.subtract(scheduler.host_ports(spec))
            for key in [k for k, n in ports.items() if n <= 0]:
                del ports[key]
            self._usage_changed(node_id)
        else:
            self._usage_changed(node_id, ports_same=True)

    def _put_node(self, node: t.Node, revision: int) -> None:
        self.nodes[node.id] = (node, revision)
        if node.availability == t.AVAILABILITY_DRAIN:
            self.drained.add(node.id)
        else:
            self.drained.discard(node.id)
        self._view(node.id)

    # ---- loading and following etcd ----------------------------------------------------------------

    async def run(self) -> None:
        """Load, then follow etcd for ever; on a failure, drop the copy and load it again."""
        while True:
            try:
                await self._follow()
            except StoreError as exc:
                log.warning("cluster cache: %s; loading it again", exc)
                self._fail_subscribers(exc)
            except asyncio.CancelledError:
                self.ready = False
                self._fail_subscribers(StoreError("the cluster cache stopped"))
                raise
            except Exception as exc:
                log.exception("cluster cache failed; loading it again")
                self._fail_subscribers(StoreError(f"the cluster cache failed: {exc}"))
            self.ready = False
            self._synced.clear()
            await asyncio.sleep(0.5)

    async def _follow(self) -> None:
        revision, loaded = await self.store.read_prefixes((CONTAINERS, STATUS, NODES, ALIVE))
        self._reset()
        for _, value, mod in loaded[CONTAINERS]:
            c = _parse_container(value)
            self.put_container(c, mod)
            self._assign(c.id, c, mod)
        for key, value, mod in loaded[STATUS]:
            self.statuses[key[len(STATUS):].decode()] = (_parse_status(value), mod)
        for _, value, mod in loaded[NODES]:
            node = t.Node()
            node.ParseFromString(value)
            self._put_node(node, mod)
        self.alive = {key[len(ALIVE):].decode() for key, _, _ in loaded[ALIVE]}
        for node_id in self.nodes:
            self._view(node_id)
        self.revision = revision
        self.ready = True
        self._synced.set()
        # One watch on the whole tree, not one per prefix: its events come in revision order, so the copy is
        # always etcd as of one revision (a container is never seen on a host whose join is not seen yet,
        # which healing would take for a dead host).
        async for events in self.store.watch_batches(PREFIX, revision):
            for put, key, value, mod in events:
                self._apply(put, key, value, mod)
        raise StoreError("the cache's etcd watch ended")

    def _apply(self, put: bool, key: bytes, value: bytes, mod: int) -> None:
        self.revision = mod
        if key.startswith(CONTAINERS):
            cid = key[len(CONTAINERS):].decode()
            if put:
                held = self.containers.get(cid)
                if held is not None and held.mod_revision == mod:
                    c = held.container  # our own write, applied already
                else:
                    c = _parse_container(value)
                    if held is None or held.mod_revision < mod:
                        self.put_container(c, mod)
                self._assign(cid, c, mod)
            else:
                self._delete_container(cid, mod)
                self._assign(cid, None, mod)
                for waiter in self._subscribers.get(cid, ()):  # issue 6: it may have had no status key
                    waiter._add(None)
            for follower in self._followers:
                follower.put_nowait(cid)
        elif key.startswith(STATUS):
            cid = key[len(STATUS):].decode()
            status = None
            if put:
                written = self.statuses.get(cid)
                if written is not None and written[1] == mod:
                    status = written[0]  # our own write, applied already
                else:
                    status = _parse_status(value)
                    self.put_status(cid, status, mod)
            elif cid in self.statuses and self.statuses[cid][1] <= mod:
                del self.statuses[cid]
            waiters = self._subscribers.get(cid)
            if waiters:
                for waiter in waiters:
                    waiter._add(status)
            for follower in self._followers:
                follower.put_nowait(cid)
        elif key.startswith(NODES):
            if put:
                node = t.Node()
                node.ParseFromString(value)
                self._put_node(node, mod)
            else:
                self.nodes.pop(key[len(NODES):].decode(), None)
                self.drained.discard(key[len(NODES):].decode())
                self._view(key[len(NODES):].decode())
            for follower in self._node_followers:
                follower.put_nowait(key[len(NODES):].decode())
        elif key.startswith(ALIVE):
            node_id = key[len(ALIVE):].decode()
            if put:
                self.alive.add(node_id)
            else:
                self.alive.discard(node_id)
            self._view(node_id)
