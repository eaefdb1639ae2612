"""Restart policies and back-off (agent.restart), and the worker applying them to real containers with an
injected sleep: no test here waits for a back-off to pass."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.executor import ContainerInfo, ProcessState
from agent.images import Image
from agent.images.store import ImageConfig
from agent.metrics import AgentMetrics
from agent.restart import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    RestartPolicy,
    RestartPolicyError,
    RestartTracker,
)
from agent.runtime.linux import LinuxExecutor
from agent.worker import Reporter, Worker
from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from tests.agent.conftest import Host, async_wait_for, run, start_supervisor

# ----- pure -----


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("", RestartPolicy("no")),
        ("no", RestartPolicy("no")),
        ("always", RestartPolicy("always")),
        ("unless-stopped", RestartPolicy("unless-stopped")),
        ("on-failure", RestartPolicy("on-failure", 0)),
        ("on-failure:5", RestartPolicy("on-failure", 5)),
    ],
)
def test_parse(text: str, policy: RestartPolicy) -> None:
    assert RestartPolicy.parse(text) == policy


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sometimes", "use no, on-failure[:N], always or unless-stopped"),
        ("always:3", "only on-failure takes a retry count"),
        ("on-failure:x", "must be a number"),
        ("on-failure:-1", "must not be negative"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(RestartPolicyError, match=re.escape(message)):
        RestartPolicy.parse(text)


def test_policies_decide_on_exit_code_and_count() -> None:
    assert not RestartPolicy("no").wants_restart(1, 0)
    assert RestartPolicy("always").wants_restart(0, 100)
    assert RestartPolicy("unless-stopped").wants_restart(0, 100)
    assert not RestartPolicy("on-failure").wants_restart(0, 0)
    assert RestartPolicy("on-failure").wants_restart(137, 1000)
    limited = RestartPolicy("on-failure", 2)
    assert [limited.wants_restart(1, n) for n in range(4)] == [True, True, False, False]


def test_backoff_doubles_from_100ms_caps_at_a_minute_and_resets_after_10s_of_running() -> None:
    tr = RestartTracker(RestartPolicy("always"))
    delays = [tr.next_delay(1, ran_s=0.5) for _ in range(12)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[-1] == BACKOFF_MAX_S and max(d for d in delays if d is not None) == BACKOFF_MAX_S
    assert all(b == min(a * 2, BACKOFF_MAX_S) for a, b in itertools.pairwise(delays) if a and b)
    assert tr.restart_count == 12
    assert tr.next_delay(1, ran_s=10.0) == BACKOFF_INITIAL_S  # it ran long enough: back to the start
    assert tr.next_delay(1, ran_s=9.9) == 2 * BACKOFF_INITIAL_S
    tr.reset()
    assert (tr.restart_count, tr.next_delay(0, ran_s=0)) == (0, BACKOFF_INITIAL_S)


def test_on_failure_stops_counting_at_its_limit() -> None:
    tr = RestartTracker(RestartPolicy("on-failure", 3))
    assert [tr.next_delay(2, 0.0) for _ in range(5)] == [0.1, 0.2, 0.4, None, None]
    assert tr.restart_count == 3
    assert RestartTracker(RestartPolicy("on-failure")).next_delay(0, 0.0) is None


# ----- the worker, real containers -----


class _Images:
    def __init__(self, rootfs: Path) -> None:
        self.image = Image("busybox", "sha256:" + "0" * 64, ImageConfig(), (rootfs,))

    async def ensure(self, ref: str) -> Image:
        return self.image


class FakeSleep:
    """Records each back-off the worker asks for and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@contextlib.asynccontextmanager
async def worker_on(
    host: Host, sleep: Callable[[float], Awaitable[None]], remove: bool = True
) -> AsyncIterator[tuple[Worker, LinuxExecutor]]:
    ex = host.executor()
    w = Worker(ex, _Images(host.rootfs), Reporter(), AgentMetrics(), host.state_dir, sleep=sleep)
    await w.load()
    before = (await ex._request("ping"))["subscribers"]
    exits = asyncio.create_task(w.watch_exits())

    async def subscribed() -> bool:
        return bool((await ex._request("ping"))["subscribers"] > before)

    try:
        await async_wait_for(subscribed, what="the worker's exit subscription")
        yield w, ex
    finally:
        exits.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await exits
        for task in list(w._restart_tasks.values()):
            task.cancel()
        for cid in list(w.assignments) if remove else []:
            w.assignments.pop(cid)
            await ex.remove(cid)
        await ex.close()


