"""The agent API, dialled by controllers: a container's logs (exec and stats come later)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from agent.executor import Executor
from agent.image_api import ImageAPI
from agent.logs import read_log
from agent.runtime.linux import LinuxExecutor
from agent.worker import Worker
from berth.api import agent_pb2, agent_pb2_grpc
from berth.api import types_pb2 as t

ASSIGNMENT_WAIT_S = 30.0


class AgentAPI(ImageAPI, agent_pb2_grpc.AgentServicer):
    def __init__(self, executor: Executor, worker: Worker) -> None:
        self.executor = executor
        self.worker = worker

    async def Logs(
        self, request: agent_pb2.AgentLogsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[t.LogEntry]:
        cid = request.container_id
        path = self.executor.log_path(cid)
        if request.follow:
            # An attach opened right after placement can arrive before the assignment does: wait for it.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + ASSIGNMENT_WAIT_S
            while cid not in self.worker.assignments and not path.exists():
                if loop.time() > deadline:
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"no container {cid[:12]} on this host")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.worker.changed(), 0.5)
        elif cid not in self.worker.assignments and cid not in self.worker.info:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no container {cid[:12]} on this host")
        async for entry in read_log(
            path,
            follow=request.follow,
            tail=request.tail,
            since_ns=request.since_ns,
            finished=lambda: self.worker.finished(cid),
            changed=self.worker.changed,
        ):
            yield entry


    # ---- issue 3a: kill -s, pause, unpause ----------------------------------------------------------

    async def _lifecycle(self, context: grpc.aio.ServicerContext[Any, Any], cid: str) -> LinuxExecutor:
        if not isinstance(self.executor, LinuxExecutor):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this host's runtime cannot signal or pause")
        if cid not in self.worker.assignments:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no container {cid[:12]} on this host")
        return self.executor

    async def Signal(
        self, request: agent_pb2.AgentSignalRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> t.ContainerStatus:
        import signal as signals

        from agent.executor import ExecutorError, ProcessState

        ex = await self._lifecycle(context, request.container_id)
        info = self.worker.info.get(request.container_id)
        if info is None or info.state != ProcessState.RUNNING:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"container {request.container_id[:12]} is not running")
        if request.signal in (signals.SIGKILL, signals.SIGTERM):
            self.worker.manual_stop(request.container_id)
        try:
            info = await ex.signal(request.container_id, request.signal)
        except ExecutorError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return self.worker.observe(info) or t.ContainerStatus()

    async def Pause(
        self, request: agent_pb2.AgentPauseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> t.ContainerStatus:
        from agent.executor import ExecutorError

        ex = await self._lifecycle(context, request.container_id)
        try:
            info = await ex.pause(request.container_id, request.paused)
        except ExecutorError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return self.worker.observe(info) or t.ContainerStatus()


class AgentAPI3b(AgentAPI):
    """issue 3b: exec and named volumes, for a host whose executor is the Linux runtime."""

    def _linux(self) -> LinuxExecutor | None:
        return self.executor if isinstance(self.executor, LinuxExecutor) else None

    async def Exec(
        self, request_iterator: AsyncIterator[t.ExecInput], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[t.ExecOutput]:
        from agent import exec_session
        from agent.runtime.exec import ExecError

        ex = self._linux()
        if ex is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this host's runtime cannot exec")
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("input") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an exec stream starts with its command")
        try:
            async for out in exec_session.run(ex, first.start, request_iterator):
                yield out
        except ExecError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    async def _volume_call(self, context: grpc.aio.ServicerContext[Any, Any], op: str, name: str,
                           labels: dict[str, str] | None = None) -> t.Volume:
        from agent.runtime.volumes import VolumeError, VolumeInUse, VolumeNotFound
        from agent.runtime.volumes import users as volume_users

        ex = self._linux()
        if ex is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this host's runtime has no volumes")
        try:
            if op == "create":
                v = await asyncio.to_thread(ex.volume_create, name, labels)
            else:
                v = ex.volume_get(name)
            used = volume_users(ex.sd.containers, name)
            if op == "remove":
                await asyncio.to_thread(ex.volume_remove, name)
        except VolumeNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except VolumeInUse as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except VolumeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return t.Volume(name=v.name, mountpoint=str(v.mountpoint), created_at_ns=v.created_at_ns,
                        labels=v.labels, used_by=used)

    async def VolumeCreate(self, request: t.VolumeRequest, context: grpc.aio.ServicerContext[Any, Any]) -> t.Volume:
        return await self._volume_call(context, "create", request.name, dict(request.labels))

    async def VolumeInspect(self, request: t.VolumeRequest, context: grpc.aio.ServicerContext[Any, Any]) -> t.Volume:
        return await self._volume_call(context, "inspect", request.name)

    async def VolumeRemove(self, request: t.VolumeRequest, context: grpc.aio.ServicerContext[Any, Any]) -> t.Volume:
        return await self._volume_call(context, "remove", request.name)

    async def VolumeList(
        self, request: t.VolumeListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> t.VolumeListResponse:
        from agent.runtime.volumes import users as volume_users

        ex = self._linux()
        if ex is None:
            return t.VolumeListResponse()
        return t.VolumeListResponse(volumes=[
            t.Volume(name=v.name, mountpoint=str(v.mountpoint), created_at_ns=v.created_at_ns, labels=v.labels,
                     used_by=volume_users(ex.sd.containers, v.name))
            for v in ex.volume_list()
        ])
