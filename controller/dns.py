"""The containers' DNS records, the controller's side (issue 5, names): one record per RUNNING container with
an address (its name, network, address and the service it is a task of), kept from two etcd watches (the
containers and their statuses) and streamed to every agent (Dispatcher.Names), whose DNS server answers from
them (agent.network.dns).

One feed per controller process, whatever the number of agents: it reads the table once, follows the
watches, and hands each change to every subscriber as a delta; a new subscriber (an agent that connects or
restarts) gets the whole table first. A container that stops, exits, is lost with its host or is removed
leaves the table; one that starts again (restart, a policy restart, a new host) comes back with its new
address. A failed watch ends every subscription with the StoreError: agents reconnect and start over from a
whole table.

With the controller's cluster cache (controller.cache, issue 6) the feed reads the table from the cache and
follows the cache's watch (`follow_containers`) instead of listing every container and keeping two etcd
watches of its own; without it (or while it loads for longer than CACHE_WAIT_S) it reads etcd as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from controller.cache import CACHE_WAIT_S, ClusterCache, take_all
from controller.feed import Feed
from controller.store import Store, StoreError

log = logging.getLogger(__name__)

DEFAULT_NETWORK = "bridge"
MAX_BEHIND = 10_000  # deltas queued for one subscriber before its stream is ended
SERVICE_LABEL = "berth.service"  # set by controller.services on its tasks, with the service's name


def record_of(container: t.Container, status: t.ContainerStatus | None) -> d.NameRecord | None:
    """The record of a container in this state (None: it has no name to resolve now)."""
    if status is None or status.state != t.STATE_RUNNING or not status.ip_address:
        return None
    network = status.network or container.spec.network or DEFAULT_NETWORK  # status: the name, never an id
    if network in ("host", "none"):
        return None
    service = container.spec.labels.get(SERVICE_LABEL, "") if container.service_id else ""
    return d.NameRecord(container_id=container.id, name=container.spec.name, network=network,
                        address=status.ip_address, service=service)


def _may_change(feed: _Feed, cache: ClusterCache, cid: str) -> bool:
    """Whether a change of a container (applied to the cache) may change the records (session 6: the feed is
    not woken for the others): the container has a record now, or a status that may give it one (running, with
    an address). A change it is not woken for leaves the container with no record, as it had: the record the
    feed computes from the cache for a later change (or one queued before) is the same as it would have been."""
    if cid in feed.records:
        return True
    status = cache.status(cid)
    return status is not None and status.state == t.STATE_RUNNING and bool(status.ip_address)


class _Feed:
    def __init__(self) -> None:
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.subscribers: set[Feed[d.NamesMessage | BaseException]] = set()  # session 6: not asyncio.Queue
        self.containers: dict[str, t.Container] = {}
        self.statuses: dict[str, t.ContainerStatus] = {}
        self.records: dict[str, d.NameRecord] = {}
        self.task: asyncio.Task[None] | None = None


class NamesHub:
    def __init__(self, store: Store, cache: Callable[[], ClusterCache | None] | None = None) -> None:
        self.store = store
        self._cache = cache  # issue 6: the controller's cluster cache, when it has one
        self._feed: _Feed | None = None

    async def subscribe(self) -> AsyncIterator[d.NamesMessage]:
        """The whole table, then every change, until the caller stops (or a StoreError)."""
        feed = self._feed
        if feed is None or feed.task is None or feed.task.done():
            feed = self._feed = _Feed()
            feed.task = asyncio.create_task(self._run(feed))
        queue: Feed[d.NamesMessage | BaseException] = Feed()
        feed.subscribers.add(queue)
        try:
            await asyncio.shield(feed.ready)
            # No await between the snapshot and the deltas queued after it: the feed changes the table and
            # queues its delta in one step.
            yield d.NamesMessage(kind=d.NamesMessage.COMPLETE,
                                 records=sorted(feed.records.values(), key=lambda r: r.container_id))
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            feed.subscribers.discard(queue)
            if not feed.subscribers and feed.task is not None:
                feed.task.cancel()
                if self._feed is feed:
                    self._feed = None

    async def _run(self, feed: _Feed) -> None:
        cache = self._cache() if self._cache is not None else None
        if cache is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cache.wait_ready(), CACHE_WAIT_S)
            changes = cache.follow_containers(functools.partial(_may_change, feed, cache))
            if changes is not None:
                try:
                    await self._run_cached(feed, cache, changes)
                finally:
                    cache.unfollow_containers(changes)
                return
        events: Feed[tuple[str, str, Any] | BaseException] = Feed()
        pumps: list[asyncio.Task[None]] = []
        try:
            revision = await self.store.revision()
            for v in await self.store.list_containers():
                feed.containers[v.container.id] = v.container
                feed.statuses[v.container.id] = v.container.status
            for cid, c in feed.containers.items():
                rec = record_of(c, feed.statuses.get(cid))
                if rec is not None:
                    feed.records[cid] = rec
            pumps = [asyncio.create_task(self._pump("container", self.store.watch_containers(revision), events)),
                     asyncio.create_task(self._pump("status", self.store.watch_statuses(revision), events))]
            feed.ready.set_result(None)
            while True:
                dirty: set[str] = set()
                for kind, cid, value in await take_all(events):  # everything already queued makes one delta
                    table: dict[str, Any] = feed.containers if kind == "container" else feed.statuses
                    if value is None:
                        table.pop(cid, None)
                    else:
                        table[cid] = value.container if kind == "container" else value
                    dirty.add(cid)
                self._publish(feed, dirty)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every subscriber gets it and ends its stream
            self._fail(feed, exc)
        finally:
            for p in pumps:
                p.cancel()

    async def _run_cached(self, feed: _Feed, cache: ClusterCache,
                          changes: Feed[str | BaseException]) -> None:
        """The feed from the cluster cache: its table now (no await since `changes` was opened), then the
        records of the containers it says changed."""
        try:
            for cid, held in cache.containers.items():
                rec = record_of(held.container, cache.status(cid))
                if rec is not None:
                    feed.records[cid] = rec
            feed.ready.set_result(None)
            while True:
                dirty = set(await take_all(changes))  # everything already queued makes one delta
                for cid in dirty:  # _publish reads them from the feed's tables
                    v = cache.container(cid)
                    status = cache.status(cid)
                    if v is None:
                        feed.containers.pop(cid, None)
                    else:
                        feed.containers[cid] = v.container
                    if status is None:
                        feed.statuses.pop(cid, None)
                    else:
                        feed.statuses[cid] = status
                self._publish(feed, dirty)
                for cid in dirty:  # the feed keeps only its records; the cache has the rest
                    feed.containers.pop(cid, None)
                    feed.statuses.pop(cid, None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every subscriber gets it and ends its stream
            self._fail(feed, exc)

    @staticmethod
    def _fail(feed: _Feed, exc: BaseException) -> None:
        if not feed.ready.done():
            feed.ready.set_exception(exc)
            feed.ready.exception()  # retrieved: no "never retrieved" warning when nobody waits
        for q in feed.subscribers:
            q.put_nowait(exc)
        if not isinstance(exc, StoreError):
            log.exception("the DNS records' feed failed")

    @staticmethod
    async def _pump(kind: str, changes: AsyncIterator[tuple[str, Any]],
                    events: Feed[tuple[str, str, Any] | BaseException]) -> None:
        try:
            async with contextlib.aclosing(changes):  # type: ignore[type-var]
                async for cid, value in changes:
                    events.put_nowait((kind, cid, value))
            events.put_nowait(StoreError(f"the {kind} watch ended"))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the feed, which ends with it
            events.put_nowait(exc)

    @staticmethod
    def _publish(feed: _Feed, dirty: set[str]) -> None:
        changed: list[d.NameRecord] = []
        removed: list[str] = []
        for cid in sorted(dirty):
            c = feed.containers.get(cid)
            rec = record_of(c, feed.statuses.get(cid)) if c is not None else None
            old = feed.records.get(cid)
            if rec is None:
                if old is not None:
                    del feed.records[cid]
                    removed.append(cid)
            elif rec != old:
                feed.records[cid] = rec
                changed.append(rec)
        if changed or removed:
            msg = d.NamesMessage(kind=d.NamesMessage.INCREMENTAL, records=changed, removed=removed)
            for q in list(feed.subscribers):
                if q.qsize() >= MAX_BEHIND:  # a stuck agent: end its stream; it reconnects to a whole table
                    q.put_nowait(StoreError(f"this agent is {MAX_BEHIND} DNS changes behind; reconnect"))
                    feed.subscribers.discard(q)
                else:
                    q.put_nowait(msg)
