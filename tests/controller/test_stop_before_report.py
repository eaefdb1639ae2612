"""`stop` of a container that has no status key yet (issue 6: a Run group-committed on the leader has none until
its agent's first report) waits for the stop as for any container its agent may be running: its agent may have
started it, its first report not yet written when `stop` read the status. It returned at once, the container
still starting (then running until the agent got the stop), and `stop` answered it assigned. A real gRPC server
over a real etcd and cluster cache (api_on); the agent's reports written as its agent's would be, the first one
right after `stop` read the status (the race, made certain). When the stop comes before the agent started the
run, the agent says it never started it (created, agent.worker), and that ends the wait too."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.api import StatusTracker
from tests.controller.conftest import api_on, until


async def _stop_before_first_report(url: str, started: bool) -> None:
    async with api_on(url) as (store, cache, _, channel):
        c = t.Container(id=secrets.token_hex(32), spec=t.ContainerSpec(name="early-stop", image="busybox"),
                        node_id="n1", desired_state=t.DESIRED_RUNNING, generation=1)
        assert await store.create_placed([c])  # as a Run group-committed on the leader: no status key
        await until(lambda: cache.container(c.id) is not None, "the container in the cache")

        # what the agent says once stopped: its exit, or (the stop came before it started the run) that it
        # never started it (agent.worker), which `stop` waited for until its timeout + 30 s and failed
        final = (t.ContainerStatus(state=t.STATE_EXITED, generation=1, exit_code=143, seq=1 << 32 | 2) if started
                 else t.ContainerStatus(state=t.STATE_CREATED, generation=1, message="stopped before it started",
                                        seq=1 << 32 | 1))
        read_status, wait = store.get_status, StatusTracker.wait
        reported = asyncio.Event()
        stopped: list[asyncio.Task[None]] = []

        async def then_its_agent_reports(cid: str) -> Any:  # Stop's read, then the agent's first report lands
            got = await read_status(cid)
            if cid == c.id and not reported.is_set():
                assert not got[0].state, "a status key before the agent's first report"
                if started:
                    v = await store.get_container(cid)
                    assert await store.put_status(cid, t.ContainerStatus(state=t.STATE_PREPARING, generation=1,
                                                                         seq=1 << 32 | 1), v.mod_revision, 0)
                reported.set()
            return got

        async def agent_stops_it() -> None:  # the agent gets the stop, stops what it was starting and says so
            v = await store.get_container(c.id)
            assert v.container.desired_state == t.DESIRED_STOPPED
            _, held = await store.held_status(c.id)
            assert await store.put_status(c.id, final, v.mod_revision, held)

        async def waited(tracker: StatusTracker, *args: Any, **kwargs: Any) -> t.ContainerStatus:
            # the agent's stop comes while `stop` waits for it (made certain: before the fix, it did not wait,
            # and answered before any stop was reported)
            if tracker.cid == c.id and not stopped:
                stopped.append(asyncio.create_task(agent_stops_it()))
            return await wait(tracker, *args, **kwargs)

        store.get_status = then_its_agent_reports  # type: ignore[method-assign]
        StatusTracker.wait = waited  # type: ignore[method-assign, assignment]
        try:
            answer = await asyncio.wait_for(control_pb2_grpc.ControlStub(channel).Stop(
                control_pb2.StopRequest(ref="early-stop", timeout_s=5)), 20)
            assert reported.is_set()
            assert (answer.status.state, answer.status.exit_code, answer.status.message) == (
                final.state, final.exit_code, final.message), t.ContainerState.Name(answer.status.state)
            await asyncio.gather(*stopped)
        finally:
            store.get_status = read_status  # type: ignore[method-assign]
            StatusTracker.wait = wait  # type: ignore[method-assign]
            for task in stopped:
                task.cancel()
            await asyncio.gather(*stopped, return_exceptions=True)


def test_stop_before_the_first_report_waits_for_the_stop(etcd_url: str) -> None:
    asyncio.run(_stop_before_first_report(etcd_url, started=True))


def test_stop_before_the_agent_started_the_run_ends_when_it_says_so(etcd_url: str) -> None:
    asyncio.run(_stop_before_first_report(etcd_url, started=False))
