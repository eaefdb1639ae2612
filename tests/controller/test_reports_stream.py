"""issue 6 (throughput): the Reports stream between an agent (agent.reports.ReportStream under the agent's real
Reporter) and the controller's Dispatcher, over real gRPC and a real etcd: a batch is acknowledged once its
statuses are committed, heartbeats keep the node's lease alive on the same stream, a batch the controller
failed to record is sent again, and what was in flight when a controller died reaches the next controller,
a RUNNING still ahead of what followed it."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest

from agent.reports import ReportStream
from agent.worker import Reporter
from berth.api import dispatcher_pb2 as d
from berth.api import dispatcher_pb2_grpc
from berth.api import types_pb2 as t
from controller.dispatcher import Dispatcher
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import Store
from tests.controller.conftest import cache_on, dispatcher_on, until


@dataclass
class Serving:
    store: Store
    orchestrator: Orchestrator
    server: grpc.aio.Server
    stub: dispatcher_pb2_grpc.DispatcherAsyncStub


@asynccontextmanager
async def _controller(url: str) -> AsyncIterator[Serving]:
    """A controller's dispatcher (with its cache, as the controller runs it) served on loopback; every berth key
    is deleted on the way out (conftest's cache_on)."""
    async with cache_on(url) as (store, cache, _):
        orchestrator = Orchestrator(store, ControllerMetrics())
        orchestrator.cache = cache
        async with dispatcher_on(store, orchestrator, lease_ttl_s=10) as (server, stub):
            yield Serving(store, orchestrator, server, stub)


async def _container(serving: Serving) -> str:
    """A new container (generation 1) as the controller's cache sees it."""
    cid = secrets.token_hex(32)
    await serving.store.create_container(t.Container(
        id=cid, spec=t.ContainerSpec(name=f"r-{cid[:8]}", image="busybox"), desired_state=t.DESIRED_RUNNING,
        generation=1))
    await until(lambda: serving.orchestrator.cache is not None and serving.orchestrator.cache.container(cid),
                 "the container in the cache")
    return cid


def _report(cid: str, state: int, generation: int = 1) -> d.StatusReport:
    status = t.ContainerStatus(state=state, generation=generation)  # type: ignore[arg-type]
    return d.StatusReport(node_id="n1", updates=[d.ContainerStatusUpdate(container_id=cid, status=status)])


async def _one_stream(url: str) -> None:
    async with _controller(url) as ctl:
        joined = await ctl.stub.Join(d.JoinRequest(name="n1", address="127.0.0.1"), timeout=10)
        cid = await _container(ctl)
        stream = ReportStream(ctl.stub, joined.node_id)
        try:
            await stream.send(_report(cid, t.STATE_RUNNING))  # acknowledged: committed
            status, _ = await ctl.store.get_status(cid)
            assert status.state == t.STATE_RUNNING
            assert 0 < await stream.heartbeat(timeout=10) <= 10
            await stream.send(_report(cid, t.STATE_PREPARING, generation=0))  # an older run's: dropped
            status, _ = await ctl.store.get_status(cid)
            assert status.state == t.STATE_RUNNING
        finally:
            await stream.close()
        with pytest.raises(ConnectionError, match="reports stream broken"):
            await stream.send(_report(cid, t.STATE_EXITED))  # a closed stream delivers nothing

        # A heartbeat of a node that never joined ends the stream: the agent joins again.
        stranger = ReportStream(ctl.stub, "nobody")
        try:
            with pytest.raises(ConnectionError, match="join first"):
                await stranger.heartbeat(timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stranger.closed
            assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await stranger.close()


def test_statuses_are_acknowledged_once_committed_and_heartbeats_share_the_stream(etcd_url: str) -> None:
    asyncio.run(_one_stream(etcd_url))


async def _failed_batch(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reporter = Reporter()
    async with _controller(url) as ctl:
        cid = await _container(ctl)
        stream = ReportStream(ctl.stub, "n1")
        failures = []
        put_statuses = ctl.store.put_statuses

        async def fails_once(items: list[tuple[str, t.ContainerStatus, int]]) -> int:
            if not failures:
                failures.append(items)
                raise RuntimeError("etcd said no")
            return await put_statuses(items)

        monkeypatch.setattr(ctl.store, "put_statuses", fails_once)
        task = asyncio.create_task(reporter.run(stream.send, lambda: "n1"))
        try:
            reporter.report(cid, t.ContainerStatus(state=t.STATE_RUNNING, generation=1))
            state = t.STATE_ASSIGNED
            deadline = time.monotonic() + 20
            while state != t.STATE_RUNNING:
                assert time.monotonic() < deadline, "the failed batch was not sent again"
                await asyncio.sleep(0.05)
                state = (await ctl.store.get_status(cid))[0].state
            assert len(failures) == 1  # it did fail once, and was recorded on the next try
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stream.close()


def test_a_batch_the_controller_failed_to_record_is_sent_again(etcd_url: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_failed_batch(etcd_url, monkeypatch))


async def _failover(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reporter = Reporter()
    streams: list[ReportStream] = []

    async def send(report: d.StatusReport) -> None:
        await streams[-1].send(report)

    task = asyncio.create_task(reporter.run(send, lambda: "n1"))
    try:
        async with _controller(url) as first, _controller(url) as second:
            cid = await _container(first)
            await until(lambda: second.orchestrator.cache is not None and second.orchestrator.cache.container(cid),
                         "the container in the second controller's cache")
            # The first controller takes the RUNNING batch and never commits it (it dies mid-commit).
            received: list[list[tuple[str, int]]] = []
            never = asyncio.Event()

            async def stuck(updates: list[tuple[str, t.ContainerStatus]]) -> None:
                received.append([(c, s.state) for c, s in updates])
                await never.wait()

            monkeypatch.setattr(first.orchestrator, "record_statuses", lambda updates: asyncio.ensure_future(
                stuck(updates)))
            committed: list[list[tuple[str, int]]] = []
            record_statuses = second.orchestrator.record_statuses

            async def recorded(updates: list[tuple[str, t.ContainerStatus]]) -> None:
                await record_statuses(updates)
                committed.append([(c, s.state) for c, s in updates])

            monkeypatch.setattr(second.orchestrator, "record_statuses", lambda updates: asyncio.ensure_future(
                recorded(updates)))
            streams.append(ReportStream(first.stub, "n1"))
            reporter.report(cid, t.ContainerStatus(state=t.STATE_RUNNING, generation=1))
            await until(lambda: received, "the first controller to get the RUNNING batch")
            reporter.report(cid, t.ContainerStatus(state=t.STATE_EXITED, generation=1, exit_code=3))  # exits at once
            await first.server.stop(0)  # the first controller dies
            await until(streams[0].closed.done, "the broken stream")
            streams.append(ReportStream(second.stub, "n1"))  # the session's next controller
            reporter.flush()
            await until(lambda: len(committed) == 2, "both statuses at the second controller")
            assert committed == [[(cid, t.STATE_RUNNING)], [(cid, t.STATE_EXITED)]]
            status, _ = await second.store.get_status(cid)
            assert (status.state, status.exit_code) == (t.STATE_EXITED, 3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for stream in streams:
            await stream.close()


def test_reports_in_flight_when_a_controller_dies_reach_the_next_one_running_first(
        etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_failover(etcd_url, monkeypatch))


async def _unanswered(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with _controller(url) as ctl:
        never = asyncio.Event()

        async def stuck(node_id: str) -> int:
            await never.wait()
            return 0

        stream = ReportStream(ctl.stub, "n1")
        try:
            monkeypatch.setattr(Dispatcher, "_keep_alive", lambda _self, node_id: stuck(node_id))
            # As a broken connection (which the session handles by starting over), not a TimeoutError.
            with pytest.raises(ConnectionError, match=r"no answer from the controller within 0\.2s"):
                await stream.heartbeat(timeout=0.2)
        finally:
            await stream.close()


def test_a_heartbeat_not_answered_in_time_is_a_lost_connection(etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_unanswered(etcd_url, monkeypatch))


async def _stalled(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reporter = Reporter()
    async with _controller(url) as ctl:
        cid = await _container(ctl)
        never = asyncio.Event()
        received: list[object] = []

        async def stuck(updates: list[tuple[str, t.ContainerStatus]]) -> None:
            received.append(updates)
            await never.wait()

        monkeypatch.setattr(ctl.orchestrator, "record_statuses", lambda updates: asyncio.ensure_future(stuck(updates)))
        await ctl.stub.Join(d.JoinRequest(name="n1", address="127.0.0.1"), timeout=10)
        stream = ReportStream(ctl.stub, "n1")
        task = asyncio.create_task(reporter.run(stream.send, lambda: "n1"))
        try:
            reporter.report(cid, t.ContainerStatus(state=t.STATE_RUNNING, generation=1))
            await until(lambda: received, "the batch at the controller")
            assert await stream.heartbeat(timeout=10) > 0  # waiting for less than stall_s: not stalled
            stream.stall_s = 0.05
            deadline = time.monotonic() + 20
            while True:  # a heartbeat once the batch has waited for longer fails: the session ends
                try:
                    await stream.heartbeat(timeout=10)
                except ConnectionError as exc:
                    assert "a status batch has had no answer for over 0.05s" in str(exc)
                    break
                assert time.monotonic() < deadline, "heartbeats went on with a batch stuck"
                await asyncio.sleep(0.02)
            await stream.close()
            # The batch is kept for the next session; the reporter is still there to send it.
            await until(lambda: cid in reporter._pending, "the batch back in the reporter")
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stream.close()


def test_a_batch_stuck_at_the_controller_ends_the_session_and_is_kept(etcd_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_stalled(etcd_url, monkeypatch))


async def _caller_gone(url: str) -> None:
    async with _controller(url) as ctl:
        gone, kept = await _container(ctl), await _container(ctl)
        before, _ = await ctl.store.get_status(gone)
        orchestrator = ctl.orchestrator
        held: list[None] = []
        orchestrator._flush_reports = lambda: held.append(None)  # type: ignore[method-assign]  # commits wait
        report = asyncio.create_task(orchestrator.on_statuses(
            [(gone, t.ContainerStatus(state=t.STATE_RUNNING, generation=1))]))
        await until(lambda: orchestrator._reports, "the report queued for the group commit")
        report.cancel()  # its agent's stream ended: the agent will send it again, maybe elsewhere
        await asyncio.gather(report, return_exceptions=True)
        del orchestrator._flush_reports
        orchestrator._flush_reports()  # the group commit that was held
        await orchestrator.on_statuses([(kept, t.ContainerStatus(state=t.STATE_RUNNING, generation=1))])
        assert (await ctl.store.get_status(kept))[0].state == t.STATE_RUNNING
        assert (await ctl.store.get_status(gone))[0] == before  # not written late


def test_a_queued_report_whose_caller_is_gone_is_not_written(etcd_url: str) -> None:
    asyncio.run(_caller_gone(etcd_url))


# ---- issue 6 (streams): lazy acknowledgements ---------------------------------------------------------------


def _status(cid: str, state: int, seq: int) -> d.StatusReport:
    status = t.ContainerStatus(state=state, generation=1, seq=seq)  # type: ignore[arg-type]
    return d.StatusReport(node_id="n1", updates=[d.ContainerStatusUpdate(container_id=cid, status=status)])


async def _lazy_acks(url: str) -> None:
    async with _controller(url) as ctl:
        await ctl.stub.Join(d.JoinRequest(name="n1", address="127.0.0.1"), timeout=10)
        cids = [await _container(ctl) for _ in range(3)]
        stream = ReportStream(ctl.stub, "n1")
        try:
            acked = [await stream.deliver(_status(cid, t.STATE_RUNNING, 1)) for cid in cids]
            for cid in cids:  # each written batch is committed without waiting for an ack of the one before
                await until(lambda cid=cid: ctl.orchestrator.cache is not None
                            and (held := ctl.orchestrator.cache.statuses.get(cid)) is not None
                            and held[0].state == t.STATE_RUNNING, "the status committed")
            assert not any(a.done() for a in acked)  # no ack of their own (the controller's backstop is 1 h off)
            assert stream.unacknowledged == 3
            assert await stream.heartbeat(timeout=10) > 0  # its answer acknowledges all three
            assert all(a.done() and a.exception() is None for a in acked)
            assert stream.unacknowledged == 0
        finally:
            await stream.close()


def test_one_heartbeat_answer_acknowledges_every_lazy_batch_committed(etcd_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controller.dispatcher.ACK_DELAY", 3600 / 2.5)  # no ack of their own during the test
    asyncio.run(_lazy_acks(etcd_url))


async def _backstop(url: str) -> None:
    async with _controller(url) as ctl:
        cid = await _container(ctl)
        stream = ReportStream(ctl.stub, "n1")
        try:
            acked = await stream.deliver(_status(cid, t.STATE_RUNNING, 1))
            await asyncio.wait_for(acked, 20)  # no heartbeat: the controller's own ack after ACK_DELAY periods
            assert (await ctl.store.get_status(cid))[0].state == t.STATE_RUNNING
        finally:
            await stream.close()


def test_lazy_batches_without_heartbeats_get_an_ack_of_their_own(etcd_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controller.dispatcher.ACK_DELAY", 0.02 / 2.5)
    asyncio.run(_backstop(etcd_url))


async def _in_order(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with _controller(url) as ctl:
        cid = await _container(ctl)
        started: list[int] = []
        release = asyncio.Event()
        record_statuses = ctl.orchestrator.record_statuses

        async def slow_first(updates: list[tuple[str, t.ContainerStatus]]) -> None:
            started.append(updates[0][1].state)
            if len(started) == 1:
                await release.wait()
            await record_statuses(updates)

        monkeypatch.setattr(ctl.orchestrator, "record_statuses", lambda updates: asyncio.ensure_future(
            slow_first(updates)))
        await ctl.stub.Join(d.JoinRequest(name="n1", address="127.0.0.1"), timeout=10)
        stream = ReportStream(ctl.stub, "n1")
        try:
            first = await stream.deliver(_status(cid, t.STATE_RUNNING, 1))
            second = await stream.deliver(_status(cid, t.STATE_EXITED, 2))
            await until(lambda: started, "the first batch at the controller")
            assert await stream.heartbeat(timeout=10) > 0  # the stream goes on while the first is committed
            assert started == [t.STATE_RUNNING]  # the second waits for the first
            assert not first.done() and not second.done()
            release.set()
            await until(lambda: ctl.orchestrator.cache is not None
                        and ctl.orchestrator.cache.statuses[cid][0].state == t.STATE_EXITED, "EXITED committed")
            deadline = time.monotonic() + 20
            while not (first.done() and second.done()):  # a heartbeat's answer acknowledges them once committed
                assert time.monotonic() < deadline, "both batches acknowledged"
                await stream.heartbeat(timeout=10)
            assert started == [t.STATE_RUNNING, t.STATE_EXITED]
        finally:
            await stream.close()


def test_lazy_batches_of_a_stream_are_committed_in_the_order_sent(etcd_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controller.dispatcher.ACK_DELAY", 3600 / 2.5)
    asyncio.run(_in_order(etcd_url, monkeypatch))


async def _failed_lazy(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with _controller(url) as ctl:
        failing, after = await _container(ctl), await _container(ctl)
        before, _ = await ctl.store.get_status(after)
        put_statuses = ctl.store.put_statuses
        failures: list[object] = []

        async def fails_once(items: list[tuple[str, t.ContainerStatus, int, int | None]]) -> int:
            if not failures:
                failures.append(items)
                raise RuntimeError("etcd said no")
            return await put_statuses(items)

        monkeypatch.setattr(ctl.store, "put_statuses", fails_once)
        stream = ReportStream(ctl.stub, "n1")
        try:
            first = await stream.deliver(_status(failing, t.STATE_RUNNING, 1))
            second = await stream.deliver(_status(after, t.STATE_RUNNING, 2))
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await stream.closed
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "send them again" in (ended.value.details() or "")
            for acked in (first, second):  # neither is acknowledged: the agent sends both again
                with pytest.raises(ConnectionError):
                    await acked
            assert (await ctl.store.get_status(after))[0] == before  # nothing after it committed
        finally:
            await stream.close()


def test_a_lazy_batch_that_fails_ends_the_stream_and_nothing_after_it_is_committed(
        etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_failed_lazy(etcd_url, monkeypatch))


async def _resend(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reporter = Reporter()
    streams: list[ReportStream] = []

    async def deliver(report: d.StatusReport) -> asyncio.Future[None]:
        return await streams[-1].deliver(report)

    task = asyncio.create_task(reporter.run(deliver, lambda: "n1"))
    try:
        async with _controller(url) as first, _controller(url) as second:
            running_only, exits = await _container(first), await _container(first)
            for cid in (running_only, exits):
                await until(lambda cid=cid: second.orchestrator.cache is not None
                            and second.orchestrator.cache.container(cid), "the container in the second cache")
            received: list[list[tuple[str, int]]] = []
            record_statuses = second.orchestrator.record_statuses

            async def recorded(updates: list[tuple[str, t.ContainerStatus]]) -> None:
                received.append([(c, s.state) for c, s in updates])
                await record_statuses(updates)

            monkeypatch.setattr(second.orchestrator, "record_statuses", lambda updates: asyncio.ensure_future(
                recorded(updates)))
            streams.append(ReportStream(first.stub, "n1"))
            reporter.report(running_only, t.ContainerStatus(state=t.STATE_RUNNING, generation=1, seq=1))
            reporter.report(exits, t.ContainerStatus(state=t.STATE_RUNNING, generation=1, seq=2))
            reporter.report(exits, t.ContainerStatus(state=t.STATE_EXITED, generation=1, seq=3, exit_code=3))
            # committed by the first controller, never acknowledged (no heartbeat, no backstop within the test)
            await until(lambda: first.orchestrator.cache is not None
                        and first.orchestrator.cache.statuses[exits][0].state == t.STATE_EXITED, "EXITED committed")
            assert streams[0].unacknowledged == 2 and len(reporter._unacked) == 2
            await first.server.stop(0)  # the stream breaks with both batches unacknowledged
            await until(streams[0].closed.done, "the broken stream")
            await until(lambda: not reporter._unacked, "the unacknowledged batches put back")
            await second.stub.Join(d.JoinRequest(name="n1", address="127.0.0.1"), timeout=10)
            streams.append(ReportStream(second.stub, "n1"))  # the session's next controller
            reporter.flush()
            # both sent again, in the order first sent (the RUNNING ahead of the EXITED that followed it)
            await until(lambda: len(received) == 2, "both batches at the second controller")
            assert sorted(received[0]) == sorted([(running_only, t.STATE_RUNNING), (exits, t.STATE_RUNNING)])
            assert received[1] == [(exits, t.STATE_EXITED)]
            await until(lambda: second.orchestrator.cache is not None
                        and second.orchestrator.cache.statuses[exits][0].state == t.STATE_EXITED, "EXITED there")
            deadline = time.monotonic() + 20
            while reporter._unacked:  # a heartbeat's answer acknowledges them once committed
                assert time.monotonic() < deadline, "both batches acknowledged"
                await streams[1].heartbeat(timeout=10)
            status, _ = await second.store.get_status(exits)
            assert (status.state, status.exit_code) == (t.STATE_EXITED, 3)  # never back to RUNNING
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for stream in streams:
            await stream.close()


def test_unacknowledged_batches_are_sent_again_after_a_broken_stream_in_order(
        etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controller.dispatcher.ACK_DELAY", 3600 / 2.5)
    asyncio.run(_resend(etcd_url, monkeypatch))
