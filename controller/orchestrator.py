"""Places containers and moves them through their lifecycle: the one place where the controller writes
placement and desired state to the store.

Every change is decided on a read (of etcd, or of the leader's cluster cache, controller.cache) and committed
with a compare on the container's mod_revision (swarmkit's applySchedulingDecisions); on a conflict the change
is re-read and retried, so concurrent API calls and a second controller can never place one container twice.
A Run group-committed on the leader is created already placed, with a compare that its id and name are new
(`_admit`): created once, so placed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from berth.api import types_pb2 as t
from controller import scheduler
from controller.metrics import ControllerMetrics
from controller.store import Conflict, NotFound, Store, StoreError, Versioned

if TYPE_CHECKING:
    from controller.cache import ClusterCache

log = logging.getLogger(__name__)

TERMINAL = (t.STATE_EXITED, t.STATE_FAILED)
# The reported states on which a --rm container is removed: its end, or created (its agent says it was stopped
# before it started that run; session 6: it stayed created)
RM_ON = (*TERMINAL, t.STATE_CREATED)
W = TypeVar("W")


# Restart policies under which a container is moved off a dead host (issue 6).
MOVABLE_POLICIES = ("always", "on-failure", "unless-stopped")
BATCH = 32  # containers per placement transaction: 2 operations each, under etcd's 128
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops; the controller's --max-txn-ops when etcd allows more
SWEEP_GAP_S = 0.1
# bytes of statuses in one group commit of reports: etcd refuses a request over its --max-request-bytes (1.5 MiB
# by default) whole; REPORT_OVERHEAD_BYTES counts each put's key and its two compares
REPORT_TXN_BYTES = 1 << 20
REPORT_OVERHEAD_BYTES = 160
# bytes of containers in one placement transaction, for the same reason: a spec can be large (environment, labels,
# command), and a transaction over the limit was refused whole at every sweep (session 4's "Known left")
PLACE_TXN_BYTES = 1 << 20
PLACE_OVERHEAD_BYTES = 320  # per container: its keys, compares and a status


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
        # issue 6 (throughput): the watch-fed copy of the cluster (controller.cache), read instead of etcd
        # when set and loaded; Run calls and status reports in flight are committed together.
        self.cache: ClusterCache | None = None
        self.max_txn_ops = MAX_TXN_OPS
        # Run calls waiting for the next admission batch: a call's containers and one future for their outcomes
        self._admissions: list[tuple[list[t.Container], asyncio.Future[list[t.Container | BaseException]]]] = []
        self._admit_wake = asyncio.Event()
        self._admitter: asyncio.Task[None] | None = None
        # issue 6: reports queued for the group commit: (id, status, container's and status's mod_revision, caller)
        self._reports: list[_Queued] = []
        # session 6: the group commit is started with call_soon on the loop looked up once (no task waiting on an
        # Event), a few commits at once (each a task)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_soon = False
        self._committing = 0

    def _cached(self) -> ClusterCache | None:
        return self.cache if self.cache is not None and self.cache.ready else None

    async def hosts(self, containers: list[Versioned] | None = None) -> list[scheduler.HostView]:
        """The scheduler's view: nodes with what is already placed on them."""
        cache = self._cached()
        if cache is not None:
            return cache.hosts()  # its indexes hold what is placed on every host
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
        return [scheduler.host_view(n, n.state == t.NODE_READY, used.get(n.id, (0, 0, 0)), ports.get(n.id, frozenset()))
                for n in nodes]

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
        cache = self._cached()
        alone = []
        for cid in list(self._waiting):
            c = outcome.get(cid) or seen.get(cid)
            if c is None and cache is not None and (cached := cache.container(cid)) is not None and (
                    cached.container.node_id or cached.container.desired_state != t.DESIRED_RUNNING):
                c = cached.container  # placed meanwhile (the sweep's snapshot holds pending containers only)
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
                else:
                    _placed(new, decision.host.id)
                    status = t.ContainerStatus(state=t.STATE_ASSIGNED, generation=new.generation)
                try:
                    await self.store.update_container(v, new, status=status)
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
            status: t.ContainerStatus | None = None
            if desired == t.DESIRED_RUNNING:
                state = t.STATE_ASSIGNED if new.node_id else t.STATE_PENDING
                status = t.ContainerStatus(state=state, generation=new.generation)
            try:
                await self.store.update_container(v, new, status=status)
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
        return self._decide(c, hosts)[0]

    def _decide(self, c: t.Container, hosts: list[scheduler.HostView]
                ) -> tuple[scheduler.Decision, scheduler.Demand | None]:
        """The decision and the container's demand (None when it does not parse), computed once (session 6)."""
        spec = c.spec
        try:
            demand = scheduler.Demand.of(spec)
        except ValueError as exc:
            return scheduler.Decision(None, str(exc)), None
        strategy = spec.placement_strategy or self.strategy  # per container (or service), else the cluster's
        return scheduler.place(c.id, demand, hosts, strategy=strategy, sample=self.sample), demand

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
            cache = self._cached()
            if containers is None:
                if cache is not None:
                    containers = [cache.containers[cid] for cid in cache.pending]
                else:
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
            writes: list[tuple[Versioned, t.Container, t.ContainerStatus]] = []
            unplaced: list[tuple[Versioned, str]] = []
            for v in pending:
                decision, demand = self._decide(v.container, hosts)
                if decision.host is None or demand is None:
                    unplaced.append((v, decision.reason))
                    continue
                i = index[decision.host.id]
                hosts[i] = scheduler.with_container(hosts[i], demand)
                new = t.Container()
                new.CopyFrom(v.container)
                _placed(new, decision.host.id)
                writes.append((v, new, t.ContainerStatus(state=t.STATE_ASSIGNED, generation=new.generation)))
            placed = 0
            retry: list[str] = []
            per = max(1, self.max_txn_ops // 2)  # container, status; and not over etcd's request size
            batches = _cut(writes, per, lambda w: w[1].ByteSize() + w[2].ByteSize())
            # Committed together: etcd folds concurrent transactions into one disk write.
            results = await asyncio.gather(*(self.store.update_containers(b) for b in batches))
            for batch, committed in zip(batches, results, strict=True):
                if committed:
                    placed += len(batch)
                    now = self.clock()
                    for old, placed_c, status in batch:
                        self.metrics.scheduling_latency.observe(max(0.0, now - old.container.created_at_ns / 1e9))
                        outcome[placed_c.id] = placed_c
                        if cache is not None:
                            cache.put_container(placed_c, committed)
                            cache.put_status(placed_c.id, status, committed)
                else:
                    retry += [old.container.id for old, _, _ in batch]
            for v, reason in unplaced:
                if v.container.pending_reason != reason:
                    new = t.Container()
                    new.CopyFrom(v.container)
                    new.pending_reason = reason
                    try:
                        revision = await self.store.update_container(v, new)
                    except Conflict:
                        retry.append(v.container.id)
                        continue
                    if cache is not None:
                        cache.put_container(new, revision)
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
        cache = self._cached()
        if cache is not None and containers is None:
            return await self._move_off_hosts(_cached_on_hosts(cache))
        nodes = {n.id: n for n in await self.store.list_nodes()}
        if containers is None:
            containers = await self.store.list_containers()

        def on_host(v: Versioned) -> tuple[Versioned, t.Node | None, bool]:
            node = nodes.get(v.container.node_id)
            return v, node, node is not None and node.state == t.NODE_READY

        return await self._move_off_hosts(on_host(v) for v in containers if v.container.node_id)

    async def _move_off_hosts(self, placed: Iterable[tuple[Versioned, t.Node | None, bool]]) -> int:
        """heal()'s one rule over (container, its host or None, whether the host is alive): a container that
        should run and may move leaves a host that is gone, down or drained."""
        moved = 0
        for v, node, alive in placed:
            c = v.container
            if c.desired_state != t.DESIRED_RUNNING or not movable(c.spec):
                continue
            draining = node is not None and node.availability == t.AVAILABILITY_DRAIN
            if node is not None and alive and not draining:
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
        new = t.Container()
        new.CopyFrom(c)
        if c.node_id not in new.stale_nodes:
            new.stale_nodes.append(c.node_id)
        new.node_id = ""
        new.generation += 1
        new.pending_reason = reason or f"its host {c.node_id} is down; placing it elsewhere"
        status = t.ContainerStatus(state=t.STATE_PENDING, generation=new.generation, message=new.pending_reason)
        revision = await self.store.move_off(v, new, status)
        if self.cache is not None:
            self.cache.put_container(new, revision)
            self.cache.put_status(new.id, status, revision)
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
                cache = self._cached()
                if cache is not None:  # issue 6: the sweep reads the cache's indexes, not every container
                    moved = await self.heal() > 0
                    services = cache.with_status(cache.of_services) if self.reconcilers else []
                    for reconcile in self.reconcilers:
                        moved = await reconcile(services) or moved
                    if moved:  # place what they made in this sweep: wait for the watch to bring it
                        await cache.caught_up(await self.store.revision())
                    await self.place_pending()
                else:
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
        """Record an agent's report. Stale reports (an older run, or not newer than the status held for its
        run: `_superseded`) are dropped; a finished --rm container is removed. Returns whether the report was
        recorded. The write compares the container's revision with the one whose generation was checked, and
        the status's with the one whose order was checked (as on_statuses does), so a report that turns stale
        meanwhile (a new run, a move off its host, a newer status of the run) never overwrites the newer one."""
        for _ in range(10):
            try:
                v = await self.store.get_container(cid)
            except NotFound:
                return False
            c = v.container
            if _stale(status, c):
                return False
            held, held_revision = await self.store.held_status(cid)
            if _superseded(status, held):
                return False
            if await self.store.put_status(cid, status, v.mod_revision, held_revision):
                break
        else:
            raise Conflict(f"container {cid[:12]} kept changing while its status was recorded; report it again")
        if c.spec.auto_remove and status.state in RM_ON:
            await self.remove(cid)
        return True

    # ---- issue 6 (throughput): Run calls and status reports in flight, committed together ------------

    async def create_and_place(self, c: t.Container) -> t.Container:
        """Store a new container and place it; returns it as stored (placed, or pending with the reason).
        Raises NameInUse. On the leader with its cache loaded, the Run calls in flight are group-committed:
        each is decided on the cache's host views, then one transaction creates the batch already placed
        (names, containers, statuses; a node's assignment is the container key; a compare on each name and id),
        see _admit."""
        if self.kick is None or self._cached() is None:
            await self.store.create_container(c)
            return await self.schedule(c.id)
        [outcome] = await self._admission([c])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def create_and_place_many(self, cs: list[t.Container]) -> list[t.Container | BaseException]:
        """create_and_place for several containers at once (a RunStream message's requests, session 5): on the
        leader with its cache loaded they join the admission batch together, with no task each; each outcome
        is the container as stored or its error (NameInUse, StoreError)."""
        if self.kick is None or self._cached() is None:
            return await asyncio.gather(*(self.create_and_place(c) for c in cs), return_exceptions=True)
        try:
            return await self._admission(cs)
        except Exception as exc:  # noqa: BLE001 - the batch failed: each container's outcome
            return [exc] * len(cs)

    def _admission(self, cs: list[t.Container]) -> asyncio.Future[list[t.Container | BaseException]]:
        """Queue a call's containers for the next admission batch: one future for all their outcomes, in order
        (session 6: not one per container)."""
        future: asyncio.Future[list[t.Container | BaseException]] = asyncio.get_running_loop().create_future()
        self._admissions.append((cs, future))
        if self._admitter is None or self._admitter.done():
            self._admitter = asyncio.create_task(self._admit_loop())
        self._admit_wake.set()
        return future

    async def _admit_loop(self) -> None:
        while True:
            await self._admit_wake.wait()
            self._admit_wake.clear()
            while self._admissions:
                batch, self._admissions = self._admissions, []
                try:
                    await self._admit(batch)
                except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)

    async def _admit(self, batch: list[tuple[list[t.Container], asyncio.Future[list[t.Container | BaseException]]]]
                     ) -> None:
        """Create a batch of Run calls already placed: each decided on the cache's view of the hosts, then
        stored with its name in the transaction that creates it (a compare on each name and id: created once,
        so placed once), instead of created pending and written again by a placement (2 puts of the container
        and its status, and a compare, fewer per container). It has no status key until its agent's first
        report (issue 6): its status is what the container implies (store.implied_status)."""
        items: list[tuple[t.Container, bytes]] = []  # no status key: implied by the container until its first report
        names: set[str] = set()
        outcome: dict[str, t.Container] = {}
        async with self._placing:  # this controller's decisions see each other's allocations
            cache = self._cached()
            hosts = cache.hosts() if cache is not None else await self.hosts()
            index = cache.host_index() if cache is not None else {h.id: i for i, h in enumerate(hosts)}
            for c in (c for cs, _ in batch for c in cs):
                name = c.spec.name
                if name in names:  # etcd refuses a transaction that puts one key twice: this one alone
                    continue
                names.add(name)
                decision, demand = self._decide(c, hosts)
                if decision.host is None or demand is None:
                    c.pending_reason = decision.reason
                else:
                    i = index[decision.host.id]
                    hosts[i] = scheduler.with_container(hosts[i], demand)
                    _placed(c, decision.host.id)
                items.append((c, c.SerializeToString()))  # serialized once: its size and its value
            # 2 puts each (name, container: its assignment, its status implied), up to 3 compares (name, id, an
            # open user network): etcd bounds each list by --max-txn-ops
            per = max(1, self.max_txn_ops // 3)
            chunks = _cut(items, per, lambda item: len(item[1]))  # and not over etcd's request size
            revisions = await asyncio.gather(*(self.store.create_placed([c for c, _ in chunk], [v for _, v in chunk])
                                               for chunk in chunks),
                                             return_exceptions=True)
            now = self.clock()
            for written, revision in zip(chunks, revisions, strict=True):
                chunk = [c for c, _ in written]
                if isinstance(revision, BaseException) or not revision:
                    for c in chunk:  # a name in use (or etcd failed): one by one, to tell which
                        c.node_id = c.pending_reason = ""
                    continue
                for c in chunk:
                    outcome[c.id] = c
                    if c.node_id:
                        self.metrics.scheduling_latency.observe(max(0.0, now - c.created_at_ns / 1e9))
                    if self.cache is not None:
                        self.cache.put_container(c, revision)
        for cs, future in batch:
            if future.done():
                continue
            if all(c.id in outcome for c in cs):
                future.set_result([outcome[c.id] for c in cs])
            else:
                self._background(self._admit_alone(cs, outcome, future))

    async def _admit_alone(self, cs: list[t.Container], outcome: dict[str, t.Container],
                           future: asyncio.Future[list[t.Container | BaseException]]) -> None:
        """A call's containers that could not be created with their batch (a name in use, twice in the batch, or
        etcd failed): each created and placed alone, so that the error is its own; the call's outcomes are
        given once all are known (those of the batch as they were)."""
        async def alone(c: t.Container) -> t.Container:
            await self.store.create_container(c)
            return await self.schedule(c.id)

        results = iter(await asyncio.gather(*(alone(c) for c in cs if c.id not in outcome), return_exceptions=True))
        if not future.done():
            future.set_result([outcome[c.id] if c.id in outcome else next(results) for c in cs])

    async def on_statuses(self, updates: list[tuple[str, t.ContainerStatus]]) -> None:
        """Record a report's statuses: record_statuses, waited for."""
        await self.record_statuses(updates)

    def record_statuses(self, updates: list[tuple[str, t.ContainerStatus]]) -> asyncio.Future[None]:
        """Record a report's statuses (as on_status); the future is done once all are recorded, or with the
        first failure. With the cache loaded, the generation is checked on the cached container and the
        statuses of every report in flight are written together, one transaction comparing each container's
        revision with the one checked; one that changed meanwhile is redone alone on a fresh read. Cancel the
        future when its caller is gone: what it queued and is not in a transaction yet is not written.
        session 6: one future per call (not one per status), and no task when every container is cached."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        call = _Recording(loop.create_future())
        cache = self._cached()
        if cache is None or any(cache.containers.get(cid) is None for cid, _ in updates):
            task = loop.create_task(self._record_slowly(updates, call))  # some need a read of etcd, in turn
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            call.future.add_done_callback(lambda future: task.cancel() if future.cancelled() else None)
            return call.future
        queued = False
        for cid, status in updates:
            queued = self._queue_report(cache, cid, status, call) or queued
        if queued:
            self._flush_later(loop)
        call.done_one()  # queuing is over: done once the last queued is recorded (now when none was)
        return call.future

    def _queue_report(self, cache: ClusterCache, cid: str, status: t.ContainerStatus, call: _Recording) -> bool:
        """Queue a cached container's report for the group commit unless it is stale or superseded (dropped:
        False)."""
        v = cache.containers[cid]
        # issue 6: no status held is a container created placed, before its first report: the write compares
        # that it still has none (revision 0); a status the cache has not seen yet fails that compare, and the
        # report is redone alone on a fresh read
        held, held_revision = cache.statuses.get(cid) or (None, 0)
        if _stale(status, v.container) or _superseded(status, held):
            return False
        call.left += 1
        self._reports.append((cid, status, v.mod_revision, held_revision, call))
        return True

    async def _record_slowly(self, updates: list[tuple[str, t.ContainerStatus]], call: _Recording) -> None:
        """record_statuses when some container is not cached (not seen yet, or gone; or no cache): those are
        recorded alone on a read of etcd, in turn; the others join the group commit."""
        queued = False
        try:
            for cid, status in updates:
                cache = self._cached()
                if cache is None or cache.containers.get(cid) is None:
                    await self.on_status(cid, status)
                else:
                    queued = self._queue_report(cache, cid, status, call) or queued
        except Exception as exc:  # noqa: BLE001 - handed to the caller; as when it is gone (below), what it queued
            call.dropped = True     # is not written
            call.fail(exc)
            return
        except BaseException:  # the caller gone while one was recorded alone
            call.dropped = True
            raise
        if queued and self._loop is not None:
            self._flush_later(self._loop)
        call.done_one()

    def _flush_later(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush_reports)

    def _flush_reports(self) -> None:
        """Start group commits of the reports queued, a few at once (etcd folds them into one disk write); the
        rest go when one of those is done."""
        self._flush_soon = False
        loop = self._loop
        assert loop is not None
        while self._reports and self._committing < 4:
            # up to 2 compares a report (its container's and its status's revisions): etcd bounds them by
            # --max-txn-ops as it does the puts
            cut = _reports_that_fit(self._reports, max(1, self.max_txn_ops // 2))
            batch, self._reports = self._reports[:cut], self._reports[cut:]
            # issue 6: a report whose caller is gone (its agent's Reports stream ended) is not written: the agent
            # sends it again, maybe to another controller, and a late write here could undo a newer one
            batch = [report for report in batch if not report[4].gone]
            if not batch:
                continue
            self._committing += 1
            task = loop.create_task(self._commit_reports(batch))
            self._tasks.add(task)
            task.add_done_callback(self._committed)

    def _committed(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._committing -= 1
        if self._reports and not self._flush_soon:
            self._flush_reports()

    async def _commit_reports(self, batch: list[_Queued]) -> None:
        # one put per key in a transaction: a container's latest report (its newest by the agent's order, issue 6:
        # two sessions of one agent can queue them out of order), compared with what the first followed
        first: dict[str, int] = {}
        latest: dict[str, tuple[str, t.ContainerStatus, int, int | None]] = {}
        for cid, status, mod, held, _ in batch:
            first.setdefault(cid, held)
            kept = latest.get(cid)
            if kept is None or not _superseded(status, kept[1]):
                latest[cid] = (cid, status, mod, first[cid])
        items: list[tuple[str, t.ContainerStatus, int, int | None]] = list(latest.values())
        try:
            revision = await self.store.put_statuses(items)
        except Exception as exc:  # noqa: BLE001 - every report of the batch gets it (none waits for ever)
            for *_, call in batch:
                call.fail(exc)
            return
        if not revision:  # one changed since checked: each alone, on a fresh read
            for cid, status, _, _, call in batch:
                if call.gone:  # its caller is gone (as in _flush_reports)
                    continue
                try:
                    await self.on_status(cid, status)
                except Exception as exc:  # noqa: BLE001 - handed to that report's caller
                    call.fail(exc)
                    continue
                call.done_one()
            return
        for cid, status, _, _ in items:
            if self.cache is not None:
                self.cache.put_status(cid, status, revision)
                v = self.cache.container(cid)
                if v is not None and v.container.spec.auto_remove and status.state in RM_ON:
                    self._background(self._remove_quietly(cid))
        for *_, call in batch:
            call.done_one()

    async def _remove_quietly(self, cid: str) -> None:
        try:
            await self.remove(cid)
        except StoreError as exc:
            log.warning("removing %s (--rm): %s", cid[:12], exc)


class _Recording:
    """One record_statuses call (session 6): the future its caller waits on, done once every report it queued
    for the group commit is recorded (`left` counts them, and one more while it queues), or with the first
    failure; `gone` once its caller is (the future cancelled) or it failed while queuing."""

    __slots__ = ("dropped", "future", "left")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.left = 1
        self.dropped = False

    @property
    def gone(self) -> bool:
        return self.dropped or self.future.cancelled()

    def done_one(self) -> None:
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


# a report queued for the group commit: container id, status, container's and status's mod_revision, its call
_Queued = tuple[str, t.ContainerStatus, int, int, _Recording]


def _reports_that_fit(reports: list[_Queued], most: int) -> int:
    """How many of the queued reports go in the next group commit: at most `most` (etcd's --max-txn-ops over the
    compares per report), and not more bytes than one etcd request takes (REPORT_TXN_BYTES, under its
    --max-request-bytes): a status with a health check's log is up to ~20 KiB, and a transaction over the limit
    is refused whole (at least one goes, whatever its size)."""
    size = 0
    for i, (cid, status, *_) in enumerate(reports[:most]):
        size += status.ByteSize() + len(cid) + REPORT_OVERHEAD_BYTES
        if size > REPORT_TXN_BYTES and i:
            return i
    return min(len(reports), most)


def _cut(items: list[W], most: int, size: Callable[[W], int]) -> list[list[W]]:
    """Placement writes in transactions of at most `most` items (etcd's --max-txn-ops over the operations per
    item) and at most PLACE_TXN_BYTES (under its --max-request-bytes, which refuses a bigger request whole; at
    least one item in each, whatever its size), in order."""
    chunks: list[list[W]] = []
    chunk: list[W] = []
    used = 0
    for item in items:
        bytes_ = size(item) + PLACE_OVERHEAD_BYTES
        if chunk and (len(chunk) >= most or used + bytes_ > PLACE_TXN_BYTES):
            chunks.append(chunk)
            chunk, used = [], 0
        chunk.append(item)
        used += bytes_
    if chunk:
        chunks.append(chunk)
    return chunks


def _stale(status: t.ContainerStatus, c: t.Container) -> bool:
    """Whether an agent's report is of an older run than the stored container's (a run since started, or the
    container moved off that host: both bump the generation); such a report is dropped."""
    return status.generation < c.generation


def _superseded(status: t.ContainerStatus, held: t.ContainerStatus | None) -> bool:
    """Whether an agent's report is not newer than `held` (the status stored, or another report) by the agent's
    order (issue 6): of an older run, or of the same run with a seq not greater. The controller's statuses
    (pending, assigned: each the first of its run, written before any agent has it) and agents that do not
    number theirs have seq 0, which neither refuses nor is refused. Such a report is dropped (acknowledged: the
    agent has reported something newer since, which is, or will be, recorded instead)."""
    if held is None or not status.seq or not held.seq:
        return False
    return (held.generation, held.seq) >= (status.generation, status.seq)


def _placed(c: t.Container, node_id: str) -> None:
    """Mark a container placed on a node; a node it had left (holding a stopped copy) gets it back."""
    c.node_id = node_id
    c.pending_reason = ""
    if node_id in c.stale_nodes:
        c.stale_nodes.remove(node_id)


def _cached_on_hosts(cache: ClusterCache) -> Iterator[tuple[Versioned, t.Node | None, bool]]:
    """The cache's containers of hosts that are not alive or are drained (the others are skipped whole), for
    heal(); copies of the indexes are iterated, as moving a container changes them. A host that is alive, known
    and not drained is skipped on the cache's sets alone (session 6: every sweep looks at every host)."""
    live, nodes, drained = cache.alive, cache.nodes, cache.drained
    for node_id, cids in [(n, cids) for n, cids in cache.on_node.items()
                          if n not in live or n in drained or n not in nodes]:
        entry = nodes.get(node_id)
        node = entry[0] if entry is not None else None
        alive = node_id in live
        if node is not None and alive and node.availability != t.AVAILABILITY_DRAIN:
            continue
        for cid in list(cids):
            v = cache.containers.get(cid)
            if v is not None:
                yield v, node, alive
