"""issue 6 (throughput): what the agent's hot path asks of asyncio without asyncio's per-call getpid(2).

On Python 3.11 every asyncio.get_running_loop() (asyncio.Event.wait, asyncio.create_task, a Future made
through the running loop) calls getpid(2) to check the loop's process; a syscall costs more than the Python
around it, and the agent did four of them per container started (bench/schedule.py's hollow agents). Here
the loop is looked up once and kept: `Wake` is an asyncio.Event for one waiter at a time, `LoopRef` hands out
futures and tasks of the loop it was first used on. Both must only be used on one loop (an agent has one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopRef:
    """The running loop, looked up at first use and kept."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def create_future(self) -> asyncio.Future[Any]:
        return self.loop.create_future()

    def create_task(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        return self.loop.create_task(coro)


class Wake:
    """A flag a task waits for, as asyncio.Event (set, clear, is_set, wait), for one waiter at a time."""

    def __init__(self, loop: LoopRef | None = None) -> None:
        self._loop = loop or LoopRef()
        self._value = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        self._value = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> None:
        if self._value:
            return
        if self._waiter is not None:
            raise RuntimeError("a Wake has one waiter at a time")
        self._waiter = waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
