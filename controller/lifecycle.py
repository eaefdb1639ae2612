"""The control API's lifecycle verbs beyond run/start/stop (issue 3a): create (store without starting), kill
(a signal through the container's host), pause and unpause (freeze its cgroup there). Mixed into
controller.api.ControlAPI; agent errors come back as gRPC statuses whose message is for the user."""

from __future__ import annotations

import secrets
import signal
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import grpc
import grpc.aio

from berth.api import agent_pb2, control_pb2
from berth.api import types_pb2 as t
from controller.orchestrator import RM_ON
from controller.store import NameInUse, NotFound, Store, StoreError

Ctx = grpc.aio.ServicerContext[Any, Any]
AGENT_CALL_TIMEOUT_S = 30.0


def parse_signal(text: str) -> int:
    """KILL, SIGKILL, kill or 9 -> 9. Raises ValueError with a message for the user."""
    text = text.strip() or "KILL"
    if text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
        raise ValueError(f"invalid signal {text!r}: signal numbers go from 1 to {signal.NSIG - 1}")
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"invalid signal {text!r}: give a name such as TERM, HUP, USR1 or a number") from None


class _OnHost(NamedTuple):
    """A container Kill or Pause acts on, as read before its host's agent is called (session 7: an --rm one may
    be gone by the time the answer is made)."""

    cid: str
    agent: Any  # an Agent stub of its host
    container: t.Container
    node_name: str
    status: t.ContainerStatus
    read_at: int  # the etcd revision its status was read at


class LifecycleMixin:
    store: Store
    links: Any  # controller.api.AgentLinks
    clock: Callable[[], float]
    _resolve: Callable[[str, Ctx], Awaitable[str]]
    _view: Callable[[str], Awaitable[t.Container]]
    _free_name: Callable[[], Awaitable[str]]

    async def Create(self, request: control_pb2.RunRequest, context: Ctx) -> t.Container:
        from controller.api import DEFAULT_STOP_TIMEOUT_S, validate

        spec = request.spec
        problem = validate(spec)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        await self.check_network(spec, context)  # type: ignore[attr-defined]  # issue 5: NetworksAPI
        # generation 0 and desired stopped: nothing places or runs it until start makes run 1 of it.
        c = t.Container(
            id=secrets.token_hex(32), spec=spec, created_at_ns=int(self.clock() * 1e9),
            desired_state=t.DESIRED_STOPPED, generation=0, stop_timeout_s=DEFAULT_STOP_TIMEOUT_S,
        )
        try:
            if not c.spec.name:
                c.spec.name = await self._free_name()
            await self.store.create_container(c)
            return await self._view(c.id)
        except NameInUse as exc:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"{exc}: remove it (berthctl rm {exc.name}) or choose another name with --name",
            )
        except NotFound as exc:  # issue 5 (order): its network removed, or being removed, meanwhile
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        raise AssertionError

    async def _on_host(self, ref: str, context: Ctx) -> _OnHost:
        """The container as read before its host is called, and an Agent stub of its host; aborts when it is
        not running anywhere."""
        cid = await self._resolve(ref, context)
        try:
            v = await self.store.get_container(cid)
            status, read_at = await self.store.get_status(cid)
            node = await self.store.get_node(v.container.node_id) if v.container.node_id else None
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        name = v.container.spec.name
        if node is None or status.state != t.STATE_RUNNING:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"container {name} is not running")
        return _OnHost(cid, self.links.agent(node.agent_address), v.container, node.name, status, read_at)

    async def _agent_call(self, on: _OnHost, call: Awaitable[t.ContainerStatus], context: Ctx) -> t.Container:
        try:
            status = await call
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "the container's host failed")
        try:
            view = await self._view(on.cid)
        except NotFound as exc:
            if not on.container.spec.auto_remove:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            # --rm: it ended (killed, say) and was removed before this answer was made (session 7: UNAVAILABLE
            # "no such container" for a kill that worked), answered as it ended, as Stop does (eef6e84)
            return await self._as_ended(on, status)
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if status.state:  # what the host answered is newer than what it has reported so far
            view.status.CopyFrom(status)
        return view

    async def _as_ended(self, on: _OnHost, answered: t.ContainerStatus) -> t.Container:
        """An --rm container removed since `on` was read, with the status it ended with (its last of this run,
        followed on etcd from the revision it was read at; if that cannot be read, what the host answered)."""
        from controller.api import ControlAPI, StatusTracker

        tracker = StatusTracker(self.store.watch_status(on.cid, on.read_at), on.cid, None)
        try:
            ended = await tracker.wait(on.container.generation, RM_ON, timeout_s=AGENT_CALL_TIMEOUT_S)
        except (StoreError, TimeoutError):  # compacted away, or etcd failed: what is known
            ended = answered if answered.state else on.status
        finally:
            tracker.close()
        out = ControlAPI._decorate(on.container, ended, {})
        out.node_name = on.node_name
        return out

    async def Kill(self, request: control_pb2.KillRequest, context: Ctx) -> t.Container:
        try:
            sig = parse_signal(request.signal)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        on = await self._on_host(request.ref, context)
        call = on.agent.Signal(agent_pb2.AgentSignalRequest(container_id=on.cid, signal=sig),
                               timeout=AGENT_CALL_TIMEOUT_S)
        return await self._agent_call(on, call, context)

    async def _pause(self, ref: str, paused: bool, context: Ctx) -> t.Container:
        on = await self._on_host(ref, context)
        call = on.agent.Pause(agent_pb2.AgentPauseRequest(container_id=on.cid, paused=paused),
                              timeout=AGENT_CALL_TIMEOUT_S)
        return await self._agent_call(on, call, context)

    async def Pause(self, request: control_pb2.ContainerRef, context: Ctx) -> t.Container:
        return await self._pause(request.ref, True, context)

    async def Unpause(self, request: control_pb2.ContainerRef, context: Ctx) -> t.Container:
        return await self._pause(request.ref, False, context)
