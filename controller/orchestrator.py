"""Places containers and moves them through their lifecycle: the one place where the controller writes
placement and desired state to the store.

Every change is decided on a fresh read and committed with a compare on the container's mod_revision
(swarmkit's applySchedulingDecisions); on a conflict the change is re-read and retried, so concurrent API
calls and a second controller can never place one container twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from berth.api import types_pb2 as t
from controller import scheduler
from controller.metrics import ControllerMetrics
from controller.store import Conflict, NotFound, Store, StoreError

log = logging.getLogger(__name__)

TERMINAL = (t.STATE_EXITED, t.STATE_FAILED)


def assignment_of(c: t.Container) -> t.Assignment:
    return t.Assignment(
        container_id=c.id, spec=c.spec, desired_state=c.desired_state, generation=c.generation,
        stop_timeout_s=c.stop_timeout_s,
    )


class Orchestrator:
    def __init__(self, store: Store, metrics: ControllerMetrics, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._placing = asyncio.Lock()

    async def hosts(self) -> list[scheduler.HostView]:
        """The scheduler's view: nodes with what is already placed on them."""
        nodes = await self.store.list_nodes()
        containers = await self.store.list_containers()
        used: dict[str, list[int]] = {}
        for v in containers:
            c = v.container
            if c.node_id and c.desired_state == t.DESIRED_RUNNING:
                u = used.setdefault(c.node_id, [0, 0, 0])
                u[0] += c.spec.memory_bytes
                u[1] += c.spec.nano_cpus
                u[2] += 1
        return [
            scheduler.HostView(
                n.id, n.name, n.state == t.NODE_READY, n.capacity.memory_bytes, n.capacity.nano_cpus,
                *used.get(n.id, [0, 0, 0]),
            )
            for n in nodes
        ]

    async def schedule(self, cid: str) -> t.Container:
        """Place one pending container; returns it as stored (placed, or pending with the reason)."""
        async with self._placing:  # decisions of this controller see each other's allocations
            for _ in range(10):
                v = await self.store.get_container(cid)
                c = v.container
                if c.node_id or c.desired_state != t.DESIRED_RUNNING:
                    return c
                decision = scheduler.place(c.id, scheduler.Demand.of(c.spec), await self.hosts())
                new = t.Container()
                new.CopyFrom(c)
                status: t.ContainerStatus | None = None
                if decision.host is None:
                    if new.pending_reason == decision.reason:
                        return c
                    new.pending_reason = decision.reason
                    assignment = None
                else:
                    new.node_id = decision.host.id
                    new.pending_reason = ""
                    assignment = assignment_of(new)
                    status = t.ContainerStatus(state=t.STATE_ASSIGNED, generation=new.generation)
                try:
                    await self.store.update_container(v, new, assignment=assignment, status=status)
                except Conflict:
                    continue
                if decision.host is not None:
                    self.metrics.scheduling_latency.observe(max(0.0, self.clock() - c.created_at_ns / 1e9))
                return new
        raise StoreError(f"container {cid[:12]} kept changing while being placed; try again")

    async def set_desired(self, cid: str, desired: int, stop_timeout_s: float | None = None) -> t.Container:
        """Ask the container's host to run or stop it. Starting bumps the generation (a new run)."""
        for _ in range(10):
            v = await self.store.get_container(cid)
            new = t.Container()
            new.CopyFrom(v.container)
            if desired == t.DESIRED_RUNNING:
                current, _ = await self.store.get_status(cid)
                if new.desired_state == t.DESIRED_RUNNING and current.state not in TERMINAL:
                    return new  # already running or on its way
                new.generation += 1
            elif new.desired_state == desired:
                return new
            new.desired_state = desired  # type: ignore[assignment]
            if stop_timeout_s is not None:
                new.stop_timeout_s = stop_timeout_s
            assignment = assignment_of(new) if new.node_id else None
            status: t.ContainerStatus | None = None
            if desired == t.DESIRED_RUNNING:
                state = t.STATE_ASSIGNED if new.node_id else t.STATE_PENDING
                status = t.ContainerStatus(state=state, generation=new.generation)
            try:
                await self.store.update_container(v, new, assignment=assignment, status=status)
            except Conflict:
                continue
            if desired == t.DESIRED_RUNNING and not new.node_id:
                return await self.schedule(cid)
            return new
        raise StoreError(f"container {cid[:12]} kept changing; try again")

    async def remove(self, cid: str) -> None:
        for _ in range(10):
            try:
                v = await self.store.get_container(cid)
                await self.store.delete_container(v)
                return
            except NotFound:
                return
            except Conflict:
                continue
        raise StoreError(f"container {cid[:12]} kept changing while being removed; try again")

    async def place_pending(self) -> None:
        """One sweep over containers that wait for a host."""
        for v in await self.store.list_containers():
            c = v.container
            if not c.node_id and c.desired_state == t.DESIRED_RUNNING:
                try:
                    await self.schedule(c.id)
                except (NotFound, StoreError) as exc:
                    log.warning("placing %s: %s", c.id[:12], exc)

    async def run_pending_loop(self, period_s: float = 1.0) -> None:
        while True:
            try:
                await self.place_pending()
            except StoreError as exc:
                log.warning("pending sweep: %s", exc)
            await asyncio.sleep(period_s)

    async def on_status(self, cid: str, status: t.ContainerStatus) -> bool:
        """Record an agent's report. Stale reports (an older run) are dropped; a finished --rm container
        is removed. Returns whether the report was recorded."""
        try:
            v = await self.store.get_container(cid)
        except NotFound:
            return False
        c = v.container
        if status.generation < c.generation:
            return False
        if not await self.store.put_status(cid, status):
            return False
        if c.spec.auto_remove and status.state in TERMINAL:
            await self.remove(cid)
        return True

