"""The reconcile loop: makes what runs on this host match what the controller assigned to it, and reports
each container's status back.

Each assigned container has an actor task that serialises its operations (pull, create, start, stop,
remove); a change of assignment only pokes the actor, which compares desired with actual and acts. The
generation of the last run each container started is kept on disk, so that after an agent restart a
container that already ran (and exited) is not started again, and a running one is adopted as is.

Restart policies (agent.restart decides, this module acts): when a run of a container desired running
exits, or is found exited at load (the agent or the host restarted meanwhile), its policy may start it again
after a back-off; the wait goes through the injected `sleep`, so tests drive it without sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from agent.executor import ContainerConfig, ContainerInfo, Executor, ExecutorError, ProcessState
from agent.handoff import await_port_holders
from agent.images import Image, ImageError, ImageNotFound
from agent.metrics import AgentMetrics, StartPhases
from agent.network import NetworkError
from agent.network.dns import DnsServer, serve_networks
from agent.network.host import HostNetwork
from agent.network.ipam import Port
from agent.report_order import ReportOrder
from agent.restart import RestartPolicy, RestartPolicyError, RestartTracker
from agent.run_record import RunRecord
from agent.wake import LoopRef, Wake
from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t

log = logging.getLogger(__name__)

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Images(Protocol):
    async def ensure(self, ref: str) -> Image: ...

    async def pull(self, ref: str) -> Image: ...

    def get(self, ref: str) -> Image | None: ...


class Reporter:
    """Delivers status updates to the controller: the latest per container, retried until delivered. A
    RUNNING not delivered yet is kept ahead of what follows it (a run that exits at once, while an earlier
    report is in flight, is still recorded as started: events, docker's `start`), and goes first. With an
    `order` (agent.report_order, set by the Worker), each status reported gets the next seq, so the controller
    can refuse one older than what it holds (issue 6, order)."""

    def __init__(self, order: Callable[[], int] | None = None) -> None:
        self.order = order
        self._pending: dict[str, t.ContainerStatus] = {}
        self._after: dict[str, t.ContainerStatus] = {}  # what follows a pending RUNNING, for the next batch
        self._wake = Wake()  # issue 6 (throughput): an asyncio.Event without a getpid(2) per wait
        self.sent: dict[str, t.ContainerStatus] = {}
        # issue 6 (streams): batches written and not acknowledged yet, in the order sent
        self._unacked: dict[int, dict[str, t.ContainerStatus]] = {}
        self._batch_no = 0

    def report(self, cid: str, status: t.ContainerStatus) -> None:
        if self.order is not None:
            status.seq = self.order()
        held = self._pending.get(cid)
        if cid in self._after or (held is not None and held.state == t.STATE_RUNNING
                                  and status.state != t.STATE_RUNNING and status.generation == held.generation):
            self._after[cid] = status
        else:
            self._pending[cid] = status
        self.sent[cid] = status
        self._wake.set()

    def flush(self) -> None:
        """Try to deliver what is pending now (after a reconnect)."""
        if self._pending:
            self._wake.set()

    def _requeue(self, cid: str, status: t.ContainerStatus) -> None:
        """Put back an undelivered status: a newer one reported meanwhile wins, but not over a RUNNING."""
        newer = self._pending.get(cid)
        if newer is None:
            self._pending[cid] = status
        elif (status.state == t.STATE_RUNNING and newer.state != t.STATE_RUNNING
              and newer.generation == status.generation and cid not in self._after):
            self._pending[cid], self._after[cid] = status, newer

    def forget(self, cid: str) -> None:
        self._pending.pop(cid, None)
        self._after.pop(cid, None)
        self.sent.pop(cid, None)
        for batch in self._unacked.values():
            batch.pop(cid, None)

    def _acknowledged(self, key: int, acked: asyncio.Future[None]) -> None:
        if acked.cancelled() or acked.exception() is not None:
            self._lost()
        else:
            self._unacked.pop(key, None)

    def _lost(self) -> None:
        """issue 6 (streams): the stream broke: every batch not acknowledged may or may not be recorded; all are
        put back, the newest first, so that each container's newer status wins (and a RUNNING stays ahead of
        what followed it), to go again on the next session."""
        lost = list(self._unacked.values())
        self._unacked.clear()
        for batch in reversed(lost):
            for cid, status in batch.items():
                self._requeue(cid, status)

    async def run(self, send: Callable[[d.StatusReport], Awaitable[asyncio.Future[None] | None]],
                  node_id: Callable[[], str]) -> None:
        """Send batches through `send`, which returns once the batch is delivered (None), or once it is written,
        with a future for its acknowledgement (issue 6, streams: agent.reports.ReportStream.deliver, whose
        stream's batches are recorded in the order written). Written batches are kept until acknowledged; when
        one fails, or a send fails, all of them are put back (`_lost`) and go again."""
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and node_id():
                batch, self._pending = self._pending, {}
                report = d.StatusReport(
                    node_id=node_id(),
                    updates=[d.ContainerStatusUpdate(container_id=c, status=s) for c, s in batch.items()],
                )
                self._batch_no += 1
                key = self._batch_no
                self._unacked[key] = batch
                try:
                    acked = await send(report)
                except Exception as exc:  # noqa: BLE001 - any transport failure: keep the batches and retry
                    log.warning("status report failed, will retry: %s", exc)
                    self._lost()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                if key not in self._unacked:  # put back meanwhile (the stream broke): it goes again
                    continue
                if acked is None:
                    del self._unacked[key]
                else:
                    acked.add_done_callback(functools.partial(self._acknowledged, key))
                for cid, delivered in batch.items():  # a RUNNING is sent: what followed it goes next, behind it
                    if delivered.state == t.STATE_RUNNING and cid in self._after and cid not in self._pending:
                        self._pending[cid] = self._after.pop(cid)


def build_config(cid: str, spec: t.ContainerSpec, image: Image) -> ContainerConfig:
    """Merge the spec with the image's config, as `docker run` does."""
    if spec.entrypoint_set:
        args = tuple(spec.entrypoint) + tuple(spec.command)
    else:
        args = tuple(image.config.entrypoint) + (tuple(spec.command) or tuple(image.config.cmd))
    if not args:
        raise ExecutorError("no command to run: the image has no entrypoint or cmd; give one after the image name")
    env: dict[str, str] = {}
    for item in (*image.config.env, *spec.env):
        key, _, value = item.partition("=")
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH.partition("=")[2])
    env.setdefault("HOSTNAME", spec.hostname or spec.name)
    return ContainerConfig(
        id=cid,
        name=spec.name,
        hostname=spec.hostname or spec.name,
        layers=image.layers,
        args=args,
        env=tuple(f"{k}={v}" for k, v in env.items()),
        workdir=spec.workdir or image.config.workdir or "/",
        memory_bytes=spec.memory_bytes,
        nano_cpus=spec.nano_cpus,
        pids_limit=spec.pids_limit,
        labels=dict(spec.labels),
        **run_options(spec, image.config.user),
        log_max_size_bytes=spec.log_max_size_bytes,  # issue 3a
        log_max_files=spec.log_max_files or 1,
    )


