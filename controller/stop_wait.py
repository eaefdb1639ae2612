"""What ends a Stop's wait for its container's agent besides the status it waits for (session 7): the container's
host going down meanwhile. Its lease expired (the lease key deleted), no word comes from its agent until the host
is back, so Stop answers at once, as it does for a host already down (controller.api Stop: the container shows
lost, and the host's agent carries the stop out when it is back); it waited the stop timeout + 30 s and failed
DEADLINE_EXCEEDED. The host is followed by an etcd watch on its lease key, in place before Stop reads whether the
host is up, so an expiry after that read is seen at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from controller.store import Store

T = TypeVar("T")


class StopEnds:
    """The watches that end one Stop's wait early. close() it when done."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._host: AsyncGenerator[int, None] | None = None

    async def follow_host(self, node_id: str) -> None:
        """Watch the host's lease key from now on: call it before reading whether the host is up."""
        watch = self._store.watch_host_down(node_id)
        try:
            await anext(watch)  # in place
        except BaseException:
            await watch.aclose()
            raise
        self._host = watch

    async def wait(self, awaited: Awaitable[T]) -> T | None:
        """What `awaited` gives, or None when the host went down first. Raises the watch's StoreError (etcd
        failed) as `awaited` raises its own."""
        waiting = asyncio.ensure_future(awaited)
        down = asyncio.ensure_future(anext(self._host)) if self._host is not None else None
        try:
            await asyncio.wait([f for f in (waiting, down) if f is not None], return_when=asyncio.FIRST_COMPLETED)
            if waiting.done() or down is None:
                return await waiting
            down.result()  # the revision of the lease key's deletion, or the watch's error
            return None
        finally:
            for future in (waiting, down):
                if future is not None and not future.done():
                    future.cancel()
                    await asyncio.gather(future, return_exceptions=True)

    async def close(self) -> None:
        if self._host is not None:
            await self._host.aclose()
            self._host = None
