"""Leader election among controllers: one etcd lease and the key /berth/leader (issue 6).

Every controller serves the API and agent sessions; only the leader runs the loops that decide on their
own (healing, the pending sweep). A controller campaigns by putting /berth/leader under its own lease if the
key is absent; the winner keeps its lease alive every TTL/3. When the leader dies its lease expires, etcd
deletes the key, and the next campaign (every TTL/4 on each follower) wins: scheduling stops for at most
one TTL. A leader that cannot refresh its lease before the TTL runs out steps down by itself; while it
does not know yet, its writes are still safe, because every placement compares the container's revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from controller.store import Store, StoreError

log = logging.getLogger(__name__)

LeaderWork = Callable[[], Coroutine[Any, Any, None]]


class Leadership:
    def __init__(self, store: Store, identity: str, ttl_s: int, work: LeaderWork,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 2:
            raise ValueError("the leader lease TTL must be at least 2 seconds")
        self.store = store
        self.identity = identity
        self.ttl_s = ttl_s
        self.work = work
        self.clock = clock
        self.is_leader = False
        self.leader = ""  # the last leader seen
        self.elected = asyncio.Event()

    async def run(self) -> None:
        """Campaign until elected, lead until the lease is lost, and again, forever."""
        while True:
            try:
                lease = await self.store.grant_lease(self.ttl_s)
                granted = self.clock()
                while True:
                    self.leader = await self.store.campaign(self.identity, lease)
                    if self.leader == self.identity:
                        break
                    await asyncio.sleep(self.ttl_s / 4)
                    if self.clock() - granted > self.ttl_s / 2:  # keep our unused lease fresh meanwhile
                        if await self.store.refresh_lease(lease) <= 0:
                            lease = await self.store.grant_lease(self.ttl_s)
                        granted = self.clock()
                await self._lead(lease, granted)
            except StoreError as exc:
                log.warning("leader election: %s", exc)
                await asyncio.sleep(self.ttl_s / 4)
            except Exception:
                log.exception("the leader's work failed; campaigning again")
                await asyncio.sleep(self.ttl_s / 4)

    async def _lead(self, lease: int, granted: float) -> None:
        log.info("controller %s is the leader", self.identity)
        self.is_leader = True
        self.elected.set()
        work = asyncio.create_task(self.work())
        refreshed = granted
        try:
            while not work.done():
                await asyncio.sleep(self.ttl_s / 3)
                try:
                    ttl = await self.store.refresh_lease(lease)
                except StoreError as exc:
                    if self.clock() - refreshed < self.ttl_s - 0.5:
                        log.warning("refreshing the leader lease: %s", exc)
                        continue
                    raise
                if ttl <= 0:
                    raise StoreError("the leader lease expired")
                refreshed = self.clock()
            work.result()  # the work never ends by itself; if it did, say why
        finally:
            log.warning("controller %s steps down", self.identity)
            self.is_leader = False
            self.elected.clear()
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            with contextlib.suppress(StoreError):
                await self.store.revoke_lease(lease)

    async def resign(self) -> None:
        """Step down at shutdown so another controller takes over at once instead of after the TTL."""
        if self.is_leader:
            with contextlib.suppress(StoreError):
                await self.store.resign(self.identity)