def run_options(spec: t.ContainerSpec, image_user: str) -> dict[str, Any]:
    """issue 3b: the ContainerConfig fields for privileges, more cgroup limits and mounts, from the spec
    (the image's USER unless --user); a bad option is an ExecutorError whose message is for the user."""
    from agent.runtime.mounts import MountError, parse_tmpfs, parse_volume
    from agent.runtime.security import Security, SecurityError, parse_ulimit

    try:
        security = Security(
            cap_add=tuple(spec.cap_add), cap_drop=tuple(spec.cap_drop), privileged=spec.privileged,
            read_only=spec.read_only, user=spec.user or image_user,
            ulimits=tuple(map(parse_ulimit, spec.ulimits)),
        )
        mounts = tuple(map(parse_volume, spec.volumes)) + tuple(map(parse_tmpfs, spec.tmpfs))
    except (SecurityError, MountError) as exc:
        raise ExecutorError(str(exc)) from exc
    return {
        "security": security, "memory_swap_bytes": spec.memory_swap_bytes, "cpu_shares": spec.cpu_shares,
        "cpuset_cpus": spec.cpuset_cpus, "mounts": mounts,
    }


NOT_USER_NETWORKS = ("", "bridge", "host", "none")


class Worker:
    def __init__(
        self,
        executor: Executor,
        images: Images,
        reporter: Reporter,
        metrics: AgentMetrics,
        state_dir: Path,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        network: HostNetwork | None = None,
    ) -> None:
        self.network = network
        self.dns: DnsServer | None = None  # issue 5 (names): set by main; containers' resolv.conf names it
        self.executor = executor
        self.images = images
        self.reporter = reporter
        self.metrics = metrics
        self.clock = clock
        self.assignments: dict[str, t.Assignment] = {}
        self.info: dict[str, ContainerInfo] = {}
        self._record = RunRecord(state_dir)  # issue 6: generations started and restart counts, one file
        if reporter.order is None:  # issue 6 (order): statuses numbered across this host's agent restarts
            reporter.order = ReportOrder(state_dir)
        self._started = self._record.started  # read here, changed through self._record
        self._loop = LoopRef()  # issue 6 (throughput): tasks and wakes without a getpid(2) each
        self._wake: dict[str, Wake] = {}
        self._actors: dict[str, asyncio.Task[None]] = {}
        self._synced = False
        self._changed = asyncio.Event()
        # restart policies (issue 3a)
        self._sleep = sleep
        self._restarts: dict[str, RestartTracker] = {}
        self._restart_due: set[str] = set()
        self._decided: dict[str, int] = {}  # finished_at_ns of the exit whose restart was decided
        self._restart_tasks: dict[str, asyncio.Task[None]] = {}
        self._manually_stopped: set[str] = set()  # killed by a user: no policy restarts it
        self._early_exits: dict[str, ContainerInfo] = {}

    async def load(self) -> None:
        """Adopt what this host already runs (after an agent restart): nothing is started or stopped here."""
        for info in await self.executor.list():
            self.info[info.id] = info
        self.metrics.running.set_function(
            lambda: sum(1 for i in self.info.values() if i.state == ProcessState.RUNNING)
        )

    # ---- assignments ------------------------------------------------------------------------------

    def apply(self, msg: d.AssignmentsMessage) -> None:
        if msg.kind == d.AssignmentsMessage.COMPLETE:
            wanted = {c.container_id for c in msg.changes if c.action == d.AssignmentChange.UPDATE}
            for cid in set(self.assignments) | set(self.info):
                if cid not in wanted:
                    self.assignments.pop(cid, None)
                    self._poke(cid)
            self._synced = True
        for change in msg.changes:
            if change.action == d.AssignmentChange.UPDATE:
                self.assignments[change.container_id] = change.assignment
            else:
                self.assignments.pop(change.container_id, None)
            self._poke(change.container_id)
        if msg.kind == d.AssignmentsMessage.COMPLETE:
            # Tell the controller the truth about every assigned container (one may have exited while this
            # agent was down); the actors correct anything that is not as desired.
            for cid, a in self.assignments.items():
                status = self._observed(cid, a)
                if status is not None:
                    self.reporter.report(cid, status)

    def _observed(self, cid: str, a: t.Assignment) -> t.ContainerStatus | None:
        info = self.info.get(cid)
        gen = self._started.get(cid, 0)
        if info is None or (gen < a.generation and a.desired_state == t.DESIRED_RUNNING):
            return None
        return self._status_of(info, gen)

    def _status_of(self, info: ContainerInfo, generation: int) -> t.ContainerStatus:
        tracker = self._restarts.get(info.id)
        restarts = tracker.restart_count if tracker is not None else self._saved_restarts(info.id)
        if info.state == ProcessState.RUNNING:
            status = t.ContainerStatus(
                state=t.STATE_RUNNING, pid=info.pid, started_at_ns=info.started_at_ns, generation=generation,
                restart_count=restarts, message="paused" if info.paused else "",
            )
            self._add_network(info.id, status)
            return status
        return t.ContainerStatus(
            state=t.STATE_EXITED, exit_code=info.exit_code, started_at_ns=info.started_at_ns,
            finished_at_ns=info.finished_at_ns, oom_killed=info.oom_killed, generation=generation,
            message="OOM-killed" if info.oom_killed else (f"killed by signal {info.signal}" if info.signal else ""),
            restart_count=restarts, signal=info.signal,
        )

    def _poke(self, cid: str) -> None:
        event = self._wake.get(cid)
        if event is None:
            event = self._wake[cid] = Wake(self._loop)
            self._actors[cid] = self._loop.create_task(self._actor(cid, event))
        event.set()
        self._changed.set()

    async def _actor(self, cid: str, wake: Wake) -> None:
        try:
            while True:
                await wake.wait()
                wake.clear()
                try:
                    done = await self._reconcile(cid)
                except Exception:
                    log.exception("reconciling %s", cid[:12])
                    await asyncio.sleep(1)
                    wake.set()
                    continue
                if done and not wake.is_set():
                    return
        finally:
            if self._actors.get(cid) is asyncio.current_task():
                del self._actors[cid]
                del self._wake[cid]
            self._changed.set()

    async def _reconcile(self, cid: str) -> bool:
        """One step towards the desired state. True when the container is gone for good."""
        a = self.assignments.get(cid)
        if a is None:
            self._forget_restarts(cid)
            await self.executor.remove(cid)
            if self.network is not None:
                await self.network.detach(cid)
                if self.dns is not None:
                    await serve_networks(self.dns, self.network)  # issue 5 (names): a network gone from here
            self.info.pop(cid, None)
            self._record.forget(cid)
            self.reporter.forget(cid)
            return True
        info = self.info.get(cid)
        running = info is not None and info.state == ProcessState.RUNNING
        if a.desired_state == t.DESIRED_RUNNING:
            if running:
                return False
            if cid in self._restart_due:
                self._restart_due.discard(cid)
                await self._start(cid, a)
                return False
            if self._started.get(cid, 0) >= a.generation:
                self._consider_restart(cid)  # an exit found at load: the agent or the host restarted
                return False
            tracker = self._restarts.get(cid)
            if tracker is not None:
                tracker.reset()  # a user's start
            self._record.forget_restarts(cid)
            self._manually_stopped.discard(cid)
            await self._start(cid, a)
            return False
        self._restart_due.discard(cid)
        if running:
            stopped = await self.executor.stop(cid, a.stop_timeout_s if a.stop_timeout_s > 0 else 10.0)
            self._on_exit(stopped)
            if self.network is not None:
                await self.network.quiesce(cid)  # issue 5: its address unanswered until it starts again
        elif a.generation > self._started.get(cid, 0):
            # This run was stopped before this agent started it: say so (as it was left: its last run's exit, or
            # never started), else nothing reports on this run and a `stop` waiting for its end waits for ever.
            self.reporter.report(cid, self._status_of(info, a.generation) if info is not None else t.ContainerStatus(
                state=t.STATE_CREATED, generation=a.generation, message="stopped before it started"))
        return False

    async def _start(self, cid: str, a: t.Assignment) -> None:
        t0 = time.perf_counter()
        phases = StartPhases()
        self.reporter.report(cid, t.ContainerStatus(state=t.STATE_PREPARING, generation=a.generation))
        try:
            image = await self._image(a.spec)
            config = build_config(cid, a.spec, image)
            phases.lap("image")
            netns = await self._netns(cid, a.spec)
            if netns != config.netns:
                config = dataclasses.replace(config, netns=netns)
            if self.dns is not None and self.network is not None and a.spec.network not in NOT_USER_NETWORKS:
                await serve_networks(self.dns, self.network)  # issue 5 (names): its network's DNS, now here
            config = self._network_files(config, a.spec)
            phases.lap("network")
            await self.executor.create(config)
            phases.lap("create")
            info = await self.executor.start(cid)
            phases.lap("start")
        except (ImageError, ExecutorError, NetworkError) as exc:
            self._mark_started(cid, a.generation)
            self.reporter.report(
                cid, t.ContainerStatus(state=t.STATE_FAILED, message=str(exc), generation=a.generation)
            )
            return
        self._mark_started(cid, a.generation)
        self.metrics.start_latency.observe(time.perf_counter() - t0)
        phases.observe(self.metrics)
        log.debug("container %s started in %s", cid[:12], phases)
        exited = self.info.get(cid)
        early = self._early_exits.pop(cid, None)
        if early is not None and early.pid == info.pid:
            info = early  # issue 3a: a restart that ended before start returned
        elif exited is not None and exited.pid == info.pid and exited.state == ProcessState.EXITED:
            info = exited  # it already finished while start returned
        self.info[cid] = info
        status = self._status_of(info, a.generation)
        status.image_digest = image.digest
        self.reporter.report(cid, status)
        self._consider_restart(cid)  # issue 3a: for a run that ended before start returned

    async def _image(self, spec: t.ContainerSpec) -> Image:
        """The container's image, pulled as its pull policy says (run --pull; issue 4)."""
        if spec.pull_policy == "always":
            return await self.images.pull(spec.image)
        if spec.pull_policy == "never":
            image = self.images.get(spec.image)
            if image is None:
                raise ImageNotFound(
                    f"image {spec.image} is not on this host and --pull never forbids pulling it "
                    "(berthctl pull --node HOST it first, or load it)"
                )
            return image
        return await self.images.ensure(spec.image)
    async def _netns(self, cid: str, spec: t.ContainerSpec) -> str:
        """The network namespace for ContainerConfig.netns (issue 5), set up before the container starts."""
        mode = spec.network or "bridge"
        if mode == "none":
            return ""
        if mode == "host":
            if spec.ports:
                raise NetworkError("published ports (-p) make no sense with --network host; drop -p")
            return "host"
        user = "" if mode == "bridge" else mode  # issue 5: a user network's name
        if self.network is None and not spec.ports and not user:
            return ""  # a worker without container networking (tests of other parts): only lo
        if self.network is None or not self.network.configured:
            raise NetworkError("this host has no container network: the controller gave it no subnet")
        ports = [Port(p.host_ip, p.host_port, p.container_port, p.protocol or "tcp") for p in spec.ports]
        await await_port_holders(self, cid, ports)  # issue 6: a replaced container on its way out
        return (await self.network.attach(cid, ports, user)).netns

    def _network_files(self, config: ContainerConfig, spec: t.ContainerSpec) -> ContainerConfig:
        """issue 5: /etc/hosts and /etc/resolv.conf (--add-host, --dns) bind-mounted over the image's."""
        if self.network is None or config.netns == "host":
            return config
        from agent.network import files
        from agent.runtime.mounts import Mount

        a = self.network.allocation(config.id)
        hosts, resolv = files.write(
            self.network.state_dir, config.id,
            files.hosts_text(config.hostname, spec.name, a.address if a else "", list(spec.extra_hosts)),
            files.resolv_text(list(spec.dns), nameserver=self.dns.nameserver(self.network.network_name(config.id))
                              if self.dns is not None else ""),
        )
        taken = {m.target for m in config.mounts}
        extra = tuple(Mount("bind", target, str(path)) for target, path in
                      (("/etc/hosts", hosts), ("/etc/resolv.conf", resolv)) if target not in taken)
        return dataclasses.replace(config, mounts=config.mounts + extra)

    def _add_network(self, cid: str, status: t.ContainerStatus) -> None:
        a = self.network.allocation(cid) if self.network is not None else None
        if a is None:
            return
        status.ip_address = a.address
        status.network = self.network.network_name(cid) if self.network is not None else ""  # issue 5
        for p in a.ports:
            status.ports.add(
                host_ip=p.host_ip, host_port=p.host_port, container_port=p.container_port, protocol=p.protocol
            )

    def _mark_started(self, cid: str, generation: int) -> None:
        self._record.set_started(cid, generation)

    # ---- exits ------------------------------------------------------------------------------------

    def _on_exit(self, info: ContainerInfo) -> None:
        self.info[info.id] = info
        a = self.assignments.get(info.id)
        if a is None:
            return
        self.reporter.report(info.id, self._status_of(info, self._started.get(info.id, a.generation)))
        self._changed.set()
        self._consider_restart(info.id)

    # ---- restart policies (issue 3a) ----------------------------------------------------------------

    def _consider_restart(self, cid: str) -> None:
        """Apply the container's restart policy to its latest exit, once per exit."""
        a = self.assignments.get(cid)
        info = self.info.get(cid)
        if a is None or info is None or a.desired_state != t.DESIRED_RUNNING or info.state != ProcessState.EXITED:
            return
        if self._started.get(cid, 0) < a.generation or self._decided.get(cid) == info.finished_at_ns:
            return
        if cid in self._manually_stopped:
            return
        self._decided[cid] = info.finished_at_ns
        try:
            policy = RestartPolicy.parse(a.spec.restart_policy)
        except RestartPolicyError as exc:
            log.warning("container %s: %s; not restarting it", cid[:12], exc)
            return
        tracker = self._restarts.get(cid)
        if tracker is None:  # first exit seen by this agent: go on counting where an earlier one stopped
            tracker = self._restarts[cid] = RestartTracker(policy, restart_count=self._saved_restarts(cid))
        tracker.policy = policy
        ran_s = max(0, info.finished_at_ns - info.started_at_ns) / 1e9
        delay = tracker.next_delay(info.exit_code, ran_s)
        if delay is None:
            return
        log.info("container %s exited (%d): restart %d in %.1fs (%s)", cid[:12], info.exit_code,
                 tracker.restart_count, delay, policy)
        old = self._restart_tasks.pop(cid, None)
        if old is not None:
            old.cancel()
        self._restart_tasks[cid] = asyncio.create_task(self._restart_after(cid, delay))

    async def _restart_after(self, cid: str, delay_s: float) -> None:
        await self._sleep(delay_s)
        if self._restart_tasks.get(cid) is asyncio.current_task():
            del self._restart_tasks[cid]
        tracker = self._restarts.get(cid)
        if tracker is not None:  # the restart happens now: count it for a later agent
            self._record.set_restarts(cid, tracker.restart_count)
        self._restart_due.add(cid)
        self._poke(cid)

    def _saved_restarts(self, cid: str) -> int:
        return self._record.restarts.get(cid, 0)

    def manual_stop(self, cid: str) -> None:
        """A user is killing the container (berthctl kill): its restart policy does not bring it back, as
        with docker kill; a pending restart is called off."""
        self._manually_stopped.add(cid)
        task = self._restart_tasks.pop(cid, None)
        if task is not None:
            task.cancel()
        self._restart_due.discard(cid)

    def observe(self, info: ContainerInfo) -> t.ContainerStatus | None:
        """Record and report a container's state learnt outside the exit stream (pause, unpause)."""
        a = self.assignments.get(info.id)
        known = self.info.get(info.id)
        if a is None or (known is not None and known.pid != info.pid):
            return None
        self.info[info.id] = info
        status = self._status_of(info, self._started.get(info.id, a.generation))
        self.reporter.report(info.id, status)
        self._changed.set()
        return status

    def _forget_restarts(self, cid: str) -> None:
        task = self._restart_tasks.pop(cid, None)
        if task is not None:
            task.cancel()
        self._restarts.pop(cid, None)
        self._restart_due.discard(cid)
        self._decided.pop(cid, None)
        self._manually_stopped.discard(cid)
        self._early_exits.pop(cid, None)
        self._record.forget_restarts(cid)

    async def watch_exits(self) -> None:
        async for info in self.executor.exits():
            known = self.info.get(info.id)
            if known is not None and known.pid and info.pid and known.pid != info.pid:
                if info.started_at_ns > known.started_at_ns:  # issue 3a
                    self._early_exits[info.id] = info  # a newer run, ended before its start returned
                continue  # else the exit of an earlier run
            self._on_exit(info)

    # ---- for the logs API -------------------------------------------------------------------------

    def finished(self, cid: str) -> bool:
        """True when the container will write no more output for its current run."""
        a = self.assignments.get(cid)
        if a is None:
            return self._synced
        sent = self.reporter.sent.get(cid)
        if sent is None or sent.generation < a.generation:
            return False
        return sent.state in (t.STATE_EXITED, t.STATE_FAILED)

    async def changed(self) -> None:
        """Wait for any change of state (for followers of logs)."""
        self._changed.clear()
        await self._changed.wait()