def assign(cid: str, *cmd: str, restart: str, desired: int = t.DESIRED_RUNNING) -> d.AssignmentsMessage:
    spec = t.ContainerSpec(name=cid, image="busybox", command=cmd, restart_policy=restart)
    a = t.Assignment(
        container_id=cid, spec=spec, desired_state=desired, generation=1, stop_timeout_s=0.2  # type: ignore[arg-type]
    )
    return d.AssignmentsMessage(
        kind=d.AssignmentsMessage.COMPLETE,
        changes=[d.AssignmentChange(container_id=cid, action=d.AssignmentChange.UPDATE, assignment=a)],
    )


def runs(host: Host, cid: str) -> int:
    """How many times the container ran: each run appends a line to /runs in its writable layer."""
    try:
        return len((host.state_dir / "containers" / cid / "upper" / "runs").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_on_failure_restarts_with_backoff_up_to_its_limit(host: Host) -> None:
    start_supervisor(host)
    sleep = FakeSleep()

    async def body() -> None:
        async with worker_on(host, sleep) as (w, _ex):
            w.apply(assign("rf", "sh", "-c", "echo run >> /runs; exit 3", restart="on-failure:3"))

            async def settled() -> t.ContainerStatus | None:
                s = w.reporter.sent.get("rf")
                done = s is not None and s.state == t.STATE_EXITED and s.restart_count == 3
                return s if done and not w._restart_tasks and runs(host, "rf") == 4 else None

            status = await async_wait_for(settled, what="three restarts then a final exit")
            assert (status.exit_code, status.restart_count) == (3, 3)
            assert sleep.delays == [0.1, 0.2, 0.4]
            assert runs(host, "rf") == 4

    run(body())


def test_no_policy_and_success_stay_exited(host: Host) -> None:
    start_supervisor(host)
    sleep = FakeSleep()

    async def body() -> None:
        async with worker_on(host, sleep) as (w, _ex):
            w.apply(assign("rn", "sh", "-c", "echo run >> /runs; exit 1", restart="no"))
            w.apply(assign("ro", "sh", "-c", "echo run >> /runs; exit 0", restart="on-failure"))
            w.apply(d.AssignmentsMessage(kind=d.AssignmentsMessage.INCREMENTAL, changes=[
                *assign("rn", "sh", "-c", "echo run >> /runs; exit 1", restart="no").changes,
            ]))

            async def both_exited() -> bool:
                s = [w.reporter.sent.get(c) for c in ("rn", "ro")]
                return all(x is not None and x.state == t.STATE_EXITED for x in s)

            await async_wait_for(both_exited, what="both to exit")
            assert sleep.delays == [] and not w._restart_tasks
            assert (runs(host, "rn"), runs(host, "ro")) == (1, 1)

    run(body())


def test_always_restarts_a_killed_container_and_a_stop_ends_it(host: Host) -> None:
    start_supervisor(host)
    sleep = FakeSleep()

    async def body() -> None:
        async with worker_on(host, sleep) as (w, ex):
            w.apply(assign("ra", "sh", "-c", "echo run >> /runs; exec sleep 1000", restart="always"))

            async def running_pid() -> int | None:
                s = w.reporter.sent.get("ra")
                return s.pid if s is not None and s.state == t.STATE_RUNNING else None

            await async_wait_for(lambda: asyncio.sleep(0, runs(host, "ra") == 1), what="the first run's line")
            first = await async_wait_for(running_pid, what="first run")
            await ex.signal("ra", 9)

            async def restarted() -> int | None:
                pid = await running_pid()
                return pid if pid and pid != first and runs(host, "ra") == 2 else None

            await async_wait_for(restarted, what="a restart after SIGKILL")
            s = w.reporter.sent["ra"]
            assert (s.restart_count, sleep.delays, runs(host, "ra")) == (1, [0.1], 2)
            # A user's stop is not an exit the policy acts on.
            stop = assign("ra", "sh", "-c", "echo run >> /runs; exec sleep 1000", restart="always",
                          desired=t.DESIRED_STOPPED)
            w.apply(stop)

            async def stopped() -> bool:
                info = await ex.info("ra")
                return info.state is ProcessState.EXITED and not w._restart_tasks

            await async_wait_for(stopped, what="the stop")
            assert runs(host, "ra") == 2 and sleep.delays == [0.1]

    run(body())


def test_restart_count_survives_an_agent_restart(host: Host) -> None:
    """on-failure:3 counts restarts across agents: the second agent goes on from where the first stopped."""
    start_supervisor(host)
    calls: list[float] = []

    async def first_then_hang(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) > 1:
            await asyncio.Event().wait()  # the agent dies during this back-off

    cmd = ("sh", "-c", "echo run >> /runs; exit 3")

    async def first_agent() -> None:
        async with worker_on(host, first_then_hang, remove=False) as (w, _ex):
            w.apply(assign("rc", *cmd, restart="on-failure:3"))

            async def second_backoff() -> bool:
                return len(calls) == 2 and runs(host, "rc") == 2

            await async_wait_for(second_backoff, what="a restart, then the second back-off")

    run(first_agent())
    sleep = FakeSleep()

    async def second_agent() -> None:
        async with worker_on(host, sleep) as (w, _ex):
            w.apply(assign("rc", *cmd, restart="on-failure:3"))

            async def settled() -> t.ContainerStatus | None:
                s = w.reporter.sent.get("rc")
                done = s is not None and s.state == t.STATE_EXITED and s.restart_count == 3
                return s if done and not w._restart_tasks and runs(host, "rc") == 4 else None

            await async_wait_for(settled, what="the last restart, then exited for good")
            # the exit seen at load was the 2nd; the 2nd restart was not done yet: two more back-offs, 4 runs
            assert sleep.delays == [0.1, 0.2] and runs(host, "rc") == 4

    run(second_agent())


class ExitsBeforeStartReturns:
    """The real executor, but start() returns only once the worker has seen the run's exit: the race of a
    run that ends at once (sh -c 'exit 3') against the reply to start, made to happen every time."""

    def __init__(self, ex: LinuxExecutor) -> None:
        self.ex = ex
        self.worker: Worker | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ex, name)

    async def start(self, cid: str) -> ContainerInfo:
        info = await self.ex.start(cid)
        await self.ex.wait(cid)
        w = self.worker
        assert w is not None

        async def seen() -> bool:
            known = w.info.get(cid)
            return cid in w._early_exits or (known is not None and known.pid == info.pid)

        await async_wait_for(seen, what="the worker to see the exit")
        return info


