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
            finished=lambda: self.worker.finished(cid),
            changed=self.worker.changed,
        ):
            yield entry
