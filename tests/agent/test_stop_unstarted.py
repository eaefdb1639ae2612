"""A run stopped before its agent started it (a `stop` right after `run`, or after `start`, before the agent got
the assignment to run) is reported as it was left: created when the container never ran here, its last run's
exit otherwise, of the stopped run's generation. Nothing was reported before, so a `stop` waiting for that run's
end (controller.api: Stop) waited its timeout + 30 s and failed. The worker on real containers."""

from __future__ import annotations

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from tests.agent.conftest import Host, async_wait_for, run, start_supervisor
from tests.agent.test_restart import FakeSleep, assign, runs, worker_on

CMD = ("sh", "-c", "echo run >> /runs; exit 3")


def _more(msg: d.AssignmentsMessage, generation: int = 1) -> d.AssignmentsMessage:
    """The assignment as a change (the others kept), of that generation."""
    msg.kind = d.AssignmentsMessage.INCREMENTAL
    msg.changes[0].assignment.generation = generation
    return msg


def test_a_run_stopped_before_it_started_is_reported(host: Host) -> None:
    start_supervisor(host)

    async def body() -> None:
        async with worker_on(host, FakeSleep()) as (w, _ex):
            # never ran here: created, and nothing started
            w.apply(assign("never", *CMD, restart="no", desired=t.DESIRED_STOPPED))

            async def created() -> t.ContainerStatus | None:
                s = w.reporter.sent.get("never")
                return s if s is not None and s.state == t.STATE_CREATED else None

            status = await async_wait_for(created, what="the never-started run reported")
            assert (status.generation, status.message) == (1, "stopped before it started")
            assert runs(host, "never") == 0

            # ran once (exit 3), then started again (generation 2) and stopped before the agent started it:
            # its last exit, as of generation 2
            w.apply(_more(assign("again", *CMD, restart="no")))

            async def exited(generation: int) -> t.ContainerStatus | None:
                s = w.reporter.sent.get("again")
                return s if s is not None and s.state == t.STATE_EXITED and s.generation == generation else None

            await async_wait_for(lambda: exited(1), what="the first run's exit")
            w.apply(_more(assign("again", *CMD, restart="no", desired=t.DESIRED_STOPPED), 2))
            status = await async_wait_for(lambda: exited(2), what="the stopped second run reported")
            assert status.exit_code == 3
            assert runs(host, "again") == 1

    run(body())
