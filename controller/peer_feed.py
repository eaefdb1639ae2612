"""The overlay's peers for every agent's Peers stream, from the controller's cluster cache (issue 6): the peer
set is computed once per change of the nodes and handed to every stream, instead of each agent's stream
keeping an etcd watch on the nodes and listing every node again after each change (1,000 agents joining:
a million node reads and 1,000 etcd watches).

Peer sets are whole, not deltas: a stream that falls behind skips to the newest set. A cache reload ends
every stream with the StoreError (agents reconnect and get the whole set again). Without a cache (or one
still loading after CACHE_WAIT_S) a stream reads etcd itself (controller.network.peers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from berth.api import dispatcher_pb2 as d
from controller.cache import CACHE_WAIT_S, ClusterCache, take_all
from controller.network import peers, peers_message
from controller.store import Store, StoreError


class _Shared:
    """The current peer set and a future that the next different one resolves (or a failure fails)."""

    def __init__(self) -> None:
        self.message = d.PeersMessage()
        self.changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.subscribers = 0
        self.task: asyncio.Task[None] | None = None


class PeerFeed:
    def __init__(self, store: Store, cache: Callable[[], ClusterCache | None]) -> None:
        self.store = store
        self._cache = cache
        self._shared: _Shared | None = None

    async def subscribe(self) -> AsyncIterator[d.PeersMessage]:
        """The whole peer set now, then again after every change, until the caller stops (or a StoreError)."""
        cache = self._cache()
        if cache is not None and not cache.ready:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cache.wait_ready(), CACHE_WAIT_S)
        shared = self._shared
        if shared is None or shared.task is None or shared.task.done():
            changes = cache.follow_nodes() if cache is not None else None
            if cache is None or changes is None:
                async for msg in peers(self.store):
                    yield msg
                return
            shared = self._shared = _Shared()
            shared.message = peers_message(n for n, _ in cache.nodes.values())  # no await since follow_nodes
            shared.task = asyncio.create_task(self._run(shared, cache, changes))
        shared.subscribers += 1
        try:
            last = shared.message
            yield last
            while True:
                if shared.message is last:  # a set newer than ours may have come while we were away
                    await asyncio.shield(shared.changed)
                    continue
                last = shared.message
                yield last
        finally:
            shared.subscribers -= 1
            if not shared.subscribers and shared.task is not None:
                shared.task.cancel()
                if self._shared is shared:
                    self._shared = None

    @staticmethod
    async def _run(shared: _Shared, cache: ClusterCache, changes: asyncio.Queue[str | BaseException]) -> None:
        try:
            while True:
                await take_all(changes)  # everything already queued makes one set
                message = peers_message(n for n, _ in cache.nodes.values())
                if message != shared.message:
                    shared.message = message
                    done, shared.changed = shared.changed, asyncio.get_running_loop().create_future()
                    done.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every stream ends with it (and reconnects)
            failure = exc if isinstance(exc, StoreError) else StoreError(f"the peers' feed failed: {exc}")
            shared.changed.set_exception(failure)
            shared.changed.exception()  # retrieved: no "never retrieved" warning when nobody waits
        finally:
            cache.unfollow_nodes(changes)
