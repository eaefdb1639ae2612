"""agent.report_order (issue 6, order): every status an agent's Reporter sends carries a seq greater than any
status the agent sent before, across agent restarts. An agent process (the real worker over agent.hollow's
executor) reports statuses and is killed with SIGKILL; a new worker on the same state dir numbers its
statuses after every one the killed agent sent, with a clock set back too (the epoch in the state dir)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from agent.hollow import HollowExecutor
from agent.metrics import AgentMetrics
from agent.report_order import FILE, ReportOrder
from agent.worker import Reporter, Worker
from berth.api import types_pb2 as t
from tests.agent.conftest import REPO, async_wait_for, run
from tests.agent.test_run_record import Images, assignments

AGENT = """
import asyncio, sys
from pathlib import Path
from agent.hollow import HollowExecutor
from agent.metrics import AgentMetrics
from agent.worker import Reporter, Worker
from tests.agent.test_run_record import Images, assignments

class Printing(Reporter):
    def report(self, cid, status):
        super().report(cid, status)
        sys.stdout.write(f"{status.seq}\\n")
        sys.stdout.flush()

async def main():
    state = Path(sys.argv[1])
    w = Worker(HollowExecutor(state), Images(), Printing(), AgentMetrics(), state)
    await w.load()
    w.apply(assignments(range(20)))
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _kill_agent_after(state: Path, statuses: int) -> list[int]:
    """Run the agent until it has reported `statuses` statuses, SIGKILL it; the seqs it reported."""
    agent = subprocess.Popen([sys.executable, "-c", AGENT, str(state)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    seqs: list[int] = []
    try:
        assert agent.stdout is not None
        while len(seqs) < statuses:
            line = agent.stdout.readline()
            assert line, f"the agent ended after reporting {len(seqs)} statuses"
            seqs.append(int(line))
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    return seqs


def test_a_killed_agent_s_successor_numbers_its_statuses_after_its_own(tmp_path: Path) -> None:
    before = _kill_agent_after(tmp_path, 30)
    assert before == sorted(set(before)) and before[0] > 0, "one agent's seqs grow with every status"

    async def body() -> None:
        reporter = Reporter()
        w = Worker(HollowExecutor(tmp_path), Images(), reporter, AgentMetrics(), tmp_path)
        await w.load()
        w.apply(assignments(range(20, 30)))  # new containers: started, reported
        async def running() -> bool:
            return len(reporter.sent) == 10 and all(s.state == t.STATE_RUNNING for s in reporter.sent.values())

        await async_wait_for(running, what="the new containers running")
        assert min(s.seq for s in reporter.sent.values()) > max(before), "a restarted agent's seq went back"

    run(body())
    # and with the wall clock set back an hour, by the epoch kept in the state dir
    last = ReportOrder(tmp_path)()
    assert ReportOrder(tmp_path, clock=lambda: 0.0)() > last


def test_without_the_state_dir_s_epoch_the_clock_still_orders_a_new_agent(tmp_path: Path) -> None:
    """A state dir lost (the epoch file gone): the new epoch is the clock's seconds, after the old one's."""
    first = ReportOrder(tmp_path, clock=lambda: 2_000_000_000.0)
    earlier = [first() for _ in range(3)]
    (tmp_path / FILE).unlink()
    assert ReportOrder(tmp_path, clock=lambda: 2_000_000_001.0)() > max(earlier)


def test_a_health_probe_s_update_gets_a_seq_of_its_own() -> None:
    """Every status reported is numbered, also a copy of the last one with a new field (agent.health's probe)."""
    count = iter(range(1, 100))
    r = Reporter(order=lambda: next(count))
    running = t.ContainerStatus(state=t.STATE_RUNNING, generation=1)
    r.report("a", running)
    update = t.ContainerStatus()
    update.CopyFrom(r.sent["a"])
    update.health.status = "healthy"
    r.report("a", update)
    assert (running.seq, r.sent["a"].seq) == (1, 2)
