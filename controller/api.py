"""The control API servicer (berthctl -> controller). Validates requests, turns them into orchestrator
calls, and translates store errors into gRPC status codes with messages meant for a user.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple, NoReturn, TypeVar, cast

import grpc
import grpc.aio
from prometheus_client import Gauge

from berth import healthcheck
from berth.api import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from berth.rpc import aio_channel
from controller.cache import ClusterCache, StatusWaiter
from controller.events import EventsAPI
from controller.exec_volumes import ExecVolumesMixin
from controller.images import ImageRoutes
from controller.lifecycle import LifecycleMixin
from controller.metrics import ControllerMetrics
from controller.network_api import NetworksAPI
from controller.orchestrator import TERMINAL, Orchestrator
from controller.scheduler import STRATEGIES, Constraint
from controller.services import ServicesAPI
from controller.stop_wait import StopEnds
from controller.store import NameInUse, NotFound, StatusEvent, Store, StoreError, Unavailable, implied_status

log = logging.getLogger(__name__)

MAX_SPEC_BYTES = 1 << 20  # one container's settings as stored; etcd refuses a request over 1.5 MiB (session 7)
RESTART_POLICY_RE = re.compile(r"^(|no|always|unless-stopped|on-failure(:\d+)?)$")  # issue 3a
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
MIN_MEMORY = 6 << 20  # Docker's minimum
DEFAULT_STOP_TIMEOUT_S = 10.0
_ADJECTIVES = ("brave", "calm", "eager", "fond", "keen", "lucid", "merry", "quiet", "swift", "witty")
_NOUNS = ("anchor", "buoy", "cove", "dock", "harbor", "jetty", "keel", "mast", "pier", "wharf")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Ctx = grpc.aio.ServicerContext[Any, Any]


class StatusTracker:
    """Follows one container's status from a revision on, in a background task, so that a caller can wait for
    several states in turn without missing one in between."""

    def __init__(self, events: AsyncIterator[StatusEvent], cid: str, current: t.ContainerStatus | None) -> None:
        self.cid = cid
        self.history: list[t.ContainerStatus] = [current] if current is not None else []
        self.gone = False
        self.error: Exception | None = None
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._follow(events))

    @classmethod
    async def before_changes(
        cls, store: Store, cid: str, cache: ClusterCache | None = None
    ) -> StatusTracker | StatusWaiter:
        """A tracker whose etcd watch is in place before the caller writes: it sees every later status
        at once (a watch from a past revision would be caught up only by etcd's 100 ms sync loop). With the
        controller's cache following etcd, a waiter fed by its watch serves instead (issue 6: no task, queue
        or etcd watch per call; the caller is woken once, by the status it waits for)."""
        waiter = cache.status_waiter(cid) if cache is not None else None
        if waiter is not None:
            return waiter
        return cls(await store.open_status_watch(cid), cid, None)

    @classmethod
    async def from_now(cls, store: Store, cid: str) -> StatusTracker:
        """A tracker holding the status as it is now and following every change after it (read at one
        revision: nothing in between is missed)."""
        current, revision = await store.get_status(cid)
        return cls(store.watch_status(cid, revision), cid, current)

    async def _follow(self, events: AsyncIterator[StatusEvent]) -> None:
        try:
            async for event in events:
                async with self._changed:
                    if event.status is None:
                        self.gone = True
                    else:
                        self.history.append(event.status)
                    self._changed.notify_all()
                if self.gone:
                    return
        except StoreError as exc:
            async with self._changed:
                self.error = exc
                self._changed.notify_all()

    def seed(self, status: t.ContainerStatus) -> None:
        """Add a status read directly (it is no older than the events already seen)."""
        self.history.append(status)

    async def wait(self, generation: int, states: Iterable[int], timeout_s: float) -> t.ContainerStatus:
        """The first status of this generation (or later) in one of the states."""
        wanted = set(states)
        seen = 0
        async with asyncio.timeout(timeout_s), self._changed:
            while True:
                for status in self.history[seen:]:
                    if status.generation >= generation and status.state in wanted:
                        return status
                seen = len(self.history)
                if self.gone:
                    raise NotFound(f"container {self.cid[:12]} was removed")
                if self.error is not None:
                    raise self.error
                await self._changed.wait()

    def close(self) -> None:
        self._task.cancel()


class AgentLinks:
    """Channels to agents, one per address, reused across calls."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def agent(self, address: str) -> agent_pb2_grpc.AgentAsyncStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address)
        return agent_pb2_grpc.AgentStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)


def validate(spec: t.ContainerSpec) -> str | None:
    """Why a spec cannot run, or None."""
    if not spec.image:
        return "no image given: berthctl run IMAGE [COMMAND...]"
    if (size := spec.ByteSize()) > MAX_SPEC_BYTES:
        return (f"the container's settings take {size / (1 << 20):.1f} MiB, more than the {MAX_SPEC_BYTES >> 20} MiB "
                "berth stores for one container: put big values (environment, labels, command) in a volume or the "
                "image instead")
    if spec.name and not NAME_RE.match(spec.name):
        return f"invalid name {spec.name!r}: use letters, digits, '_', '.' and '-', starting with a letter or digit"
    if spec.memory_bytes < 0 or 0 < spec.memory_bytes < MIN_MEMORY:
        return "--memory must be at least 6m"
    if spec.nano_cpus < 0:
        return "--cpus must be more than 0"
    if spec.pids_limit < 0:
        return "--pids-limit must not be negative"
    for env in spec.env:
        if "=" not in env or env.startswith("="):
            return f"invalid environment variable {env!r}: write -e KEY=VALUE"
    if not RESTART_POLICY_RE.match(spec.restart_policy):  # issue 6, on-failure:N issue 3a
        return (f"invalid restart policy {spec.restart_policy!r}: "
                "use no, always, on-failure[:N] or unless-stopped")
    if spec.log_max_size_bytes < 0 or spec.log_max_files < 0:  # issue 3a
        return "--log-opt max-size and max-file must not be negative"
    if spec.placement_strategy not in ("", *STRATEGIES):  # issue 6
        return f"invalid placement strategy {spec.placement_strategy!r}: spread or binpack"
    for constraint in spec.constraints:
        try:
            Constraint.parse(constraint)
        except ValueError as exc:
            return str(exc)
    problem = healthcheck.validate(spec.healthcheck)  # issue 6
    if problem:
        return problem
    return validate_3b(spec)


