"""What ends a Stop's wait for its container's agent besides the status it waits for (session 7); it waited the stop
timeout + 30 s and failed DEADLINE_EXCEEDED:
- the container's host going down meanwhile. Its lease expired (the lease key deleted), no word comes from its
  agent until the host is back, so Stop answers at once, as it does for a host already down (controller.api Stop:
  the container shows lost, and the host's agent carries the stop out when it is back); once it has read that the
  host is still down: one with a new lease already (a blip) is waited for again, on the same watches (review);
- the container's removal meanwhile (rm -f), when it has no status key (created placed, no report yet: issue 6),
  which the status watch (on status keys) does not see: Stop ends NOT_FOUND, as for one with a status key.
Each is followed by an etcd watch on one key, in place before Stop reads the state it guards (whether the host is
up; the container, which Stop changes), so a change after that read is seen at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from controller.store import NotFound, Store

T = TypeVar("T")


class StopEnds:
    """The watches that end one Stop's wait early. close() it when done."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._host: AsyncGenerator[int, None] | None = None
        self._removal: AsyncGenerator[int, None] | None = None
        self._cid = ""
        # each watch's next value, read across waits (review, session 7: a host back at once is waited on again,
        # and a read cancelled at the end of one wait ended its watch for the next); cancelled by close()
        self._down: asyncio.Future[int] | None = None
        self._removed: asyncio.Future[int] | None = None

    async def follow_removal(self, cid: str) -> None:
        """Watch the container's removal from now on: call it before Stop changes the container."""
        self._removal, self._cid = await _opened(self._store.watch_removal(cid)), cid

    async def follow_host(self, node_id: str) -> None:
        """Watch the host's lease key from now on: call it before reading whether the host is up."""
        self._host = await _opened(self._store.watch_host_down(node_id))

    async def wait(self, awaited: Awaitable[T]) -> T | None:
        """What `awaited` gives, or None when the host went down first (read whether it is up again: a later
        wait ends on its next loss). Raises NotFound when the container was removed first, the watches'
        StoreError (etcd failed) as `awaited` raises its own."""
        waiting = asyncio.ensure_future(awaited)
        if self._host is not None and self._down is None:
            self._down = asyncio.ensure_future(anext(self._host))
        if self._removal is not None and self._removed is None:
            self._removed = asyncio.ensure_future(anext(self._removal))
        down, removed = self._down, self._removed
        try:
            await asyncio.wait([f for f in (waiting, down, removed) if f is not None],
                               return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                return await waiting
            if removed is not None and removed.done():
                removed.result()  # the revision of its removal, or the watch's error
                raise NotFound(f"container {self._cid[:12]} was removed while it was being stopped")
            assert down is not None
            self._down = None  # read: the next wait follows the next deletion
            down.result()  # the revision of the lease key's deletion, or the watch's error
            return None
        finally:
            waiting.cancel()  # nothing to a finished one
            await asyncio.gather(waiting, return_exceptions=True)

    async def close(self) -> None:
        futures = [f for f in (self._down, self._removed) if f is not None]
        for future in futures:
            future.cancel()  # nothing to a finished one
        # each one read, finished ones too: a watch that failed alongside the one that ended the wait (etcd
        # failing fails them all) was reported "Task exception was never retrieved" (review, session 7)
        await asyncio.gather(*futures, return_exceptions=True)
        self._down = self._removed = None
        for watch in (self._host, self._removal):
            if watch is not None:
                await watch.aclose()
        self._host = self._removal = None


async def _opened(watch: AsyncGenerator[int, None]) -> AsyncGenerator[int, None]:
    """The watch, once it is in place (its first value); closed if that fails."""
    try:
        await anext(watch)
    except BaseException:
        await watch.aclose()
        raise
    return watch
