"""issue 6 (throughput): the agent's end of a session's Reports stream: status batches and heartbeats as
messages on one long-lived stream to the controller, each answered by an acknowledgement with its seq,
instead of a unary call per batch and per heartbeat.

`send` and `heartbeat` return once the controller has acknowledged (a batch: committed), and raise when it
did not (an error in the acknowledgement, no answer in time, the stream broken): the Reporter keeps what was
not acknowledged and sends it again, on this stream or the next session's. A broken stream fails everything
waiting on it, and `closed` (awaited by the session) ends with the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from berth.api import dispatcher_pb2 as d
from berth.api import dispatcher_pb2_grpc


class ReportError(ConnectionError):
    """The controller did not record a batch of statuses (send it again)."""


class ReportStream:
    """One session's Reports stream (open it after the session's Join)."""

    def __init__(self, stub: dispatcher_pb2_grpc.DispatcherAsyncStub, node_id: str) -> None:
        self.node_id = node_id
        self._outbox: asyncio.Queue[d.ReportsRequest] = asyncio.Queue()
        self._call = stub.Reports(self._requests())
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[d.ReportsAck]] = {}
        self._failure: BaseException | None = None
        self.closed = asyncio.create_task(self._read())

    async def send(self, report: d.StatusReport, timeout: float = 10.0) -> None:
        """Deliver a batch of statuses: returns once the controller has recorded them."""
        ack = await self._request(d.ReportsRequest(node_id=self.node_id, updates=report.updates), timeout)
        if ack.error:
            raise ReportError(f"the controller did not record the statuses: {ack.error}")

    async def heartbeat(self, timeout: float) -> int:
        """Keep the node's lease alive; returns its TTL in seconds."""
        return (await self._request(d.ReportsRequest(node_id=self.node_id, heartbeat=True), timeout)).lease_ttl_s

    async def _request(self, request: d.ReportsRequest, timeout: float) -> d.ReportsAck:
        if self._failure is not None:
            raise ConnectionError(f"reports stream broken: {self._failure}")
        self._seq += 1
        request.seq = seq = self._seq
        answer: asyncio.Future[d.ReportsAck] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = answer
        try:
            self._outbox.put_nowait(request)
            return await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            raise ConnectionError(f"no answer from the controller within {timeout:g}s") from None
        finally:
            self._waiting.pop(seq, None)

    async def _requests(self) -> AsyncIterator[d.ReportsRequest]:
        while True:
            yield await self._outbox.get()

    async def _read(self) -> None:
        try:
            async for ack in self._call:
                answer = self._waiting.get(ack.seq)
                if answer is not None and not answer.done():
                    answer.set_result(ack)
            raise ConnectionError("the controller ended the reports stream")
        except BaseException as exc:
            self._failure = exc
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(ConnectionError(f"reports stream broken: {exc}"))
            raise

    async def close(self) -> None:
        """End the stream (the session is over); anything waiting on it fails."""
        self._call.cancel()
        self.closed.cancel()
        with contextlib.suppress(BaseException):
            await self.closed
