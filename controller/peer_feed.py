"""The overlay's peers for every agent's Peers stream, from the controller's cluster cache (issue 6): the peer
set is computed once per change of the nodes and handed to every stream, instead of each agent's stream
keeping an etcd watch on the nodes and listing every node again after each change (1,000 agents joining:
a million node reads and 1,000 etcd watches).

A stream's first message is the whole set. After that, a stream whose agent asked for deltas (every agent since
this change) gets only the peers that changed since the set it was last sent, and the ids of those gone; others
get the whole set again. With whole sets, 1,000 hosts joining one by one sent each of them every set: ~n^3/3
peers, ~15 GB on the wire. A stream that falls behind skips to the newest state: its next message merges every
change it missed (or is the whole set if it missed more than the feed remembers, HISTORY versions). A cache
reload ends every stream with the StoreError (agents reconnect and get the whole set again). Without a cache (or
one still loading after CACHE_WAIT_S) a stream reads etcd itself and sends whole sets (controller.network.peers).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable

from berth.api import dispatcher_pb2 as d
from controller.cache import CACHE_WAIT_S, ClusterCache, take_all
from controller.feed import Feed
from controller.network import peers
from controller.store import Store, StoreError

HISTORY = 1024  # versions of the peer set whose changes are remembered for streams that are behind

Peer = tuple[str, str]  # a host's address and its containers' subnet


class _Shared:
    """The current peer set at a version, the node ids that each recent version changed, and a future that the
    next version resolves (or a failure fails)."""

    def __init__(self, peers: dict[str, Peer]) -> None:
        self.peers = peers
        self.version = 0
        self.history: collections.deque[tuple[int, frozenset[str]]] = collections.deque(maxlen=HISTORY)
        self.changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.subscribers = 0
        self.task: asyncio.Task[None] | None = None
        self._whole: tuple[int, d.PeersMessage] | None = None

    def update(self, peers: dict[str, Peer]) -> None:
        """Make `peers` the current set; a new version (and a wake-up) only if it differs."""
        changed = frozenset(k for k in self.peers.keys() | peers.keys() if self.peers.get(k) != peers.get(k))
        if not changed:
            return
        self.peers = peers
        self.version += 1
        self.history.append((self.version, changed))
        done, self.changed = self.changed, asyncio.get_running_loop().create_future()
        done.set_result(None)

    def whole(self) -> d.PeersMessage:
        """The whole set at the current version (built once per version)."""
        if self._whole is None or self._whole[0] != self.version:
            self._whole = (self.version, d.PeersMessage(peers=[
                d.NetworkPeer(node_id=k, address=a, subnet=s) for k, (a, s) in sorted(self.peers.items())]))
        return self._whole[1]

    def since(self, version: int) -> d.PeersMessage:
        """What changed after `version`, as a delta; the whole set if the history no longer reaches back."""
        if not self.history or self.history[0][0] > version + 1:
            return self.whole()
        ids: set[str] = set()
        for v, changed in reversed(self.history):
            if v <= version:
                break
            ids |= changed
        present = sorted(k for k in ids if k in self.peers)
        return d.PeersMessage(delta=True, removed=sorted(ids.difference(present)), peers=[
            d.NetworkPeer(node_id=k, address=self.peers[k][0], subnet=self.peers[k][1]) for k in present])


def _peer_set(cache: ClusterCache) -> dict[str, Peer]:
    return {n.id: (n.address, n.subnet) for n, _ in cache.nodes.values() if n.subnet}


class PeerFeed:
    def __init__(self, store: Store, cache: Callable[[], ClusterCache | None]) -> None:
        self.store = store
        self._cache = cache
        self._shared: _Shared | None = None

    async def subscribe(self, deltas: bool = False) -> AsyncIterator[d.PeersMessage]:
        """The whole peer set now, then after every change the changes (`deltas`) or the whole set again, until
        the caller stops (or a StoreError)."""
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
            shared = self._shared = _Shared(_peer_set(cache))  # no await since follow_nodes
            shared.task = asyncio.create_task(self._run(shared, cache, changes))
        shared.subscribers += 1
        try:
            last = shared.version
            yield shared.whole()
            while True:
                if shared.version == last:  # a version newer than ours may have come while we were away
                    await asyncio.shield(shared.changed)
                    continue
                message = shared.since(last) if deltas else shared.whole()
                last = shared.version
                yield message
        finally:
            shared.subscribers -= 1
            if not shared.subscribers and shared.task is not None:
                shared.task.cancel()
                if self._shared is shared:
                    self._shared = None

    @staticmethod
    async def _run(shared: _Shared, cache: ClusterCache, changes: Feed[str | BaseException]) -> None:
        try:
            while True:
                await take_all(changes)  # everything already queued makes one set
                shared.update(_peer_set(cache))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every stream ends with it (and reconnects)
            failure = exc if isinstance(exc, StoreError) else StoreError(f"the peers' feed failed: {exc}")
            shared.changed.set_exception(failure)
            shared.changed.exception()  # retrieved: no "never retrieved" warning when nobody waits
        finally:
            cache.unfollow_nodes(changes)