def validate_3b(spec: t.ContainerSpec) -> str | None:
    """issue 3b: limits the agent cannot check better (mounts, users and capabilities are checked there)."""
    if spec.memory_swap_bytes < -1:
        return "--memory-swap must be -1 (unlimited swap) or a size"
    if spec.memory_swap_bytes > 0 and spec.memory_bytes == 0:
        return "--memory-swap needs --memory too"
    if spec.memory_swap_bytes > 0 and spec.memory_swap_bytes < spec.memory_bytes:
        return "--memory-swap must be at least --memory (it counts memory plus swap)"
    if spec.cpu_shares < 0 or 0 < spec.cpu_shares < 2:
        return "--cpu-shares must be at least 2"
    if spec.cpuset_cpus and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", spec.cpuset_cpus):
        return f"invalid --cpuset-cpus {spec.cpuset_cpus!r}: write CPU numbers and ranges, e.g. 0-1 or 0,2"
    return None


class RunRefused(Exception):
    """A Run that cannot be done, or whose container failed to start (nothing of it is left stored): a gRPC
    status code and one line for the user. Run ends its call with it; RunStream replies with it to that
    request alone (issue 6)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refusal(exc: StoreError) -> RunRefused:
    """The gRPC status code and message of a store error, as every control RPC gives it to the user."""
    if isinstance(exc, NotFound):
        return RunRefused(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, NameInUse):
        return RunRefused(grpc.StatusCode.ALREADY_EXISTS,
                          f"{exc}: remove it (berthctl rm {exc.name}) or choose another name with --name")
    if isinstance(exc, Unavailable):
        return RunRefused(grpc.StatusCode.UNAVAILABLE, str(exc))
    return RunRefused(grpc.StatusCode.ABORTED, str(exc))


async def _abort(context: Ctx, exc: StoreError) -> NoReturn:
    refused = refusal(exc)
    await context.abort(refused.code, refused.message)
    raise AssertionError  # abort always raises


def _lost_if(down: bool, out: t.Container) -> t.Container:
    """Start's and Stop's answer when its host was down: a container its agent has not ended (assigned, preparing,
    running) shows lost, "host X is down" (review, session 7: one not started yet showed assigned, no warning)."""
    if down and out.status.state in (t.STATE_ASSIGNED, t.STATE_PREPARING, t.STATE_RUNNING):
        out.status.state = t.STATE_LOST
        out.status.message = f"host {out.node_name or out.node_id} is down"
    return out


class _Refuse:
    """The context Run's checks that abort a call (pin_to_volumes, check_network) are given by `_start`: their
    abort raises RunRefused instead, so that RunStream refuses that one request and serves the others."""

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        raise RunRefused(code, details)


_REFUSE: Ctx = cast(Ctx, _Refuse())
RUN_STREAM_IN_FLIGHT = 1024  # requests of one RunStream served at once; it reads no more until one is answered
RUN_STREAM_REPLIES = 256  # replies of one RunStream sent in one message at most
# A Run is answered once its container is in one; created: its agent says the run was stopped before it started
# it, and Run answers it so (as a pending one; session 6: it waited RUN_WAIT_S for a run that would never begin)
RUN_BEGUN = (t.STATE_RUNNING, t.STATE_EXITED, t.STATE_FAILED, t.STATE_CREATED)
RUN_WAIT_S = 3600  # how long a Run waits for its container to begin


class _Ids:
    """New container ids (64 hex digits from os.urandom), cut from 8 KiB read at a time: one getrandom call
    per 256 containers instead of one each (session 5)."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(32 * 256), 0
        at, self._at = self._at, self._at + 32
        return self._pool[at:at + 32].hex()


