"""The overlay's peers from the cluster cache (controller.peer_feed, issue 6) on a real etcd: every stream gets
the whole set, then a new set after each change of a node's address or subnet (and none for other changes),
all without an etcd watch of their own; the cache stopping ends every stream; without a cache a stream
reads etcd. Streams that ask for deltas get the changes after the first set, merged when they fell behind, the
whole set when they fell behind more than the feed remembers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import pytest

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from controller.cache import ClusterCache
from controller.peer_feed import PeerFeed
from controller.store import Store, StoreError
from tests.controller.conftest import wipe_etcd


def etcd_watchers(url: str) -> int:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("etcd_debugging_mvcc_watcher_total "))


def peer_set(msg: d.PeersMessage) -> list[tuple[str, str, str]]:
    return [(p.node_id, p.address, p.subnet) for p in msg.peers]


def node(name: str, address: str, subnet: str = "") -> t.Node:
    return t.Node(id=name, name=name, address=address, subnet=subnet)


@dataclass
class Fed:
    """A store with node h1, a cache following it, and the streams a test opened (closed at the end)."""

    store: Store
    cache: ClusterCache
    follower: asyncio.Task[None]
    streams: list[AsyncGenerator[d.PeersMessage, None]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def fed(url: str) -> AsyncIterator[Fed]:
    store = Store(url)
    await store.connect()
    cache = ClusterCache(store)
    await store.put_node(node("h1", "192.0.2.1", "10.88.1.0/24"))  # before the cache loads: in its first set
    f = Fed(store, cache, asyncio.create_task(cache.run()))
    try:
        await asyncio.wait_for(cache.wait_ready(), 10)
        yield f
    finally:
        for s in f.streams:
            await s.aclose()
        f.follower.cancel()
        await asyncio.gather(f.follower, return_exceptions=True)
        await wipe_etcd(url)
        await store.close()


async def _feed(url: str) -> None:
    async with fed(url) as f:
        store, cache, follower = f.store, f.cache, f.follower
        deadline = time.monotonic() + 10
        while etcd_watchers(url) < 1:  # the cache's own watch
            assert time.monotonic() < deadline, "the cache's etcd watch never came"
            await asyncio.sleep(0.02)
        watchers = etcd_watchers(url)
        feed = PeerFeed(store, lambda: cache)
        streams = f.streams
        streams += [feed.subscribe() for _ in range(3)]
        for s in streams:
            assert peer_set(await asyncio.wait_for(anext(s), 10)) == [("h1", "192.0.2.1", "10.88.1.0/24")]

        await store.put_node(node("h0", "192.0.2.9"))  # no subnet yet: not a peer, so no new set
        await store.put_node(node("h2", "192.0.2.2", "10.88.2.0/24"))
        for s in streams:
            assert peer_set(await asyncio.wait_for(anext(s), 10)) == [
                ("h1", "192.0.2.1", "10.88.1.0/24"), ("h2", "192.0.2.2", "10.88.2.0/24")]
        assert etcd_watchers(url) == watchers  # three streams, no watch of their own

        # A stream that does not read skips to the newest set instead of queueing every one.
        slow = streams.pop()
        await store.put_node(node("h2", "192.0.2.22", "10.88.2.0/24"))  # moved
        for s in streams:
            assert peer_set(await asyncio.wait_for(anext(s), 10))[1] == ("h2", "192.0.2.22", "10.88.2.0/24")
        await store.delete_node("h1")
        for s in streams:
            assert peer_set(await asyncio.wait_for(anext(s), 10)) == [("h2", "192.0.2.22", "10.88.2.0/24")]
        assert peer_set(await asyncio.wait_for(anext(slow), 10)) == [("h2", "192.0.2.22", "10.88.2.0/24")]
        await slow.aclose()

        # The cache stops: every stream ends with a StoreError (the agents reconnect).
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        for s in streams:
            with pytest.raises(StoreError):
                await asyncio.wait_for(anext(s), 10)
        assert feed._shared is None and cache._node_followers == []

        # Without a cache, a stream reads etcd itself.
        alone = PeerFeed(store, lambda: None).subscribe()
        assert peer_set(await asyncio.wait_for(anext(alone), 10)) == [("h2", "192.0.2.22", "10.88.2.0/24")]
        await alone.aclose()


def test_peer_sets_from_the_cache(etcd_url: str) -> None:
    asyncio.run(_feed(etcd_url))


def apply(held: dict[str, tuple[str, str]], msg: d.PeersMessage) -> dict[str, tuple[str, str]]:
    """What an agent holds after a message (agent.session's rule)."""
    out = dict(held) if msg.delta else {}
    for node_id in msg.removed:
        out.pop(node_id, None)
    out.update((p.node_id, (p.address, p.subnet)) for p in msg.peers)
    return out


async def _deltas(url: str) -> None:
    async with fed(url) as f:
        store, cache = f.store, f.cache
        feed = PeerFeed(store, lambda: cache)
        fast, slow, whole = feed.subscribe(deltas=True), feed.subscribe(deltas=True), feed.subscribe()
        streams = f.streams
        streams += [fast, slow, whole]
        held = {}
        for s in streams:
            first = await asyncio.wait_for(anext(s), 10)
            assert not first.delta and peer_set(first) == [("h1", "192.0.2.1", "10.88.1.0/24")]
            held[s] = apply({}, first)

        async def step(s: AsyncIterator[d.PeersMessage]) -> d.PeersMessage:
            msg = await asyncio.wait_for(anext(s), 10)
            held[s] = apply(held[s], msg)
            return msg

        # A host joins: the delta streams get that host alone, the other the whole set.
        await store.put_node(node("h2", "192.0.2.2", "10.88.2.0/24"))
        msg = await step(fast)
        assert msg.delta and peer_set(msg) == [("h2", "192.0.2.2", "10.88.2.0/24")] and not msg.removed
        msg = await step(whole)
        assert not msg.delta and len(msg.peers) == 2
        # It moves, then another host leaves: one change each.
        await store.put_node(node("h2", "192.0.2.22", "10.88.2.0/24"))
        msg = await step(fast)
        assert msg.delta and peer_set(msg) == [("h2", "192.0.2.22", "10.88.2.0/24")]
        await store.delete_node("h1")
        msg = await step(fast)
        assert msg.delta and not msg.peers and list(msg.removed) == ["h1"]
        await step(whole)
        # The stream that read nothing meanwhile gets every change it missed in one delta.
        msg = await step(slow)
        assert msg.delta and peer_set(msg) == [("h2", "192.0.2.22", "10.88.2.0/24")] and list(msg.removed) == ["h1"]
        want = {"h2": ("192.0.2.22", "10.88.2.0/24")}
        assert held[fast] == held[slow] == held[whole] == want

        # A stream further behind than the feed remembers gets the whole set again.
        assert feed._shared is not None
        feed._shared.history = collections.deque(feed._shared.history, maxlen=2)
        for i in range(3, 6):
            await store.put_node(node(f"h{i}", f"192.0.2.{i}", f"10.88.{i}.0/24"))
            await step(fast)
        msg = await step(slow)
        assert not msg.delta and len(msg.peers) == 4
        want |= {f"h{i}": (f"192.0.2.{i}", f"10.88.{i}.0/24") for i in range(3, 6)}
        assert held[fast] == held[slow] == want


def test_agents_that_ask_get_the_changes_after_the_first_set(etcd_url: str) -> None:
    asyncio.run(_deltas(etcd_url))
