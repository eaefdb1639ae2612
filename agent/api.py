"""The agent API, dialled by controllers: a container's logs (exec and stats come later)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from agent.executor import Executor
from agent.logs import read_log
from agent.worker import Worker
from berth.api import agent_pb2, agent_pb2_grpc
from berth.api import types_pb2 as t


class AgentAPI(agent_pb2_grpc.AgentServicer):
    def __init__(self, executor: Executor, worker: Worker) -> None:
        self.executor = executor
        self.worker = worker

    async def Logs(
        self, request: agent_pb2.AgentLogsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[t.LogEntry]:
        cid = request.container_id
        if cid not in self.worker.assignments and cid not in self.worker.info and not request.follow:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no container {cid[:12]} on this host")
        async for entry in read_log(
            self.executor.log_path(cid),
            follow=request.follow,
            tail=request.tail,
            finished=lambda: self.worker.finished(cid),
            changed=self.worker.changed,
        ):
            yield entry
