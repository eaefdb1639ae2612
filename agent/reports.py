"""issue 6 (throughput): the agent's end of a session's Reports stream: status batches and heartbeats as
messages on one long-lived stream to the controller, each answered by an acknowledgement with its seq,
instead of a unary call per batch and per heartbeat.

`send` and `heartbeat` return once the controller has acknowledged (a batch: committed), and raise when it
did not (an error in the acknowledgement, no answer in time, the stream broken): the Reporter keeps what was
not acknowledged and sends it again, on this stream or the next session's. A broken stream fails everything
waiting on it, and `closed` (awaited by the session) ends with the failure.

`deliver` (issue 6, streams: what the session's Reporter uses) returns once the batch is written, with a future
for its acknowledgement: the controller commits a stream's lazy_ack batches in the order written and
acknowledges them together, in the next heartbeat's answer (committed_through), so a batch costs one message
instead of two and the Reporter need not wait for one batch's commit before sending the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from agent.wake import LoopRef
from berth.api import dispatcher_pb2 as d
from berth.api import dispatcher_pb2_grpc

STALL_S = 30.0  # a status batch unanswered for longer ends the session (the controller is stuck)


class ReportError(ConnectionError):
    """The controller did not record a batch of statuses (send it again)."""


class ReportStream:
    """One session's Reports stream (open it after the session's Join)."""

    def __init__(self, stub: dispatcher_pb2_grpc.DispatcherAsyncStub, node_id: str) -> None:
        self.node_id = node_id
        self._call = stub.Reports()  # type: ignore[call-arg]  # written to with write(): no request iterator
        self._writing = asyncio.Lock()  # one write at a time on a stream
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[d.ReportsAck]] = {}
        self._batches: dict[int, float] = {}  # seq -> when sent, of the batches not answered yet
        self._lazy: dict[int, asyncio.Future[None]] = {}  # issue 6 (streams): lazy_ack batches written, in seq order
        self.stall_s = STALL_S
        self._failure: BaseException | None = None
        self._loop = LoopRef()  # issue 6 (throughput): a future per batch without a getpid(2) each
        self.closed = self._loop.create_task(self._read())

    async def send(self, report: d.StatusReport) -> None:
        """Deliver a batch of statuses: returns once the controller has recorded them. It waits as long as the
        stream lives: a batch not answered for `stall_s` fails the next heartbeat, which ends the session."""
        ack = await self._request(d.ReportsRequest(node_id=self.node_id, updates=report.updates), None)
        if ack.error:
            raise ReportError(f"the controller did not record the statuses: {ack.error}")

    async def deliver(self, report: d.StatusReport) -> asyncio.Future[None]:
        """issue 6 (streams): write a batch of statuses to be acknowledged lazily. Returns once it is written,
        with a future done once the controller has recorded it (a committed_through that covers it), failed
        when the stream breaks first (then this batch, and any written after it, may or may not be recorded:
        send them again). A batch not acknowledged for `stall_s` fails the next heartbeat, as with `send`."""
        if self._failure is not None:
            raise ConnectionError(f"reports stream broken: {self._failure}")
        self._seq += 1
        seq = self._seq
        acked: asyncio.Future[None] = self._loop.create_future()
        self._lazy[seq] = acked
        self._batches[seq] = time.monotonic()
        try:
            async with self._writing:
                await self._call.write(d.ReportsRequest(node_id=self.node_id, seq=seq, updates=report.updates,
                                                        lazy_ack=True))
        except BaseException as exc:
            self._lazy.pop(seq, None)
            self._batches.pop(seq, None)
            acked.cancel()
            if isinstance(exc, asyncio.CancelledError):
                task = asyncio.current_task()
                if task is None or not task.cancelling():
                    raise ConnectionError("reports stream closed") from None  # grpc's word for a cancelled call
            raise
        return acked

    @property
    def unacknowledged(self) -> int:
        """How many lazy_ack batches written on this stream are not acknowledged yet."""
        return len(self._lazy)

    def _committed_through(self, seq: int) -> None:
        while self._lazy:
            first = next(iter(self._lazy))
            if first > seq:
                break
            acked = self._lazy.pop(first)
            self._batches.pop(first, None)
            if not acked.done():
                acked.set_result(None)

    async def heartbeat(self, timeout: float) -> int:
        """Keep the node's lease alive; returns its TTL in seconds."""
        if self._batches and time.monotonic() - min(self._batches.values()) > self.stall_s:
            raise ConnectionError(f"a status batch has had no answer for over {self.stall_s:g}s")
        return (await self._request(d.ReportsRequest(node_id=self.node_id, heartbeat=True), timeout)).lease_ttl_s

    async def _request(self, request: d.ReportsRequest, timeout: float | None) -> d.ReportsAck:
        if self._failure is not None:
            raise ConnectionError(f"reports stream broken: {self._failure}")
        self._seq += 1
        request.seq = seq = self._seq
        answer: asyncio.Future[d.ReportsAck] = self._loop.create_future()
        self._waiting[seq] = answer
        if timeout is None:
            self._batches[seq] = time.monotonic()
        try:
            try:
                async with self._writing:
                    await self._call.write(request)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                raise ConnectionError("reports stream closed") from None  # grpc's word for a cancelled call
            return await (answer if timeout is None else asyncio.wait_for(answer, timeout))
        except TimeoutError:
            raise ConnectionError(f"no answer from the controller within {timeout:g}s") from None
        finally:
            self._waiting.pop(seq, None)
            self._batches.pop(seq, None)

    async def _read(self) -> None:
        try:
            async for ack in self._call:
                if ack.committed_through:
                    self._committed_through(ack.committed_through)
                answer = self._waiting.get(ack.seq)
                if answer is not None and not answer.done():
                    answer.set_result(ack)
            raise ConnectionError("the controller ended the reports stream")
        except BaseException as exc:
            self._failure = exc
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(ConnectionError(f"reports stream broken: {exc}"))
            lazy, self._lazy = self._lazy, {}
            for acked in lazy.values():
                if not acked.done():
                    acked.set_exception(ConnectionError(f"reports stream broken: {exc}"))
            raise

    async def close(self) -> None:
        """End the stream (the session is over); anything waiting on it fails."""
        if self._failure is None:
            self._failure = ConnectionError("the session ended")
        self._call.cancel()
        self.closed.cancel()
        with contextlib.suppress(BaseException):
            await self.closed