class _StreamServing:
    """One RunStream's requests being served (session 5): the replies decided and not sent yet, and how many
    requests are open. A message's requests are admitted together by one task; each then waits on the cache
    with a callback (StatusWaiter.then), no task, future or timer each. A request the fast way does not
    take (attach, no cache, volumes, a network, no name) is served alone by Run's own code in a task."""

    def __init__(self) -> None:
        self.ready: list[control_pb2.RunStreamEvent] = []  # decided, not sent yet
        self.wake = asyncio.Event()
        self.room = asyncio.Semaphore(RUN_STREAM_IN_FLIGHT)
        self.open = 0  # requests read and not answered
        self.tasks: set[asyncio.Task[None]] = set()
        # by index: placed, waiting to begin, until a deadline (loop time)
        self.waiting: dict[int, tuple[t.Container, StatusWaiter, float]] = {}
        self.to_close: list[StatusWaiter] = []  # waiters done (closed by the sender, not from the cache's watch)
        self.sweeper: asyncio.TimerHandle | None = None

    def answer(self, reply: control_pb2.RunStreamEvent) -> None:
        self.ready.append(reply)
        self.open -= 1
        self.room.release()
        self.wake.set()

    def refuse(self, index: int, exc: RunRefused) -> None:
        reply = control_pb2.RunStreamEvent(index=index)
        reply.error.code, reply.error.message = exc.code.value[0], exc.message
        self.answer(reply)

    def spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def sweep_later(self, expire: Callable[[_StreamServing, int, BaseException], None]) -> None:
        """Expire the requests waiting past their deadline (RUN_WAIT_S), checked once a minute while any wait."""
        if self.sweeper is None and self.waiting:
            self.sweeper = asyncio.get_running_loop().call_later(60, self._sweep, expire)

    def _sweep(self, expire: Callable[[_StreamServing, int, BaseException], None]) -> None:
        self.sweeper = None
        now = asyncio.get_running_loop().time()
        for index in [i for i, (_, _, deadline) in self.waiting.items() if deadline <= now]:
            expire(self, index, TimeoutError(f"not begun after {RUN_WAIT_S} s"))
        self.sweep_later(expire)

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.sweeper is not None:
            self.sweeper.cancel()
        for _, waiter, _ in self.waiting.values():
            waiter.close()
        self.waiting.clear()
        self.close_done()

    def close_done(self) -> None:
        to_close, self.to_close = self.to_close, []
        for waiter in to_close:
            waiter.close()


def _stopped(placed: t.Container) -> t.Container:
    """A Run's container as placed, stopped: its run was stopped before it started (its agent says created), and
    it is no longer stored (--rm) or not read."""
    c = t.Container()
    c.CopyFrom(placed)
    c.desired_state = t.DESIRED_STOPPED
    return c


class _Attached(NamedTuple):
    """What an attached Run keeps open once its container started: its status tracker and its output's pump."""

    cid: str
    tracker: StatusTracker | StatusWaiter
    logs: asyncio.Queue[t.LogEntry | None]
    pump: asyncio.Task[None]


