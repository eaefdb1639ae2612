"""Agent sessions: join, heartbeats that keep each node's etcd lease alive, the assignment stream, and
status reports (heartbeats and reports on one Reports stream per session, issue 6). Agents never reach
etcd; this servicer writes on their behalf.

A node is ready while its lease lives. The lease is granted at join and refreshed by heartbeats; when an
agent dies, heartbeats stop, etcd expires the lease and deletes the node's alive key, and the node shows as
down within one TTL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from berth.api import dispatcher_pb2 as d
from berth.api import dispatcher_pb2_grpc
from berth.api import types_pb2 as t
from controller.assigned import fill
from controller.cache import CACHE_WAIT_S, ClusterCache, RawAssignment
from controller.dns import NamesHub
from controller.feed import Feed
from controller.metrics import ControllerMetrics
from controller.network import SubnetAllocator
from controller.orchestrator import Orchestrator
from controller.peer_feed import PeerFeed
from controller.store import AssignmentEvent, NotFound, Store, StoreError, Unavailable
from controller.user_networks import UserNetworks

log = logging.getLogger(__name__)

MAX_CHANGES = 256  # queued assignment changes sent in one message of an agent's stream (issue 6)
# issue 6 (streams): lazy_ack batches committed and not acknowledged yet get an ack of their own after this many
# heartbeat periods (the agent's next heartbeat answer, which carries committed_through, normally comes first)
ACK_DELAY = 1.5


class Dispatcher(dispatcher_pb2_grpc.DispatcherServicer):
    def __init__(
        self, store: Store, orchestrator: Orchestrator, metrics: ControllerMetrics, lease_ttl_s: int
    ) -> None:
        self.store = store
        self.orchestrator = orchestrator
        self.metrics = metrics
        self.lease_ttl_s = lease_ttl_s
        self._leases: dict[str, int] = {}
        self.heartbeat_period_s = max(0.5, lease_ttl_s / 4)  # told to agents at Join
        self.subnets: SubnetAllocator | None = None  # issue 5: set by main; None gives no container network
        self.peer_feed = PeerFeed(store, lambda: orchestrator.cache)  # issue 6: the overlay's peers, cached
        self.names = NamesHub(store, lambda: orchestrator.cache)  # issue 5 (names): DNS records (issue 6: cached)
        self.networks: UserNetworks | None = None  # issue 5: user networks, set by main

    async def Join(self, request: d.JoinRequest, context: grpc.aio.ServicerContext[d.JoinRequest, d.JoinResponse]) -> d.JoinResponse:  # noqa: E501
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "join needs a node name")
        node_id = request.name
        try:
            old = await self.store.get_node(node_id)
            known = old.subnet if old is not None else ""
            subnet = await self.subnets.subnet_for(node_id, known) if self.subnets is not None else ""
            lease = await self.store.grant_lease(self.lease_ttl_s)
            node = t.Node(
                id=node_id, name=request.name, address=request.address,
                agent_address=request.agent_address, metrics_address=request.metrics_address,
                capacity=request.capacity, labels=request.labels, platform=request.platform,
                joined_at_ns=time.time_ns(), lease_id=lease, subnet=subnet,
                hostname=request.hostname, kernel_version=request.kernel_version,  # issue 6: fingerprint
            )
            if old is not None:  # what `node update` set outlives a rejoin
                node.availability = old.availability
                node.user_labels.update(old.user_labels)
            await self.store.put_node(node)
            if old is not None and old.lease_id and old.lease_id != lease:
                await self.store.revoke_lease(old.lease_id)
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        self._leases[node_id] = lease
        log.info("node %s joined from %s (lease %x)", node_id, request.address, lease)
        return d.JoinResponse(
            node_id=node_id, lease_ttl_s=self.lease_ttl_s, heartbeat_period_s=self.heartbeat_period_s,
            subnet=subnet,
        )

    async def _keep_alive(self, node_id: str) -> int:
        """Keep a node's lease alive (a heartbeat on its Reports stream); returns its TTL. Raises NotFound for a
        node that never joined, StoreError when etcd fails."""
        lease = self._leases.get(node_id)
        if lease is None:
            node = await self.store.get_node(node_id)
            if node is None:
                raise NotFound("unknown node: join first")
            lease = node.lease_id
        ttl = await self.store.keep_alive(lease)  # issue 6: one etcd stream for every heartbeat
        if ttl <= 0:
            # The lease expired (the node was partitioned for longer than the TTL): make it ready again.
            node = await self.store.get_node(node_id)
            if node is None:
                raise NotFound("unknown node: join first")
            node.lease_id = await self.store.grant_lease(self.lease_ttl_s)
            await self.store.put_node(node)
            self._leases[node_id] = node.lease_id
            return self.lease_ttl_s
        self._leases[node_id] = lease
        return ttl

    async def Assignments(self, request: d.AssignmentsRequest, context: grpc.aio.ServicerContext[d.AssignmentsRequest, d.AssignmentsMessage]) -> AsyncIterator[d.AssignmentsMessage]:  # noqa: E501
        node_id = request.node_id
        self.metrics.agent_sessions.inc()
        cache = self.orchestrator.cache
        try:
            if cache is not None and not cache.ready:  # issue 6: loading; without it each stream reads every container
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cache.wait_ready(), CACHE_WAIT_S)
            follow = cache.follow_assignments(node_id) if cache is not None else None
            if cache is not None and follow is not None:  # issue 6: fed by the cache's watch
                async for msg in self._from_cache(cache, node_id, request.after_revision, *follow):
                    yield msg
                return
            revision = request.after_revision
            if revision <= 0:
                revision, assignments = await self.store.assignments(node_id)
                yield d.AssignmentsMessage(
                    kind=d.AssignmentsMessage.COMPLETE,
                    revision=revision,
                    changes=[
                        d.AssignmentChange(
                            action=d.AssignmentChange.UPDATE, container_id=a.container_id, assignment=a
                        )
                        for a in assignments
                    ],
                )
            async for event in self.store.watch_assigned(node_id, revision):
                yield _incremental(event)
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except StoreError as exc:
            # A compacted revision among others: the agent starts over with a complete set.
            await context.abort(grpc.StatusCode.ABORTED, f"resume failed, reconnect from scratch: {exc}")
        finally:
            self.metrics.agent_sessions.dec()

    async def _from_cache(self, cache: ClusterCache, node_id: str, after: int, current: int,
                          queue: Feed[RawAssignment | BaseException]) -> AsyncIterator[d.AssignmentsMessage]:
        """The Assignments stream from the cache's watch: the changes after `current` come through `queue`;
        an agent that resumes from before it (or starts) gets the complete set as of `current` first (the
        containers naming the node, from the cache's index: no etcd read, issue 6). The
        changes queued when the stream gets to them go in one message (the agent applies a message's changes
        in order, then takes its revision, which the message holds all of), each parsed once from etcd's bytes
        into that message."""
        try:
            if after < current:
                complete = d.AssignmentsMessage(kind=d.AssignmentsMessage.COMPLETE, revision=current)
                for c in cache.assigned_to(node_id):
                    change = complete.changes.add(container_id=c.id, action=d.AssignmentChange.UPDATE)
                    if not fill(change, c, node_id):  # a write of ours ahead of the watch took it off the node:
                        del complete.changes[-1]        # its change is queued
                yield complete
                after = current
            while True:
                event = await queue.get()
                msg: d.AssignmentsMessage | None = None
                while True:
                    if isinstance(event, BaseException):
                        if msg is not None:
                            yield msg
                        raise event
                    if event.revision > after:
                        if msg is None:
                            msg = d.AssignmentsMessage(kind=d.AssignmentsMessage.INCREMENTAL)
                        change = msg.changes.add(container_id=event.container_id)
                        if event.container is not None and fill(change, event.container, node_id):
                            change.action = d.AssignmentChange.UPDATE
                        else:
                            change.action = d.AssignmentChange.REMOVE
                        msg.revision = event.revision
                    if queue.empty():  # a watch reply's changes are queued together: its revisions are whole
                        break
                    if msg is not None and len(msg.changes) >= MAX_CHANGES:
                        # Cut with changes left: the next may be of this revision too (one transaction), so
                        # the message carries the revision before it; an agent that resumes after it gets
                        # this revision again (changes by container id, in order: applying them twice is
                        # harmless), never misses the rest of it.
                        msg.revision = event.revision - 1
                        break
                    event = queue.get_nowait()
                if msg is not None:
                    yield msg
        finally:
            cache.unfollow_assignments(node_id, queue)

    async def Reports(self, request_iterator: AsyncIterator[d.ReportsRequest], context: grpc.aio.ServicerContext[d.ReportsRequest, d.ReportsAck]) -> AsyncIterator[d.ReportsAck]:  # noqa: E501
        """issue 6 (throughput): an agent session's status reports and heartbeats on one stream. A heartbeat is
        answered in turn (one that fails ends the stream: NOT_FOUND or UNAVAILABLE). A batch is recorded with
        the other reports in flight (Orchestrator.record_statuses), so a slow commit holds up no heartbeat: one
        sent for an ack of its own is acknowledged when done, with the error if it failed; the lazy_ack batches
        (issue 6, streams) are committed one after the other in the order sent and acknowledged together by the
        committed_through of the next ack this stream sends (a heartbeat's answer, or one sent for them alone
        when none went for ACK_DELAY heartbeat periods), one that fails ends the stream."""
        acks: Feed[_Answer] = Feed()
        lazy = _LazyAcks(acks, ACK_DELAY * self.heartbeat_period_s)
        reader = asyncio.create_task(self._read_reports(request_iterator, acks, lazy))
        try:
            while (ack := await acks.get()) is not None:
                if isinstance(ack, tuple):
                    await context.abort(*ack)
                    return
                lazy.stamp(ack)
                yield ack
        finally:
            reader.cancel()
            lazy.close()

    async def _read_reports(self, requests: AsyncIterator[d.ReportsRequest], acks: Feed[_Answer],
                            lazy: _LazyAcks) -> None:
        """Reports' side that reads: what to answer goes to `acks`, then None when the agent closed its side,
        or the status code and message to end the stream with. session 6: a batch's recording is a future
        with a callback that answers it (no task, no queue); the lazy_ack batches are chained (_InOrder)."""
        recording: set[asyncio.Future[None]] = set()  # batches that get an ack of their own
        in_order: _InOrder | None = None

        def answer(seq: int, node_id: str, future: asyncio.Future[None]) -> None:
            recording.discard(future)
            if future.cancelled():
                return
            ack = d.ReportsAck(seq=seq)
            exc = future.exception()
            if exc is not None:  # any failure: the agent keeps the batch and sends it again
                log.warning("status report of %s: %s", node_id, exc)
                ack.error = str(exc) or type(exc).__name__
            acks.put_nowait(ack)

        try:
            async for request in requests:
                if request.updates:
                    if request.lazy_ack:
                        if in_order is None:
                            in_order = _InOrder(self.orchestrator, acks, lazy)
                        in_order.add(request)
                    else:
                        future = self.orchestrator.record_statuses(
                            [(u.container_id, u.status) for u in request.updates])
                        recording.add(future)
                        future.add_done_callback(functools.partial(answer, request.seq, request.node_id))
                if request.heartbeat:
                    try:
                        ttl = await self._keep_alive(request.node_id)
                    except NotFound as exc:
                        acks.put_nowait((grpc.StatusCode.NOT_FOUND, str(exc)))
                        return
                    except StoreError as exc:
                        acks.put_nowait((grpc.StatusCode.UNAVAILABLE, str(exc)))
                        return
                    acks.put_nowait(d.ReportsAck(seq=request.seq, lease_ttl_s=ttl))
                elif not request.updates:
                    acks.put_nowait(d.ReportsAck(seq=request.seq))
            # the agent closed its side: answer what it sent
            if in_order is not None:
                await in_order.drained()
                acks.put_nowait(d.ReportsAck())
            if recording:
                await asyncio.wait(set(recording))  # each answered by its callback first (added before)
            acks.put_nowait(None)
        except Exception as exc:  # noqa: BLE001 - the stream broke under the reader: end it with the reason
            acks.put_nowait((grpc.StatusCode.INTERNAL, f"reading status reports: {exc}"))
        finally:
            for future in list(recording):
                future.cancel()
            if in_order is not None:
                in_order.close()

    async def Peers(self, request: d.PeersRequest, context: grpc.aio.ServicerContext[d.PeersRequest, d.PeersMessage]) -> AsyncIterator[d.PeersMessage]:  # noqa: E501
        """issue 5: the overlay's peers for an agent (controller.peer_feed, issue 6: from the cache)."""
        try:
            async for msg in self.peer_feed.subscribe(request.deltas):  # issue 6: from the cache, one watch for all
                yield msg
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def Names(self, request: d.NamesRequest, context: grpc.aio.ServicerContext[d.NamesRequest, d.NamesMessage]) -> AsyncIterator[d.NamesMessage]:  # noqa: E501
        """issue 5 (names): the containers' DNS records for an agent (controller.dns)."""
        try:
            async for msg in self.names.subscribe():
                yield msg
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def NetworkAttach(self, request: d.NetworkAttachRequest, context: grpc.aio.ServicerContext[d.NetworkAttachRequest, d.NetworkAttachment]) -> d.NetworkAttachment:  # noqa: E501
        """issue 5: a container's address on its user network, and the host's gateway on it."""
        if self.networks is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this controller has no user networks")
            raise AssertionError
        try:
            return await self.networks.attach(request.node_id, request.container_id)
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except StoreError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        raise AssertionError


# what a Reports stream answers: an ack, the status code and message to end the stream with, or None (done)
_Answer = d.ReportsAck | tuple[grpc.StatusCode, str] | None


class _InOrder:
    """A Reports stream's lazy_ack batches (issue 6, streams), recorded one after the other in the order sent:
    each starts when the one before it is recorded (a done-callback on its future, session 6: no queue and no
    task). The first that fails ends the stream (what was committed before it is acknowledged) and nothing after
    it is recorded: the agent sends them all again."""

    def __init__(self, orchestrator: Orchestrator, acks: Feed[_Answer], lazy: _LazyAcks) -> None:
        self._orchestrator = orchestrator
        self._acks = acks
        self._lazy = lazy
        self._waiting: collections.deque[d.ReportsRequest] = collections.deque()
        self._current: asyncio.Future[None] | None = None
        self._request: d.ReportsRequest | None = None
        self._failed = False
        self._idle: asyncio.Future[None] | None = None

    def add(self, request: d.ReportsRequest) -> None:
        if self._failed:
            return
        if self._current is None:
            self._start(request)
        else:
            self._waiting.append(request)

    def _start(self, request: d.ReportsRequest) -> None:
        self._request = request
        self._current = self._orchestrator.record_statuses([(u.container_id, u.status) for u in request.updates])
        self._current.add_done_callback(self._recorded)

    def _recorded(self, future: asyncio.Future[None]) -> None:
        if future is not self._current or future.cancelled():  # closed
            return
        request, self._current = self._request, None
        assert request is not None
        exc = future.exception()
        if exc is not None:
            log.warning("status report of %s: %s", request.node_id, exc)
            self._failed = True
            self._waiting.clear()
            self._acks.put_nowait(d.ReportsAck())  # what was committed before it
            self._acks.put_nowait((grpc.StatusCode.UNAVAILABLE,
                                   f"the statuses were not recorded ({exc or type(exc).__name__}); send them again"))
        else:
            self._lazy.committed(request.seq)
            if self._waiting:
                self._start(self._waiting.popleft())
                return
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def drained(self) -> None:
        """Until every batch added is recorded (or one failed)."""
        if self._current is not None:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def close(self) -> None:
        """The stream ended: what is recording is cancelled (not written unless in a transaction already)."""
        self._failed = True
        self._waiting.clear()
        current, self._current = self._current, None
        if current is not None:
            current.cancel()


class _LazyAcks:
    """issue 6 (streams): a Reports stream's acknowledgement of its lazy_ack batches: the highest seq committed
    in order goes in every ack the stream sends (`stamp`); committed and not sent for `delay_s`, it gets an ack
    of its own."""

    def __init__(self, acks: Feed[_Answer], delay_s: float) -> None:
        self._acks = acks
        self._delay_s = delay_s
        self._committed = 0  # every lazy batch with a seq up to this one is recorded
        self._sent = 0  # the committed_through sent last
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()  # session 6: looked up once, not at each batch committed

    def committed(self, seq: int) -> None:
        self._committed = seq
        if self._timer is None:
            self._timer = self._loop.call_later(self._delay_s, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._committed > self._sent:
            self._acks.put_nowait(d.ReportsAck())

    def stamp(self, ack: d.ReportsAck) -> None:
        ack.committed_through = self._sent = self._committed
        self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _incremental(event: AssignmentEvent) -> d.AssignmentsMessage:
    """One assignment change from the store's watch as the stream's message. It carries the revision before
    the change's: other changes of that revision (one transaction) may follow in messages of their own, and
    an agent that resumes after the message's revision must get them (and gets this one again: harmless)."""
    change = d.AssignmentChange(container_id=event.container_id)
    if event.assignment is None:
        change.action = d.AssignmentChange.REMOVE
    else:
        change.action = d.AssignmentChange.UPDATE
        change.assignment.CopyFrom(event.assignment)
    return d.AssignmentsMessage(kind=d.AssignmentsMessage.INCREMENTAL, revision=event.revision - 1, changes=[change])
