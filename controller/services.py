"""Services (issue 6): N replicas of a container template, or one per host (global), kept running by the
leader, and rolling updates with rollback; plus the API's service RPCs (a mixin of the control servicer).

The reconciler is stateless, like swarmkit's updater driven by the store: each leader sweep compares a
service's slots with its containers (tasks) in etcd and takes the next step, so a new leader resumes an
update where the old one stopped.

- Slots are "1".."replicas" (replicated) or the ids of the hosts that fit (global). An empty slot gets a task
  of the current version; a slot no longer wanted loses its tasks; a task that ended is replaced after
  RESTART_DELAY_S (outside an update).
- An update gives a new version; a rollback goes back to the previous one (whose containers are kept).
  Tasks of another version are replaced `parallelism` slots at a time
  (stop-first: the old one is removed, then the new one made; start-first: the new one is made and the old
  one removed once the new one is up). A batch counts as done when its tasks have run for `monitor_s`; the
  next starts `delay_s` after that. A new task that fails or exits during the update triggers the failure
  action: pause (stop replacing) or rollback (the previous spec and version come back, rolled out the same
  way; a rollback that fails pauses).
- issue 6: with a health check in the template, a new task counts as up only once healthy, and one that
  turns unhealthy triggers the failure action; outside an update an unhealthy task is replaced (as Swarm).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from berth import healthcheck
from berth.api import control_pb2
from berth.api import types_pb2 as t
from controller import scheduler
from controller.orchestrator import TERMINAL, Orchestrator
from controller.store import Conflict, NetworkClosed, NotFound, Store, StoreError, Versioned

log = logging.getLogger(__name__)

RESTART_DELAY_S = 5.0
DEFAULT_MONITOR_S = 5.0
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}$")
UPDATING = ("updating", "rolling_back")


def unplaceable(c: t.Container) -> bool:
    """issue 6: a task the scheduler found no host for (it says why), made in place of one that had a host."""
    return (not c.node_id and bool(c.pending_reason) and not c.replaces_unplaced
            and c.desired_state == t.DESIRED_RUNNING)


def unhealthy(c: t.Container) -> bool:
    """issue 6: running, and its health check says unhealthy."""
    return c.status.state == t.STATE_RUNNING and c.status.health.status == "unhealthy"


def effective(u: t.UpdateConfig) -> tuple[int, float, str, str, float]:
    """(parallelism, delay, order, failure action, monitor) with defaults filled in."""
    return (u.parallelism or 1, u.delay_s, u.order or "stop-first", u.failure_action or "pause",
            u.monitor_s if u.monitor_s > 0 else DEFAULT_MONITOR_S)


def validate_service(spec: t.ServiceSpec) -> str | None:
    from controller.api import validate

    if not NAME_RE.match(spec.name):
        return f"invalid service name {spec.name!r}: letters, digits, '_' and '-', at most 63"
    if spec.replicas < 0:
        return "--replicas must not be negative"
    u = spec.update
    if u.parallelism < 0 or u.delay_s < 0 or u.monitor_s < 0:
        return "--update-parallelism, --update-delay and --update-monitor must not be negative"
    if u.order not in ("", "stop-first", "start-first"):
        return f"invalid --update-order {u.order!r}: stop-first or start-first"
    if u.failure_action not in ("", "pause", "rollback"):
        return f"invalid --update-failure-action {u.failure_action!r}: pause or rollback"
    return validate(spec.template)


class ServiceReconciler:
    """The leader's part: one `reconcile` per sweep over a snapshot of the containers."""

    def __init__(self, store: Store, orchestrator: Orchestrator, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.orchestrator = orchestrator
        self.clock = clock

    async def reconcile(self, containers: list[Versioned]) -> bool:
        """One step for every service; False when there was nothing to do."""
        services = await self.store.list_services()
        known = {svc.id for svc, _ in services}
        orphans = [v.container.id for v in containers if v.container.service_id and v.container.service_id not in known]
        for cid in orphans:  # tasks of removed services
            await self.orchestrator.remove(cid)
        if not services:
            return bool(orphans)
        hosts = None
        for svc, rev in services:
            tasks = [v.container for v in containers if v.container.service_id == svc.id]
            if svc.spec.global_mode and hosts is None:
                hosts = await self.orchestrator.hosts(containers)
            try:
                await self._service(svc, rev, tasks, hosts or [])
            except Conflict:
                continue  # changed meanwhile: next sweep
            except StoreError as exc:
                log.warning("service %s: %s", svc.spec.name, exc)
        return True

    def _slots(self, svc: t.Service, hosts: list[scheduler.HostView]) -> list[str]:
        if not svc.spec.global_mode:
            return [str(i) for i in range(1, svc.spec.replicas + 1)]
        demand = scheduler.Demand.of(svc.spec.template)
        checks = (scheduler.host_ready, scheduler.schedulable, scheduler.constraints)
        return sorted(h.id for h in hosts if all(check(h, demand) is None for check in checks))

    async def _service(self, svc: t.Service, rev: int, tasks: list[t.Container],
                       hosts: list[scheduler.HostView]) -> None:
        now = self.clock()
        parallelism, delay, order, action, monitor = effective(svc.spec.update)
        slots = self._slots(svc, hosts)
        by_slot: dict[str, list[t.Container]] = {s: [] for s in slots}
        for c in tasks:
            if c.slot in by_slot:
                by_slot[c.slot].append(c)
            else:
                await self.orchestrator.remove(c.id)  # scaled down, or a host that no longer fits

        def started(c: t.Container) -> float:
            return c.status.started_at_ns / 1e9

        checked = healthcheck.enabled(svc.spec.template.healthcheck)

        def stable(c: t.Container) -> bool:  # issue 6: and healthy, when it has a health check (its own, or
            # its image's HEALTHCHECK, which only the agent knows: then its statuses carry a health)
            return (c.status.state == t.STATE_RUNNING and started(c) + monitor <= now
                    and (c.status.health.status == "healthy" or not (checked or c.status.health.status)))

        updating = svc.update_state in UPDATING
        new = [c for c in tasks if c.slot in by_slot and c.service_version == svc.version]
        if updating:
            # A new task that fails, or that cannot be placed where its predecessor could (issue 6: say, a
            # start-first successor that needs the host port its predecessor holds), fails the update.
            failed = [c for c in new if c.status.state in TERMINAL or unplaceable(c) or unhealthy(c)]
            if failed:
                await self._failed(svc, rev, failed[0], action, order)
                return
        if svc.update_state == "paused":
            return
        for slot, current in by_slot.items():
            ended = [c for c in current if c.status.state in TERMINAL and not updating
                     and now - max(c.status.finished_at_ns, c.created_at_ns) / 1e9 >= RESTART_DELAY_S]
            ended += [c for c in current if unhealthy(c) and not updating]  # issue 6: replaced, as Swarm does
            for c in ended:
                await self.orchestrator.remove(c.id)
                current.remove(c)
            if not current:
                await self._create(svc, slot)
        if not updating:
            return
        old_slots = [s for s, current in by_slot.items() if any(c.service_version != svc.version for c in current)]
        for s in old_slots:  # start-first: the old task goes once its successor is up
            fresh = [c for c in by_slot[s] if c.service_version == svc.version]
            if fresh and all(stable(c) for c in fresh):
                for c in by_slot[s]:
                    if c.service_version != svc.version:
                        await self.orchestrator.remove(c.id)
                by_slot[s] = fresh
        old_slots = [s for s in old_slots if any(c.service_version != svc.version for c in by_slot[s])]
        # issue 6: a task made for a slot whose predecessor had no host either is not waited for.
        in_flight = [c for c in new if not stable(c) and not (c.replaces_unplaced and not c.node_id)]
        if not old_slots:
            if not in_flight:
                if svc.update_state == "rolling_back":
                    svc.update_state = "rolled_back"  # the message keeps why
                else:
                    svc.update_state, svc.update_message = "completed", ""
                await self.store.put_service(svc, rev)
                log.info("service %s: update %s", svc.spec.name, svc.update_state)
            return
        if in_flight or (new and now < max(started(c) for c in new) + monitor + delay):
            return
        # The next batch: slots whose old task is not running first; a slot that has its successor already
        # is not replaced twice.
        old_slots = [s for s in old_slots if not any(c.service_version == svc.version for c in by_slot[s])]
        old_slots.sort(key=lambda s: all(c.status.state == t.STATE_RUNNING for c in by_slot[s]))
        for s in old_slots[:parallelism]:
            unplaced = all(not c.node_id for c in by_slot[s])  # issue 6: nothing to keep running meanwhile
            if order == "stop-first" or unplaced:
                for c in by_slot[s]:
                    await self.orchestrator.remove(c.id)
            await self._create(svc, s, replaces_unplaced=unplaced)

    async def _failed(self, svc: t.Service, rev: int, task: t.Container, action: str, order: str = "") -> None:
        why = task.status.message or f"exit code {task.status.exit_code}"
        message = f"task {task.spec.name} {t.ContainerState.Name(task.status.state)[6:].lower()}: {why}"
        if unhealthy(task):  # issue 6
            last = task.status.health.log[-1] if task.status.health.log else None
            detail = (last.output.strip().splitlines() or [f"exit code {last.exit_code}"])[-1] if last else ""
            retries = healthcheck.effective(task.spec.healthcheck).retries if healthcheck.enabled(
                task.spec.healthcheck) else task.status.health.failing_streak
            message = (f"task {task.spec.name} unhealthy after {retries} failed health checks"
                       + (f": {detail}" if detail else ""))
        if unplaceable(task):  # issue 6
            message = f"task {task.spec.name} cannot be placed: {task.pending_reason}"
            if order == "start-first" and " in use" in task.pending_reason:
                message += ("; start-first needs a host whose port is free while the old container still runs: "
                            "use --update-order stop-first")
        if action == "rollback" and svc.update_state == "updating" and svc.HasField("previous_spec"):
            before = t.Service()
            before.CopyFrom(svc)
            _rollback(svc)
            svc.update_state = "rolling_back"
            svc.update_message = message
            try:  # session 6: as `service update` does, not back onto a network `network rm` closed or removed
                await self.store.put_service(svc, rev, network_open=True)
            except NetworkClosed as exc:
                svc = before
                svc.update_state = "paused"
                svc.update_message = (f"{message}; not rolled back: network {exc.name!r} does not exist or is being "
                                      "removed")
                await self.store.put_service(svc, rev)
        else:
            svc.update_state = "paused"
            svc.update_message = message
            await self.store.put_service(svc, rev)
        log.warning("service %s: %s", svc.spec.name, svc.update_message)

    async def _create(self, svc: t.Service, slot: str, replaces_unplaced: bool = False) -> None:
        spec = t.ContainerSpec()
        spec.CopyFrom(svc.spec.template)
        spec.name = f"{svc.spec.name}.{slot}.{secrets.token_hex(3)}"
        spec.labels["berth.service"] = svc.spec.name
        if svc.spec.global_mode:
            spec.constraints.append(f"node.id=={slot}")
        elif not spec.restart_policy:
            spec.restart_policy = "always"  # a replica moves when its host dies
        c = t.Container(
            id=secrets.token_hex(32), spec=spec, created_at_ns=int(self.clock() * 1e9),
            desired_state=t.DESIRED_RUNNING, generation=1, stop_timeout_s=10.0,
            service_id=svc.id, slot=slot, service_version=svc.version, replaces_unplaced=replaces_unplaced,
        )
        await self.store.create_container(c)


class ServicesAPI:
    """The service RPCs, mixed into controller.api.ControlAPI."""

    store: Store
    orchestrator: Orchestrator
    clock: Callable[[], float]

    async def _service_view(self, svc: t.Service) -> t.Service:
        containers = await self.store.list_containers()
        tasks = [v.container for v in containers if v.container.service_id == svc.id]
        svc.running = sum(1 for c in tasks if c.status.state == t.STATE_RUNNING
                          and c.service_version == svc.version)
        svc.desired = svc.spec.replicas if not svc.spec.global_mode else len({c.slot for c in tasks})
        return svc

    async def CreateService(self, request: t.ServiceSpec, context: grpc.aio.ServicerContext[Any, Any]) -> t.Service:
        problem = validate_service(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        await self.check_network(request.template, context)  # type: ignore[attr-defined]  # issue 5: NetworksAPI
        svc = t.Service(id=secrets.token_hex(16), spec=request, version=1, created_at_ns=int(self.clock() * 1e9))
        try:
            await self.store.create_service(svc)
        except StoreError as exc:
            await _abort(context, exc)
        self._kick()
        return svc

    async def ListServices(self, request: control_pb2.ListServicesRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> control_pb2.ListServicesResponse:
        try:
            services = [await self._service_view(s) for s, _ in await self.store.list_services()]
        except StoreError as exc:
            await _abort(context, exc)
        return control_pb2.ListServicesResponse(services=sorted(services, key=lambda s: s.spec.name))

    async def InspectService(self, request: control_pb2.ServiceRef,
                             context: grpc.aio.ServicerContext[Any, Any]) -> t.Service:
        try:
            svc, _ = await self.store.get_service(request.ref)
            return await self._service_view(svc)
        except StoreError as exc:
            await _abort(context, exc)
            raise

    async def UpdateService(self, request: control_pb2.UpdateServiceRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> t.Service:
        if not request.rollback:
            problem = validate_service(request.spec)
            if problem:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            await self.check_network(request.spec.template, context)  # type: ignore[attr-defined]  # as CreateService
        try:
            svc, rev = await self.store.get_service(request.ref)
            if request.rollback:
                if not svc.HasField("previous_spec"):
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"service {svc.spec.name} has no previous spec to roll back to")
                _rollback(svc)
                svc.update_state, svc.update_message = "rolling_back", "rollback asked for"
            else:
                if request.spec.name != svc.spec.name:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a service cannot be renamed")
                rollout = (request.spec.template != svc.spec.template
                           or request.spec.global_mode != svc.spec.global_mode)
                if rollout:
                    svc.previous_spec.CopyFrom(svc.spec)
                    svc.previous_version = svc.version
                    svc.last_version = max(svc.last_version, svc.version) + 1
                    svc.version = svc.last_version
                    svc.update_state, svc.update_message = "updating", ""
                svc.spec.CopyFrom(request.spec)
            await self.store.put_service(svc, rev, network_open=True)  # not onto a network being removed
        except StoreError as exc:
            await _abort(context, exc)
        self._kick()
        return svc

    async def RemoveService(self, request: control_pb2.ServiceRef,
                            context: grpc.aio.ServicerContext[Any, Any]) -> t.Service:
        try:
            svc, _ = await self.store.get_service(request.ref)
            await self.store.delete_service(svc)
            for v in await self.store.list_containers():
                if v.container.service_id == svc.id:
                    await self.orchestrator.remove(v.container.id)
        except StoreError as exc:
            await _abort(context, exc)
        return svc

    def _kick(self) -> None:
        if self.orchestrator.kick is not None:
            self.orchestrator.kick.set()


def _rollback(svc: t.Service) -> None:
    """The previous spec (and its version, so its containers count as current) becomes the spec, and the
    other way round."""
    previous = t.ServiceSpec()
    previous.CopyFrom(svc.previous_spec)
    svc.previous_spec.CopyFrom(svc.spec)
    svc.spec.CopyFrom(previous)
    svc.version, svc.previous_version = svc.previous_version, svc.version


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: StoreError) -> Any:
    from controller.api import _abort as abort

    if isinstance(exc, NotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    await abort(context, exc)