def test_restarts_of_runs_that_exit_before_start_returns(host: Host) -> None:
    start_supervisor(host)
    sleep = FakeSleep()

    async def body() -> None:
        ex = ExitsBeforeStartReturns(host.executor())
        w = Worker(ex, _Images(host.rootfs), Reporter(), AgentMetrics(), host.state_dir, sleep=sleep)  # type: ignore[arg-type]
        ex.worker = w
        await w.load()
        before = (await ex.ex._request("ping"))["subscribers"]
        exits = asyncio.create_task(w.watch_exits())

        async def subscribed() -> bool:
            return bool((await ex.ex._request("ping"))["subscribers"] > before)

        try:
            await async_wait_for(subscribed, what="the worker's exit subscription")
            w.apply(assign("rx", "sh", "-c", "echo run >> /runs; exit 3", restart="on-failure:3"))

            async def settled() -> bool:
                s = w.reporter.sent.get("rx")
                return bool(s is not None and s.state == t.STATE_EXITED and s.restart_count == 3
                            and not w._restart_tasks and runs(host, "rx") == 4)

            await async_wait_for(settled, what="three restarts of runs that ended before start returned")
            assert sleep.delays == [0.1, 0.2, 0.4]
        finally:
            exits.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await exits
            await ex.ex.remove("rx")
            await ex.ex.close()

    run(body())
