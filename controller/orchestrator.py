"""Places containers and moves them through their lifecycle: the one place where the controller writes
placement and desired state to the store.

Every change is decided on a fresh read and committed with a compare on the container's mod_revision
(swarmkit's applySchedulingDecisions); on a conflict the change is re-read and retried, so concurrent API
calls and a second controller can never place one container twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from berth.api import types_pb2 as t
from controller import scheduler
from controller.metrics import ControllerMetrics
from controller.store import Conflict, NotFound, Store, StoreError, Versioned

log = logging.getLogger(__name__)

TERMINAL = (t.STATE_EXITED, t.STATE_FAILED)


def assignment_of(c: t.Container) -> t.Assignment:
    return t.Assignment(
        container_id=c.id, spec=c.spec, desired_state=c.desired_state, generation=c.generation,
        stop_timeout_s=c.stop_timeout_s,
    )


# Restart policies under which a container is moved off a dead host (issue 6).
MOVABLE_POLICIES = ("always", "on-failure", "unless-stopped")
BATCH = 32  # containers per placement transaction: 3 operations each, under etcd's 128
SWEEP_GAP_S = 0.1


def movable(spec: t.ContainerSpec) -> bool:
    """Whether a container may be placed elsewhere when its host dies: it has a restart policy, and no named
    volume (-v NAME:/path, kept on its host) ties it to the host."""
    named = any(not v.split(":", 1)[0].startswith("/") for v in spec.volumes)
    return spec.restart_policy.partition(":")[0] in MOVABLE_POLICIES and not named  # on-failure:N (3a)


class Orchestrator:
    def __init__(self, store: Store, metrics: ControllerMetrics, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._placing = asyncio.Lock()
        self.strategy = "spread"  # the cluster's default: spread or binpack
        self.sample = 0  # fitting hosts looked at per decision; 0: all (set for large clusters)
        self.kick: asyncio.Event | None = None  # set while leading: wakes the leader's sweep
        self._waiting: dict[str, list[asyncio.Future[t.Container]]] = {}  # schedule() calls for the sweep
        self._tries: dict[str, int] = {}
        self._alone: dict[str, list[asyncio.Future[t.Container]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # More of the leader's work, each given the sweep's snapshot (services: controller.services); each
        # returns whether it may have changed containers
        self.reconcilers: list[Callable[[list[Versioned]], Coroutine[Any, Any, bool]]] = []

    async def hosts(self, containers: list[Versioned] | None = None) -> list[scheduler.HostView]:
        """The scheduler's view: nodes with what is already placed on them."""
        nodes = await self.store.list_nodes()
        if containers is None:
            containers = await self.store.list_containers()
        used: dict[str, list[int]] = {}
        ports: dict[str, frozenset[tuple[str, int]]] = {}
        for v in containers:
            c = v.container
            if c.node_id and c.spec.ports:  # issue 5: a placed container holds its host ports until rm
                ports[c.node_id] = ports.get(c.node_id, frozenset()) | scheduler.host_ports(c.spec)
            if c.node_id and c.desired_state == t.DESIRED_RUNNING:
                u = used.setdefault(c.node_id, [0, 0, 0])
                u[0] += c.spec.memory_bytes
                u[1] += c.spec.nano_cpus
                u[2] += 1
        zero = [0, 0, 0]
        return [
            scheduler.HostView(
                n.id, n.name, n.state == t.NODE_READY, n.capacity.memory_bytes, n.capacity.nano_cpus,
                used.get(n.id, zero)[0], used.get(n.id, zero)[1], used.get(n.id, zero)[2],
                labels=tuple(sorted({**n.labels, **n.user_labels}.items())), platform=n.platform,
                schedulable=n.availability == t.AVAILABILITY_ACTIVE,
                ports=ports.get(n.id, frozenset()),
            )
            for n in nodes
        ]

    async def schedule(self, cid: str) -> t.Container:
        """Place one pending container; returns it as stored (placed, or pending with the reason). On the
        leader, the decision joins the next batched sweep (one snapshot for all that wait)."""
        if self.kick is None:
            return await self.schedule_now(cid)
        waiter: asyncio.Future[t.Container] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(cid, []).append(waiter)
        self.kick.set()
        return await waiter

    def _resolve(self, containers: list[Versioned], outcome: dict[str, t.Container]) -> list[str]:
        """Answer the schedule() calls the sweep decided; returns those it did not see (to place alone)."""
        seen = {v.container.id: v.container for v in containers}
        alone = []
        for cid in list(self._waiting):
            c = outcome.get(cid) or seen.get(cid)
            tries = self._tries.get(cid, 0)
            if c is None and tries < 3:  # created after the snapshot: the next sweep sees it
                self._tries[cid] = tries + 1
                continue
            waiters = self._waiting.pop(cid)
            self._tries.pop(cid, None)
            if c is None:
                alone.append(cid)
                self._alone[cid] = waiters
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(c)
        if self._waiting and self.kick is not None:
            self.kick.set()
        return alone

    async def schedule_now(self, cid: str) -> t.Container:
        """Place one pending container at once, on a fresh read."""
        async with self._placing:  # decisions of this controller see each other's allocations
            for _ in range(10):
                v = await self.store.get_container(cid)
                c = v.container
                if c.node_id or c.desired_state != t.DESIRED_RUNNING:
                    return c
                decision = self.decide(c, await self.hosts())
                new = t.Container()
                new.CopyFrom(c)
                status: t.ContainerStatus | None = None
                if decision.host is None:
                    if new.pending_reason == decision.reason:
                        return c
                    new.pending_reason = decision.reason
                    assignment = None
                else:
                    _placed(new, decision.host.id)
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
                return await self.schedule_now(cid)
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

    def decide(self, c: t.Container, hosts: list[scheduler.HostView]) -> scheduler.Decision:
        try:
            demand = scheduler.Demand.of(c.spec)
        except ValueError as exc:
            return scheduler.Decision(None, str(exc))
        strategy = c.spec.placement_strategy or self.strategy  # per container (or service), else the cluster's
        return scheduler.place(c.id, demand, hosts, strategy=strategy, sample=self.sample)

    async def place_pending(self, containers: list[Versioned] | None = None) -> int:
        """One sweep over containers that wait for a host: decided on one snapshot, committed in batched
        transactions with a compare on each container (a batch that loses a race is retried one by one).
        Returns how many were placed."""
        outcome: dict[str, t.Container] = {}
        try:
            return await self._place_pending(containers, outcome)
        finally:
            if self._waiting:
                for cid in self._resolve(containers or [], outcome):
                    self._background(self._place_alone(cid))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _place_alone(self, cid: str) -> None:
        waiters = self._alone.pop(cid, [])
        try:
            c = await self.schedule_now(cid)
        except StoreError as exc:
            for w in waiters:
                if not w.done():
                    w.set_exception(exc)
            return
        for w in waiters:
            if not w.done():
                w.set_result(c)

    async def _place_pending(self, containers: list[Versioned] | None, outcome: dict[str, t.Container]) -> int:
        async with self._placing:
            if containers is None:
                containers = await self.store.list_containers()
            pending = [v for v in containers if not v.container.node_id
                       and v.container.desired_state == t.DESIRED_RUNNING]
            if not pending:
                return 0
            # issue 6: a service's task standing in for one that had no host either goes last, so that a
            # rolling update's successor gets the host (port, memory) its predecessor just freed.
            pending.sort(key=lambda v: v.container.replaces_unplaced)
            hosts = await self.hosts(containers)
            index = {h.id: i for i, h in enumerate(hosts)}
            writes: list[tuple[Versioned, t.Container, t.Assignment, t.ContainerStatus]] = []
            unplaced: list[tuple[Versioned, str]] = []
            for v in pending:
                decision = self.decide(v.container, hosts)
                if decision.host is None:
                    unplaced.append((v, decision.reason))
                    continue
                i = index[decision.host.id]
                hosts[i] = scheduler.with_container(hosts[i], scheduler.Demand.of(v.container.spec))
                new = t.Container()
                new.CopyFrom(v.container)
                _placed(new, decision.host.id)
                writes.append((v, new, assignment_of(new),
                               t.ContainerStatus(state=t.STATE_ASSIGNED, generation=new.generation)))
            placed = 0
            retry: list[str] = []
            batches = [writes[start:start + BATCH] for start in range(0, len(writes), BATCH)]
            # Committed together: etcd folds concurrent transactions into one disk write.
            results = await asyncio.gather(*(self.store.update_containers(b) for b in batches))
            for batch, committed in zip(batches, results, strict=True):
                if committed:
                    placed += len(batch)
                    now = self.clock()
                    for old, placed_c, _, _ in batch:
                        self.metrics.scheduling_latency.observe(max(0.0, now - old.container.created_at_ns / 1e9))
                        outcome[placed_c.id] = placed_c
                else:
                    retry += [old.container.id for old, _, _, _ in batch]
            for v, reason in unplaced:
                if v.container.pending_reason != reason:
                    new = t.Container()
                    new.CopyFrom(v.container)
                    new.pending_reason = reason
                    try:
                        await self.store.update_container(v, new)
                    except Conflict:
                        retry.append(v.container.id)
                        continue
                    outcome[new.id] = new
                else:
                    outcome[v.container.id] = v.container
        for cid in retry:  # lost a race in a batch: decide again on a fresh read, one at a time
            try:
                c = outcome[cid] = await self.schedule_now(cid)
                if c.node_id:
                    placed += 1
            except (NotFound, StoreError) as exc:
                log.warning("placing %s: %s", cid[:12], exc)
        return placed

    async def heal(self, containers: list[Versioned] | None = None) -> int:
        """Move containers off hosts that are down or drained, when they may move (see `movable`); the
        others stay (on a dead host, shown as lost). Returns how many were taken off."""
        nodes = {n.id: n for n in await self.store.list_nodes()}
        if containers is None:
            containers = await self.store.list_containers()
        moved = 0
        for v in containers:
            c = v.container
            node = nodes.get(c.node_id)
            if not c.node_id or c.desired_state != t.DESIRED_RUNNING or not movable(c.spec):
                continue
            draining = node is not None and node.availability == t.AVAILABILITY_DRAIN
            if node is not None and node.state == t.NODE_READY and not draining:
                continue
            try:
                await self.move_off(v, f"its host {c.node_id} is drained" if draining else "")
                moved += 1
            except Conflict:
                continue  # it changed meanwhile; the next sweep looks again
        return moved

    async def move_off(self, v: Versioned, reason: str = "") -> None:
        """Take a container off its host: the host is told to stop its copy (and keep its files), the
        container becomes pending with a new generation, for the next placement."""
        c = v.container
        stale = assignment_of(c)
        stale.desired_state = t.DESIRED_STOPPED
        new = t.Container()
        new.CopyFrom(c)
        if c.node_id not in new.stale_nodes:
            new.stale_nodes.append(c.node_id)
        new.node_id = ""
        new.generation += 1
        new.pending_reason = reason or f"its host {c.node_id} is down; placing it elsewhere"
        status = t.ContainerStatus(state=t.STATE_PENDING, generation=new.generation, message=new.pending_reason)
        await self.store.move_off(v, new, stale, status)
        log.info("container %s moved off %s", c.id[:12], c.node_id)

    async def lead(self, period_s: float = 1.0) -> None:
        """The leader's work: the sweep below, kicked when a host goes down or a container waits."""
        self.kick = asyncio.Event()
        watcher = asyncio.create_task(self._watch_hosts(self.kick))
        try:
            await self.run_leader_loop(self.kick, period_s)
        finally:
            watcher.cancel()
            self.kick = None
            for cid, waiters in self._waiting.items():  # no longer leading: place them alone
                self._alone.setdefault(cid, []).extend(waiters)
                self._background(self._place_alone(cid))
            self._waiting.clear()
            self._tries.clear()

    async def _watch_hosts(self, kick: asyncio.Event) -> None:
        while True:
            try:
                async for _, alive in self.store.watch_alive(await self.store.revision()):
                    if not alive:
                        kick.set()
            except StoreError as exc:
                log.warning("watching hosts: %s", exc)
                kick.set()  # something may have been missed: sweep
                await asyncio.sleep(1)

    async def run_leader_loop(self, kick: asyncio.Event, period_s: float = 1.0) -> None:
        """What the leader runs (issue 6): heal and place pending containers, on one snapshot per round,
        every period or as soon as `kick` is set (a host went down, a container was created)."""
        while True:
            started = time.monotonic()
            try:
                containers = await self.store.list_containers()
                changed = await self.heal(containers)
                for reconcile in self.reconcilers:
                    changed = await reconcile(containers) or changed
                await self.place_pending(await self.store.list_containers() if changed else containers)
            except StoreError as exc:
                log.warning("leader sweep: %s", exc)
            # A sweep reads every container: before the next, rest as long as this one took (at most
            # SWEEP_GAP_S), so that under a stream of Run calls each sweep places many at once instead of the
            # controller sweeping back to back, while a Run on a quiet cluster is placed at once instead of
            # waiting out a fixed gap (0-100 ms of its latency; issue 2).
            await asyncio.sleep(min(SWEEP_GAP_S, time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(kick.wait(), period_s)
            kick.clear()

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


def _placed(c: t.Container, node_id: str) -> None:
    """Mark a container placed on a node; a node it had left (holding a stopped copy) gets it back."""
    c.node_id = node_id
    c.pending_reason = ""
    if node_id in c.stale_nodes:
        c.stale_nodes.remove(node_id)

