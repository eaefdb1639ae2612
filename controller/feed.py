"""issue 6 (throughput, session 6): the queue between the cluster cache's watch (or a Reports stream's commits)
and the one task that reads it, without asyncio.Queue's cost per item.

On CPython 3.11 every asyncio.get_running_loop() is a getpid(2), and asyncio.Queue.get makes its waiter through
one each time it waits; put_nowait also counts unfinished tasks and clears an Event per item. A controller
follower (an agent's Assignments stream, the DNS records' feed, a Reports stream's answers) wakes about once per
container. `Feed` is a list and at most one waiting future, made on the loop looked up when the feed was made:
`put_nowait` appends and wakes the reader; the reader takes one item (`get`) or everything queued (`take_all`).
It keeps asyncio.Queue's names for what the followers use (put_nowait, get, get_nowait, empty, qsize), and must
be used on one loop by one reader at a time. A feed made with `want` drops the items it says no to (failures
always go in).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Feed(Generic[T]):
    """Items for one reader, in the order put."""

    __slots__ = ("_items", "_loop", "_waiter", "_want")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None,
                 want: Callable[[Any], bool] | None = None) -> None:  # asked of items, never of failures
        self._items: deque[T] = deque()
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._want = want

    def put_nowait(self, item: T) -> None:
        if self._want is not None and not isinstance(item, BaseException) and not self._want(item):
            return
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def wait(self) -> None:
        """Until something is queued."""
        while not self._items:
            if self._waiter is not None:
                raise RuntimeError("a Feed has one reader at a time")
            self._waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:  # cancelled while waiting: nobody waits any more
                    self._waiter = None

    async def get(self) -> T:
        await self.wait()
        return self._items.popleft()

    async def take_all(self) -> list[T]:
        """Waits for one item, then takes every one queued."""
        await self.wait()
        items = list(self._items)
        self._items.clear()
        return items