class ControlAPI(  # 3b: ExecVolumesMixin (exec, volumes); 3a: LifecycleMixin (create, kill, pause)
    ImageRoutes, ServicesAPI, EventsAPI, ExecVolumesMixin, LifecycleMixin, NetworksAPI,  # issue 5: NetworksAPI
    control_pb2_grpc.ControlServicer,
):
    def __init__(
        self, store: Store, orchestrator: Orchestrator, metrics: ControllerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.orchestrator = orchestrator
        self.metrics = metrics
        self.links = AgentLinks()
        self.clock = clock
        self._run_streams: list[_StreamServing] = []  # each open RunStream's requests in flight (issue 6)
        self._ids = _Ids()
        self._counted: dict[tuple[str, grpc.StatusCode], Any] = {}  # api_requests' children, looked up once
        Gauge("berth_run_stream_requests", "Requests of open RunStream calls being served",
              registry=metrics.registry).set_function(lambda: sum(s.open for s in self._run_streams))
        Gauge("berth_run_waiters", "Status waiters open on the cluster cache (Run and RunStream requests waiting)",
              registry=metrics.registry).set_function(
                  lambda: self.orchestrator.cache.waiters() if self.orchestrator.cache is not None else 0)

    # ---- helpers ----------------------------------------------------------------------------------

    async def _before_changes(self, cid: str, context: Ctx, ends: StopEnds | None = None
                              ) -> StatusTracker | StatusWaiter:
        """Start's and Stop's status watch (and Stop's removal watch, in `ends`), opened before they write: etcd
        failing there is UNAVAILABLE, nothing changed (session 6: it was not caught, and the call ended UNKNOWN)."""
        try:
            tracker = await StatusTracker.before_changes(self.store, cid)
            if ends is not None:
                try:
                    await ends.follow_removal(cid)
                except BaseException:
                    tracker.close()
                    raise
            return tracker
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"nothing was changed, etcd failed ({exc}); try again")
            raise AssertionError from None  # abort always raises

    async def _resolve(self, ref: str, context: Ctx) -> str:
        try:
            return await self.store.resolve(ref)
        except StoreError as exc:
            await _abort(context, exc)

    async def _view(self, cid: str) -> t.Container:
        """A container as a user sees it: with status, host name, and lost when its host is down or removed."""
        cache = self.orchestrator.cache
        if cache is not None and await cache.consistent():  # issue 6: one read of etcd's revision, not four
            held = cache.container(cid)
            if held is None:
                raise NotFound(f"no such container: {cid}")
            entry = cache.nodes.get(held.container.node_id)
            nodes = {}
            if entry is not None:  # read only: _decorate takes its name and state
                nodes[entry[0].id] = t.Node(id=entry[0].id, name=entry[0].name, state=t.NODE_READY
                                            if entry[0].id in cache.alive else t.NODE_DOWN)
            return self._decorate(held.container, cache.status(cid), nodes, complete=True)
        # the status first: read after its container, it could be gone with it (an --rm container removed between
        # the two reads), and the container was shown assigned (session 7); the container read after it is gone too
        status, _ = await self.store.get_status(cid)
        v = await self.store.get_container(cid)
        node = await self.store.node_state(v.container.node_id) if v.container.node_id else None
        return self._decorate(v.container, status, {node.id: node} if node is not None else {}, complete=True)

    async def _host_ready(self, node_id: str) -> bool:
        """Whether a container's host is up (its lease key lives). A stop of a container whose host is down is
        recorded and answered at once (the container shows lost; the host's agent stops it when it is back, as it
        stops its duplicates): waiting for its agent's word gave DEADLINE_EXCEEDED after the stop timeout + 30 s
        (session 5's known-left, fixed in session 6)."""
        cache = self.orchestrator.cache
        if cache is not None and await cache.consistent():
            return node_id in cache.alive
        node = await self.store.node_state(node_id)
        return node is not None and node.state == t.NODE_READY

    async def _wait_unless_host_down(self, ends: StopEnds, tracker: StatusTracker | StatusWaiter, c: t.Container,
                                     states: tuple[int, ...], timeout_s: float) -> t.ContainerStatus | None:
        """Start's and Stop's wait for the container's agent to report one of `states` for its run, within
        `timeout_s` (TimeoutError); None when its host is down, or goes down meanwhile (`ends` follows its
        lease key). A host that lost its lease while they waited is looked at again, and waited for again
        when it has a new one already (review, session 7: a blip ended the wait, answered running with no
        wait and no warning, or lost while up)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while await self._host_ready(c.node_id):
            status = await ends.wait(tracker.wait(c.generation, states, timeout_s=deadline - loop.time()))
            if status is not None:  # None: its host went down meanwhile
                return status
        return None

    @staticmethod
    def _decorate(c: t.Container, status: t.ContainerStatus | None, nodes: dict[str, t.Node],
                  out: t.Container | None = None, complete: bool = False) -> t.Container:
        """The view of a container, made in `out` when given (a field of a reply: no second copy). `complete`:
        `nodes` was looked up for its host, so a host not in it was removed (node rm)."""
        if out is None:
            out = t.Container()
        out.CopyFrom(c)
        if status is not None:
            out.status.CopyFrom(status)
        if not out.status.state:  # issue 6: no status key yet (created placed): what the container implies
            out.status.state = t.STATE_ASSIGNED if c.node_id else t.STATE_PENDING
        if c.generation == 0 and out.status.state == t.STATE_PENDING:  # issue 3a: made by create
            out.status.state = t.STATE_CREATED
        node = nodes.get(c.node_id)
        if node is None and complete and c.node_id:  # its host was removed (node rm), it could not move: lost
            node = t.Node(id=c.node_id, name=c.node_id, state=t.NODE_UNSPECIFIED)
        if node is not None:
            out.node_name = node.name
            if node.state != t.NODE_READY and out.status.state == t.STATE_RUNNING:
                out.status.state = t.STATE_LOST
                out.status.message = (f"host {node.name} is down" if node.state == t.NODE_DOWN
                                      else f"host {node.name} was removed (node rm)")
        return out

    async def _wait(self, cid: str, generation: int, states: Iterable[int], timeout_s: float) -> t.ContainerStatus:
        """Wait until the container's status for this generation is in one of the states. Raises NotFound
        when the container is removed first, TimeoutError after timeout_s."""
        tracker = await StatusTracker.from_now(self.store, cid)
        try:
            return await tracker.wait(generation, states, timeout_s)
        finally:
            tracker.close()

    async def _agent_logs(
        self, c: t.Container, follow: bool, tail: int, since_ns: int = 0
    ) -> AsyncIterator[t.LogEntry]:
        node = await self.store.get_node(c.node_id) if c.node_id else None
        if node is None:
            return
        stub = self.links.agent(node.agent_address)
        call = stub.Logs(agent_pb2.AgentLogsRequest(container_id=c.id, follow=follow, tail=tail, since_ns=since_ns))
        async for entry in call:
            yield entry

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        counter = self._counted.get((method, code))
        if counter is None:
            counter = self._counted[method, code] = self.metrics.api_requests.labels(method=method, code=code.name)
        counter.inc()

    # ---- RPCs -------------------------------------------------------------------------------------

    async def Run(self, request: control_pb2.RunRequest, context: Ctx) -> AsyncIterator[control_pb2.RunEvent]:
        started = control_pb2.RunEvent()
        try:
            attached = await self._start(request.spec, started.started, "Run", attach=request.attach)
        except RunRefused as exc:
            await context.abort(exc.code, exc.message)
        if attached is None:
            yield started
            return
        try:
            yield started
            while (entry := await attached.logs.get()) is not None:
                yield control_pb2.RunEvent(log=entry)
            try:
                final = await attached.tracker.wait(1, TERMINAL, timeout_s=30)
            except (StoreError, TimeoutError) as exc:
                await context.abort(grpc.StatusCode.ABORTED, f"lost track of container {attached.cid[:12]}: {exc}")
            yield control_pb2.RunEvent(exit_code=final.exit_code)
        finally:
            attached.tracker.close()
            attached.pump.cancel()

    async def RunStream(self, request_iterator: AsyncIterator[control_pb2.RunBatch], context: Ctx
                        ) -> AsyncIterator[control_pb2.RunStreamEvents]:
        """issue 6: Run for each request of the stream, all at once (up to RUN_STREAM_IN_FLIGHT), each answered
        as soon as it is decided, tagged with its index; a refused request is answered with its error alone.
        Every reply decided by the time the stream sends goes in one message (session 5: a gRPC message costs
        more than its contents). A message's requests are admitted together (_admit_batch). When the caller
        goes away, every request still in flight is dropped (its waiter closed, its task cancelled)."""
        serving = _StreamServing()
        ended: list[BaseException | None] = []  # the reader's end: None when the caller sent its last request

        async def read() -> None:
            index = 0
            try:
                async for batch in request_iterator:
                    group: list[tuple[int, control_pb2.RunRequest]] = []
                    for request in batch.requests:
                        if serving.room.locked() and group:  # no room for more: serve what was read first
                            serving.spawn(self._admit_batch(serving, group))
                            group = []
                        await serving.room.acquire()
                        serving.open += 1
                        group.append((index, request))
                        index += 1
                    if group:
                        serving.spawn(self._admit_batch(serving, group))
            except Exception as exc:  # noqa: BLE001 - ends the stream with it
                ended.append(exc)
            else:
                ended.append(None)
            serving.wake.set()

        reader = asyncio.create_task(read())
        self._run_streams.append(serving)
        try:
            while True:
                await serving.wake.wait()
                serving.wake.clear()
                serving.close_done()
                ready = serving.ready
                while ready:  # every reply decided by now, RUN_STREAM_REPLIES to a message
                    batch, ready[:RUN_STREAM_REPLIES] = ready[:RUN_STREAM_REPLIES], []
                    yield control_pb2.RunStreamEvents(events=batch)
                if ended and (ended[0] is not None or not serving.open):  # each request answered: the end
                    if ended[0] is not None:
                        raise ended[0]
                    return
        finally:
            self._run_streams.remove(serving)
            reader.cancel()
            serving.close()

    async def _admit_batch(self, serving: _StreamServing, group: list[tuple[int, control_pb2.RunRequest]]) -> None:
        """RunStream's requests of one message (session 5): each checked, then created and placed together
        (one admission batch), then each waits on the cache with a callback until its container begins. A
        request this does not serve the fast way is served alone as Run serves it (_serve_alone)."""
        cache = self.orchestrator.cache
        fast: list[tuple[int, t.Container, StatusWaiter]] = []
        handled: set[int] = set()  # answered, or handed to a task or to its waiter
        now_ns = int(self.clock() * 1e9)
        try:
            for index, request in group:
                spec = request.spec
                handled.add(index)
                if request.attach:
                    self._refuse(serving, index, RunRefused(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "attach is not served on RunStream: run that container with Run (berthctl run)"))
                    continue
                waiter = None
                if cache is not None and spec.name and not spec.volumes and not spec.network:
                    problem = validate(spec)
                    if problem:
                        self._refuse(serving, index, RunRefused(grpc.StatusCode.INVALID_ARGUMENT, problem))
                        continue
                    c = t.Container(id=self._ids.next(), spec=spec, created_at_ns=now_ns,
                                    desired_state=t.DESIRED_RUNNING, generation=1,
                                    stop_timeout_s=DEFAULT_STOP_TIMEOUT_S)
                    # before the container exists: every status of this run is seen
                    waiter = cache.status_waiter(c.id)
                if waiter is None:
                    serving.spawn(self._serve_alone(serving, index, request))
                    continue
                handled.discard(index)
                fast.append((index, c, waiter))
            if not fast:
                return
            outcomes = await self.orchestrator.create_and_place_many([c for _, c, _ in fast])
            deadline = asyncio.get_running_loop().time() + RUN_WAIT_S
            for (index, c, waiter), placed in zip(fast, outcomes, strict=True):
                handled.add(index)
                if isinstance(placed, t.Container) and placed.node_id:
                    serving.waiting[index] = (placed, waiter, deadline)
                    waiter.then(1, RUN_BEGUN, functools.partial(self._begun, serving, index))
                    continue
                waiter.close()
                reply = control_pb2.RunStreamEvent(index=index)
                try:
                    if isinstance(placed, StoreError):
                        raise refusal(placed)
                    if isinstance(placed, BaseException):
                        raise placed
                    # Nothing fits now: it stays pending, and the pending sweep places it when a host frees up.
                    reply.started.CopyFrom(await self._view(c.id))
                    self._count("RunStream", grpc.StatusCode.OK)
                except RunRefused as exc:
                    self._refuse(serving, index, exc)
                    continue
                except Exception as exc:
                    log.exception("RunStream request %d", index)
                    reply.error.code, reply.error.message = grpc.StatusCode.INTERNAL.value[0], f"internal error: {exc}"
                serving.answer(reply)
            serving.sweep_later(self._begun)
        except Exception as exc:  # answered each request not answered yet: the stream goes on
            log.exception("RunStream requests %d-%d", group[0][0], group[-1][0])
            for index, _ in group:
                if index not in handled:
                    handled.add(index)
                    serving.refuse(index, RunRefused(grpc.StatusCode.INTERNAL, f"internal error: {exc}"))
        finally:  # cancelled (the caller gone) or failed before handing a waiter over: close it
            for index, _, waiter in fast:
                if index not in serving.waiting:
                    waiter.close()

    def _refuse(self, serving: _StreamServing, index: int, exc: RunRefused) -> None:
        self._count("RunStream", exc.code)
        serving.refuse(index, exc)

    def _begun(self, serving: _StreamServing, index: int, outcome: t.ContainerStatus | BaseException) -> None:
        """The callback of a RunStream request waiting on the cache: its container began (or it was removed, or
        the cache's watch failed, or it waited too long). Called from the cache's watch: it answers, or hands
        the rare slow cases to a task; its waiter is closed by the stream's sender."""
        held = serving.waiting.pop(index, None)
        if held is None:  # answered already
            return
        placed, waiter, _ = held
        serving.to_close.append(waiter)
        if isinstance(outcome, t.ContainerStatus) and outcome.state != t.STATE_FAILED:
            reply = control_pb2.RunStreamEvent(index=index)
            self._count("RunStream", grpc.StatusCode.OK)
            if outcome.state == t.STATE_CREATED:  # stopped before it started: as it is (the cache has the stop)
                now = self.orchestrator.cache.container(placed.id) if self.orchestrator.cache is not None else None
                placed = now.container if now is not None else _stopped(placed)
            self._decorate(placed, outcome, {}, out=reply.started).node_name = placed.node_id
            serving.answer(reply)
        elif isinstance(outcome, (NotFound, TimeoutError)):
            self._refuse(serving, index, RunRefused(grpc.StatusCode.ABORTED, f"container {placed.id[:12]}: {outcome}"))
        else:  # it failed to start (remove it), or the cache stopped following etcd (follow etcd instead)
            serving.spawn(self._finish_alone(serving, index, placed, outcome))

    async def _finish_alone(self, serving: _StreamServing, index: int, placed: t.Container,
                            outcome: t.ContainerStatus | BaseException) -> None:
        reply = control_pb2.RunStreamEvent(index=index)
        try:
            if not isinstance(outcome, t.ContainerStatus):
                outcome = await self._follow_on_etcd(placed.id)
            await self._finish(placed, outcome, reply.started)
            self._count("RunStream", grpc.StatusCode.OK)
        except RunRefused as exc:
            self._count("RunStream", exc.code)
            reply.error.code, reply.error.message = exc.code.value[0], exc.message
        except Exception as exc:
            log.exception("RunStream request %d", index)
            reply.error.code, reply.error.message = grpc.StatusCode.INTERNAL.value[0], f"internal error: {exc}"
        serving.answer(reply)

    async def _serve_alone(self, serving: _StreamServing, index: int, request: control_pb2.RunRequest) -> None:
        reply = control_pb2.RunStreamEvent(index=index)
        try:
            await self._start(request.spec, reply.started, "RunStream")
        except RunRefused as exc:
            reply.error.code, reply.error.message = exc.code.value[0], exc.message
        except Exception as exc:
            log.exception("RunStream request %d", index)
            reply.error.code, reply.error.message = grpc.StatusCode.INTERNAL.value[0], f"internal error: {exc}"
        serving.answer(reply)

    async def _follow_on_etcd(self, cid: str) -> t.ContainerStatus:
        """The status a Run waits for, followed on etcd (the cache's watch failed: it drops its copy and loads
        it again, failing its waiters; the container was created and may run)."""
        tracker: StatusTracker | None = None
        try:  # etcd may be what failed: its read as its watch, ABORTED as Run answers then (not INTERNAL)
            tracker = await StatusTracker.from_now(self.store, cid)
            return await tracker.wait(1, RUN_BEGUN, timeout_s=RUN_WAIT_S)
        except (StoreError, TimeoutError) as exc:
            raise RunRefused(grpc.StatusCode.ABORTED, f"container {cid[:12]}: {exc}") from None
        finally:
            if tracker is not None:
                tracker.close()

    async def _finish(self, placed: t.Container, status: t.ContainerStatus, out: t.Container) -> None:
        """The end of a Run whose container began: `out` filled with it as the user sees it, or, when it failed
        to start, removed and RunRefused raised."""
        if status.state == t.STATE_FAILED:
            # It never ran: leave nothing behind, as `docker run` leaves no half-made container.
            try:
                await self.orchestrator.remove(placed.id)
            except StoreError as exc:
                raise refusal(exc) from None
            raise RunRefused(grpc.StatusCode.FAILED_PRECONDITION, status.message or "start failed")
        if status.state == t.STATE_CREATED:  # stopped before it started: as it is (session 7: as placed, running)
            try:
                placed = (await self.store.get_container(placed.id)).container
            except NotFound:  # --rm: removed as it was stopped
                placed = _stopped(placed)
            except StoreError as exc:
                raise refusal(exc) from None
        self._decorate(placed, status, {}, out=out).node_name = placed.node_id

    async def _start(self, spec: t.ContainerSpec, out: t.Container, method: str, attach: bool = False
                     ) -> _Attached | None:
        """Run's work for one container, shared by Run and RunStream: validate, create and place it, and wait
        until it runs (or exits), fills `out` with it as the user sees it. One that no host fits now is
        answered pending with the reason (the pending sweep places it later); one that failed to start is
        removed. Raises RunRefused (nothing of the container left stored). With attach, what follows its
        output is returned open (close it)."""
        began = time.perf_counter()  # issue 2: Run's latency by step, in the debug log
        attached: _Attached | None = None
        handed: _Attached | None = None
        tracker: StatusTracker | StatusWaiter | None = None
        try:
            problem = validate(spec)
            if problem:
                raise RunRefused(grpc.StatusCode.INVALID_ARGUMENT, problem)
            await self.pin_to_volumes(spec, _REFUSE)  # issue 3b
            await self.check_network(spec, _REFUSE)  # issue 5: --network NAME exists
            c = t.Container(
                id=self._ids.next(), spec=spec, created_at_ns=int(self.clock() * 1e9),
                desired_state=t.DESIRED_RUNNING, generation=1, stop_timeout_s=DEFAULT_STOP_TIMEOUT_S,
            )
            # The status watch goes in before the container exists, so every status of this run is seen, at
            # once, even when an --rm container is deleted right after its exit.
            try:
                tracker = await StatusTracker.before_changes(self.store, c.id, self.orchestrator.cache)
            except StoreError as exc:  # etcd failed before anything was written: the caller may just retry
                raise RunRefused(grpc.StatusCode.UNAVAILABLE,
                                 f"nothing was created, etcd failed ({exc}); try again") from None
            try:
                if not c.spec.name:
                    c.spec.name = await self._free_name()
                placed = await self.orchestrator.create_and_place(c)  # issue 6: group-committed on the leader
                placed_at = time.perf_counter()
                if not placed.node_id:
                    # Nothing fits now: it stays pending, and the pending sweep places it when a host frees up.
                    out.CopyFrom(await self._view(c.id))
                    self._count(method, grpc.StatusCode.OK)
                    return None
            except StoreError as exc:
                raise refusal(exc) from None
            if attach:
                logs: asyncio.Queue[t.LogEntry | None] = asyncio.Queue()
                attached = _Attached(c.id, tracker, logs, asyncio.create_task(self._pump_logs(placed, logs)))
            begun = RUN_BEGUN
            try:
                try:
                    status = await tracker.wait(1, begun, timeout_s=RUN_WAIT_S)
                except StoreError as exc:
                    if isinstance(exc, NotFound):
                        raise
                    # The cache's watch failed (it drops its copy and loads it again, failing its waiters): the
                    # container was created and may run; follow its status on etcd instead of failing the call.
                    tracker.close()
                    tracker = await StatusTracker.from_now(self.store, c.id)
                    if attached is not None:
                        attached = attached._replace(tracker=tracker)
                    status = await tracker.wait(1, begun, timeout_s=RUN_WAIT_S)
            except (StoreError, TimeoutError) as exc:
                raise RunRefused(grpc.StatusCode.ABORTED, f"container {c.id[:12]}: {exc}") from None
            await self._finish(placed, status, out)
            if status.state == t.STATE_CREATED:  # stopped before it started: nothing to attach to
                self._count(method, grpc.StatusCode.OK)
                return None
            if log.isEnabledFor(logging.DEBUG):
                log.debug("run %s: placed on %s in %.1f ms, %s %.1f ms later", c.id[:12], placed.node_id,
                          (placed_at - began) * 1000, t.ContainerState.Name(status.state),
                          (time.perf_counter() - placed_at) * 1000)
            self._count(method, grpc.StatusCode.OK)
            handed = attached  # the caller closes it
            return handed
        except RunRefused as exc:
            self._count(method, exc.code)
            raise
        finally:  # done, refused, or the caller gone (cancelled): nothing left open but what is handed over
            if handed is None:
                if tracker is not None:
                    tracker.close()
                if attached is not None:
                    attached.pump.cancel()

    async def _pump_logs(self, c: t.Container, out: asyncio.Queue[t.LogEntry | None]) -> None:
        try:
            async for entry in self._agent_logs(c, follow=True, tail=0):
                await out.put(entry)
        except grpc.aio.AioRpcError as exc:
            log.warning("logs of %s from its host: %s", c.id[:12], exc.details())
        finally:
            await out.put(None)

    async def _free_name(self) -> str:
        for _ in range(20):
            name = f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NOUNS)}_{secrets.token_hex(2)}"
            try:
                await self.store.resolve(name)
            except NotFound:
                return name
        return f"c_{secrets.token_hex(6)}"

    async def Start(self, request: control_pb2.ContainerRef, context: Ctx) -> t.Container:
        cid = await self._resolve(request.ref, context)
        tracker = await self._before_changes(cid, context)
        ends = StopEnds(self.store)  # its host going down while it waits ends it (review, session 7)
        try:
            c = await self.orchestrator.set_desired(cid, t.DESIRED_RUNNING)
            down = False
            if c.node_id:
                # a host down, or going down while Start waits, starts it when back: answered at once, lost, as Stop
                # (review, session 7: Start waited 3,600 s and berthctl for ever); a blip is waited for again
                await ends.follow_host(c.node_id)  # before it is read: the host going down after ends the wait
                tracker.seed((await self.store.get_status(cid))[0])
                status = await self._wait_unless_host_down(ends, tracker, c, (t.STATE_RUNNING, t.STATE_EXITED,
                                                                                t.STATE_FAILED), 3600)
                down = status is None
                if status is not None and status.state == t.STATE_FAILED:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, status.message or "start failed")
            try:
                return _lost_if(down, await self._view(cid))
            except NotFound:
                if not (c.node_id and c.spec.auto_remove):
                    raise
                # --rm: it ran, ended and was removed before this answer was made (review, session 7: NOT_FOUND for
                # a start that worked, as Stop until eef6e84): as it ended, its last status on its status watch
                out = self._decorate(c, await tracker.wait(c.generation, TERMINAL, timeout_s=30), {})
                out.node_name = c.node_id
                return out
        except StoreError as exc:
            await _abort(context, exc)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the container did not start in time")
        finally:
            tracker.close()
            await ends.close()
        raise AssertionError

    async def Stop(self, request: control_pb2.StopRequest, context: Ctx) -> t.Container:
        cid = await self._resolve(request.ref, context)
        timeout = request.timeout_s if request.timeout_s >= 0 else DEFAULT_STOP_TIMEOUT_S
        ends = StopEnds(self.store)  # a removal while it waits ends it, also without a status key (session 7)
        tracker = await self._before_changes(cid, context, ends)
        try:
            c = await self.orchestrator.set_desired(cid, t.DESIRED_STOPPED, stop_timeout_s=timeout)
            status, _ = await self.store.get_status(cid)
            if not status.state:  # no status key before its first report (issue 6): its agent may be starting it
                status = implied_status(c)
            down = False
            if c.node_id and status.state in (t.STATE_ASSIGNED, t.STATE_PREPARING, t.STATE_RUNNING):
                await ends.follow_host(c.node_id)  # before it is read: the host going down after ends the wait
                tracker.seed(status)  # its agent says created when it had not started this run (stopped first)
                # a host down stops it when back: answer now (one not started yet shows lost too, and berthctl
                # warns: review, session 7)
                ended = await self._wait_unless_host_down(ends, tracker, c, (*TERMINAL, t.STATE_CREATED), timeout + 30)
                down = ended is None
                status = status if ended is None else ended
            try:
                return _lost_if(down, await self._view(cid))
            except NotFound:
                if not c.spec.auto_remove:
                    raise
                # --rm: removed as it ended (or was stopped before it started) while this answer was made (review,
                # session 6: Stop answered NOT_FOUND for a stop that worked): the container as it ended
                out = self._decorate(c, status, {})
                out.node_name = c.node_id
                return out
        except StoreError as exc:
            await _abort(context, exc)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the container did not stop in time")
        finally:
            tracker.close()
            await ends.close()
        raise AssertionError

    async def Remove(self, request: control_pb2.RemoveRequest, context: Ctx) -> control_pb2.RemoveResponse:
        cid = await self._resolve(request.ref, context)
        try:
            view = await self._view(cid)
            active = view.desired_state == t.DESIRED_RUNNING and view.status.state not in TERMINAL
            if active and view.node_id and not request.force:
                name = view.spec.name
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"container {name} is running: stop it first (berthctl stop {name}) "
                    f"or remove it anyway (berthctl rm -f {name})",
                )
            await self.orchestrator.remove(cid)
        except StoreError as exc:
            await _abort(context, exc)
        return control_pb2.RemoveResponse(id=cid)

    async def Inspect(self, request: control_pb2.ContainerRef, context: Ctx) -> t.Container:
        cid = await self._resolve(request.ref, context)
        try:
            return await self._view(cid)
        except StoreError as exc:
            await _abort(context, exc)

    async def List(self, request: control_pb2.ListRequest, context: Ctx) -> control_pb2.ListResponse:
        try:
            cache = self.orchestrator.cache
            if cache is not None and await cache.consistent():  # issue 6: not every container read from etcd
                nodes = {n.id: n for n in cache.node_list()}
                containers = cache.with_status(list(cache.containers))
            else:
                nodes = {n.id: n for n in await self.store.list_nodes()}
                containers = await self.store.list_containers()
            out = []
            for v in containers:
                c = self._decorate(v.container, None, nodes, complete=True)
                if request.all or c.status.state in (
                    t.STATE_PENDING, t.STATE_ASSIGNED, t.STATE_PREPARING, t.STATE_RUNNING, t.STATE_LOST
                ):
                    out.append(c)
        except StoreError as exc:
            await _abort(context, exc)
        out.sort(key=lambda c: -c.created_at_ns)
        return control_pb2.ListResponse(containers=out)

    async def Logs(self, request: control_pb2.LogsRequest, context: Ctx) -> AsyncIterator[t.LogEntry]:
        cid = await self._resolve(request.ref, context)
        try:
            v = await self.store.get_container(cid)
        except StoreError as exc:
            await _abort(context, exc)
        if not v.container.node_id:
            return
        try:
            async for entry in self._agent_logs(v.container, request.follow, request.tail, request.since_ns):
                yield entry
        except grpc.aio.AioRpcError as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot read the logs from host {v.container.node_id}: {exc.details()}",
            )

    async def Wait(self, request: control_pb2.ContainerRef, context: Ctx) -> control_pb2.WaitResponse:
        cid = await self._resolve(request.ref, context)
        try:
            v = await self.store.get_container(cid)
            # or created: its agent says it was stopped before it started this run (review, session 6: waited for
            # an exit that never comes, or NOT_FOUND once an --rm one is removed), exit code 0 as docker wait
            status = await self._wait(cid, v.container.generation, (*TERMINAL, t.STATE_CREATED), timeout_s=10**7)
        except StoreError as exc:
            await _abort(context, exc)
        return control_pb2.WaitResponse(exit_code=status.exit_code)

    async def ListNodes(self, request: control_pb2.ListNodesRequest, context: Ctx) -> control_pb2.ListNodesResponse:
        try:
            nodes = await self.store.list_nodes()
            hosts = {h.id: h for h in await self.orchestrator.hosts()}
        except StoreError as exc:
            await _abort(context, exc)
        for n in nodes:
            h = hosts.get(n.id)
            if h is not None:
                n.containers = h.containers
                n.allocated.memory_bytes = h.allocated_memory
                n.allocated.nano_cpus = h.allocated_cpus
        nodes.sort(key=lambda n: n.name)
        return control_pb2.ListNodesResponse(nodes=nodes)

    # ---- issue 6: nodes ---------------------------------------------------------------------------

    async def _node_id(self, ref: str, context: Ctx) -> str:
        nodes = await self.store.list_nodes()
        for n in nodes:
            if ref in (n.id, n.name):
                return n.id
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no such node: {ref} (berthctl node ls lists them)")
        raise AssertionError

    async def UpdateNode(self, request: control_pb2.UpdateNodeRequest, context: Ctx) -> t.Node:
        for key in request.label_add:
            if not key or "=" in key:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid label {key!r}: write KEY=VALUE")

        def change(node: t.Node) -> None:
            node.user_labels.update(request.label_add)
            for key in request.label_rm:
                node.user_labels.pop(key, None)
            if request.set_availability:
                node.availability = request.availability

        try:
            node = await self.store.update_node(await self._node_id(request.ref, context), change)
        except StoreError as exc:
            await _abort(context, exc)
        if self.orchestrator.kick is not None:
            self.orchestrator.kick.set()
        return node

    async def RemoveNode(self, request: control_pb2.RemoveNodeRequest, context: Ctx) -> control_pb2.RemoveNodeResponse:
        try:
            node_id = await self._node_id(request.ref, context)
            node = next(n for n in await self.store.list_nodes() if n.id == node_id)
            if node.state == t.NODE_READY and not request.force:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {node.name} is up: drain it and stop its agent first, or use --force",
                )
            await self.store.delete_node(node_id)
        except StoreError as exc:
            await _abort(context, exc)
        return control_pb2.RemoveNodeResponse(id=node_id)
