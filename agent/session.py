"""The agent's session with a controller: join, heartbeats, the assignment stream and status reports.

Status reports and heartbeats go on the session's Reports stream (agent.reports, issue 6).

The session survives controller restarts and failover: on any failure it reconnects (to the next
controller in its list, with capped back-off), joins again, and resumes the assignment stream after the
last revision it saw; a controller that cannot resume answers ABORTED and the agent starts from a
complete set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Collection
from typing import TypeVar

import grpc
import grpc.aio

from agent.metrics import AgentMetrics
from agent.reports import ReportStream
from agent.worker import Reporter, Worker
from berth import rpc
from berth.api import dispatcher_pb2 as d
from berth.api import dispatcher_pb2_grpc

log = logging.getLogger(__name__)

M = TypeVar("M")  # a message of a followed stream


class Session:
    def __init__(
        self, controllers: list[str], join: d.JoinRequest, worker: Worker, reporter: Reporter,
        metrics: AgentMetrics,
        on_join: Callable[[d.JoinResponse], Awaitable[None]] | None = None,
        on_peers: Callable[[Collection[d.NetworkPeer]], Awaitable[None]] | None = None,
        on_names: Callable[[d.NamesMessage], Awaitable[None]] | None = None,
    ) -> None:
        self.on_names = on_names  # issue 5 (names): the containers' DNS records, from the Names stream
        self.on_peers = on_peers  # issue 5: the overlay's whole peer set, kept from the controller's Peers stream
        self.on_join = on_join  # issue 5: set up the host's container network before any assignment
        if not controllers:
            raise ValueError("no controller address given")
        self.controllers = controllers
        self.join = join
        self.worker = worker
        self.reporter = reporter
        self.metrics = metrics
        self.node_id = ""
        self.revision = 0
        self._stub: dispatcher_pb2_grpc.DispatcherAsyncStub | None = None
        self._reports: ReportStream | None = None  # issue 6: the session's status reports and heartbeats
        self.joined = asyncio.Event()

    async def _send(self, report: d.StatusReport) -> asyncio.Future[None]:
        if self._reports is None:
            raise ConnectionError("no controller session")
        return await self._reports.deliver(report)  # issue 6 (streams): acknowledged with the next heartbeat

    async def run(self) -> None:
        reporter = asyncio.create_task(self.reporter.run(self._send, lambda: self.node_id if self._stub else ""))
        try:
            attempt = 0
            backoff = 0.1
            while True:
                address = self.controllers[attempt % len(self.controllers)]
                attempt += 1
                try:
                    await self._session(address)
                    backoff = 0.1
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.ABORTED:
                        self.revision = 0
                    log.warning("session with %s: %s %s", address, exc.code().name, exc.details())
                except ConnectionError as exc:
                    log.warning("session with %s: %s", address, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        finally:
            reporter.cancel()

    async def _session(self, address: str) -> None:
        channel = rpc.aio_channel(address)
        stub = dispatcher_pb2_grpc.DispatcherStub(channel)
        heartbeat: asyncio.Task[None] | None = None
        peers: asyncio.Task[None] | None = None
        names: asyncio.Task[None] | None = None
        reports: ReportStream | None = None
        try:
            reply = await stub.Join(self.join, timeout=5)
            if self.on_join is not None:
                await self.on_join(reply)
            self.node_id = reply.node_id
            self._stub = stub
            self._reports = reports = ReportStream(stub, self.node_id)
            self.metrics.connected.set(1)
            self.joined.set()
            log.info("joined controller %s as %s", address, self.node_id)
            heartbeat = asyncio.create_task(self._heartbeats(reports, reply.heartbeat_period_s))
            if self.on_peers is not None:
                peers = asyncio.create_task(self._peers(stub))
            if self.on_names is not None:
                names = asyncio.create_task(self._names(stub))
            stream = stub.Assignments(d.AssignmentsRequest(node_id=self.node_id, after_revision=self.revision))
            self.reporter.flush()  # deliver whatever queued up while disconnected
            reader = asyncio.create_task(self._read(stream))
            done, _ = await asyncio.wait({heartbeat, reader, reports.closed}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the failure that ended the session
            raise ConnectionError("assignment stream ended")
        finally:
            self._stub = None
            self._reports = None
            self.metrics.connected.set(0)
            if reports is not None:
                await reports.close()
            if heartbeat is not None:
                heartbeat.cancel()
            if peers is not None:
                peers.cancel()
            if names is not None:
                names.cancel()
            with contextlib.suppress(Exception):
                await channel.close(None)

    async def _read(self, stream: object) -> None:
        async for msg in stream:  # type: ignore[attr-defined]
            self.worker.apply(msg)
            self.revision = msg.revision

    async def network_attach(self, cid: str) -> d.NetworkAttachment:
        """issue 5: a container's address on its user network and this host's gateway on it, from the controller."""
        if self._stub is None:
            raise ConnectionError("not connected to a controller")
        return await self._stub.NetworkAttach(d.NetworkAttachRequest(node_id=self.node_id, container_id=cid),
                                              timeout=10)

    async def _peers(self, stub: dispatcher_pb2_grpc.DispatcherAsyncStub) -> None:
        """issue 5: follow the Peers stream for the session's life (an older controller: no overlay). issue 6:
        the stream sends the changes after its first (whole) set; on_peers gets the whole set kept here."""
        on_peers = self.on_peers
        assert on_peers is not None
        known: dict[str, d.NetworkPeer] = {}

        async def apply(msg: d.PeersMessage) -> None:
            if not msg.delta:  # a whole set: every (re)connection's first, and all from an older controller
                known.clear()
            for node_id in msg.removed:
                known.pop(node_id, None)
            known.update((p.node_id, p) for p in msg.peers)
            await on_peers(known.values())

        await _follow(lambda: stub.Peers(d.PeersRequest(node_id=self.node_id, deltas=True)), apply, "peers",
                      "applying the overlay's peers")

    async def _names(self, stub: dispatcher_pb2_grpc.DispatcherAsyncStub) -> None:
        """issue 5 (names): follow the Names stream for the session's life; each (re)connection starts with the
        whole table. An older controller has none: an empty table, so everything is forwarded."""
        on_names = self.on_names
        assert on_names is not None
        await _follow(lambda: stub.Names(d.NamesRequest(node_id=self.node_id)), on_names, "names",
                      "applying the DNS records", unimplemented=lambda: on_names(d.NamesMessage()))

    async def _heartbeats(self, reports: ReportStream, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            await reports.heartbeat(timeout=max(period_s, 2.0))


async def _follow(open_stream: Callable[[], AsyncIterable[M]], apply: Callable[[M], Awaitable[None]],
                     what: str, applying: str,
                     unimplemented: Callable[[], Awaitable[None]] | None = None) -> None:
    """Follow a server stream of the session for its life: each message applied (a failure logged, the
    stream goes on), a broken stream opened again after a second; a controller without the RPC ends it
    (after `unimplemented`, if given)."""
    while True:
        try:
            async for msg in open_stream():
                try:
                    await apply(msg)
                except Exception:
                    log.exception(applying)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                if unimplemented is not None:
                    await unimplemented()
                return
            log.warning("%s stream: %s %s", what, exc.code().name, exc.details())
        await asyncio.sleep(1.0)
