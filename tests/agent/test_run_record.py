"""agent.run_record, the worker's crash-safety record (issue 6): a restarted agent starts nothing twice. An agent
process (the real worker over agent.hollow's executor, which keeps nothing itself) is killed with SIGKILL
while it starts containers; a new worker on the same state dir starts none of the runs the killed one
reported started, and starts the others (and a new generation) once. Also: the file is compacted, a torn
last line is ignored, and the per-container files of earlier agents are taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.executor import ContainerInfo
from agent.hollow import HollowExecutor
from agent.images import Image
from agent.images.store import ImageConfig
from agent.metrics import AgentMetrics
from agent.run_record import COMPACT_MIN_LINES, FILE, RunRecord
from agent.worker import Reporter, Worker
from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from tests.agent.conftest import REPO, async_wait_for, run

N = 400

AGENT = """
import asyncio, sys
from pathlib import Path
from agent.hollow import HollowExecutor
from agent.metrics import AgentMetrics
from agent.worker import Reporter, Worker
from berth.api import types_pb2 as t
from tests.agent.test_run_record import N, Images, assignments

class Printing(Reporter):
    def report(self, cid, status):
        super().report(cid, status)
        if status.state == t.STATE_RUNNING:  # reported after the worker recorded the run
            sys.stdout.write(cid + "\\n")
            sys.stdout.flush()

async def main():
    state = Path(sys.argv[1])
    w = Worker(HollowExecutor(state), Images(), Printing(), AgentMetrics(), state)
    await w.load()
    for i in range(0, N, 10):  # ten at a time, so that the kill falls in the middle of the starts
        w.apply(assignments(range(i, i + 10), complete=False))
        await asyncio.sleep(0.005)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class Images:
    image = Image("busybox", "sha256:" + "0" * 64, ImageConfig(cmd=("sh",)), ())

    async def ensure(self, ref: str) -> Image:
        return self.image

    async def pull(self, ref: str) -> Image:
        return self.image

    def get(self, ref: str) -> Image | None:
        return self.image


def cid(i: int) -> str:
    return f"rr{i:04d}"


def assignments(indexes: range, generation: dict[str, int] | None = None, complete: bool = True
                ) -> d.AssignmentsMessage:
    changes = []
    for i in indexes:
        spec = t.ContainerSpec(name=cid(i), image="busybox", command=["sleep", "1000"])
        a = t.Assignment(container_id=cid(i), spec=spec, generation=(generation or {}).get(cid(i), 1),
                         desired_state=t.DESIRED_RUNNING)
        changes.append(d.AssignmentChange(container_id=cid(i), action=d.AssignmentChange.UPDATE, assignment=a))
    kind = d.AssignmentsMessage.COMPLETE if complete else d.AssignmentsMessage.INCREMENTAL
    return d.AssignmentsMessage(kind=kind, changes=changes)


class CountingExecutor(HollowExecutor):
    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.starts: list[str] = []

    async def start(self, container_id: str) -> ContainerInfo:
        self.starts.append(container_id)
        return await super().start(container_id)


def kill_agent_while_starting(state: Path, after: int) -> set[str]:
    """Run the agent until it has reported `after` containers running, SIGKILL it; the ones it reported."""
    agent = subprocess.Popen([sys.executable, "-c", AGENT, str(state)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO)
    reported: set[str] = set()
    try:
        assert agent.stdout is not None
        while len(reported) < after:
            line = agent.stdout.readline()
            assert line, f"the agent ended after reporting {len(reported)} containers running"
            reported.add(line.strip())
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    return reported


@pytest.mark.parametrize("after", [N // 3, N])
def test_a_killed_agent_s_successor_starts_nothing_twice(tmp_path: Path, after: int) -> None:
    reported = kill_agent_while_starting(tmp_path, after)

    recorded = RunRecord(tmp_path)  # what the killed agent recorded: at least what it reported
    before = set(recorded.started)
    recorded.close()
    assert reported <= before

    async def body() -> None:
        ex = CountingExecutor(tmp_path)
        w = Worker(ex, Images(), Reporter(), AgentMetrics(), tmp_path)
        await w.load()
        w.apply(assignments(range(N)))
        await async_wait_for(lambda: _settled(w), what="the worker to start what was not started")
        assert not before & set(ex.starts), "a run the killed agent had started was started again"
        assert sorted(ex.starts) == sorted({cid(i) for i in range(N)} - before), "each of the others, once"
        # a new generation of a container that ran is started, once
        again = sorted(reported)[0]
        w.apply(assignments(range(N), generation={again: 2}))
        async def restarted() -> bool:
            return ex.starts.count(again) == 1 and not _busy(w)

        await async_wait_for(restarted, what="the new generation to start")
        assert w._record.started[again] == 2 and len(ex.starts) == len(set(ex.starts))

    run(body())


def _busy(w: Worker) -> bool:
    return any(event.is_set() for event in w._wake.values())


async def _settled(w: Worker) -> bool:
    return all(w._record.started.get(c, 0) >= a.generation for c, a in w.assignments.items()) and not _busy(w)


def test_the_record_survives_reopening_and_is_compacted(tmp_path: Path) -> None:
    r = RunRecord(tmp_path)
    rounds = 10 * COMPACT_MIN_LINES  # a multiple of 10, several compactions
    for round_ in range(rounds):
        r.set_started(cid(round_ % 10), round_)
        r.set_restarts(cid(round_ % 10), round_)
    assert len((tmp_path / FILE).read_text().splitlines()) <= COMPACT_MIN_LINES, "appends without end"
    for i in range(0, 10, 2):
        r.forget(cid(i))
    r.forget_restarts(cid(1))
    r.close()
    again = RunRecord(tmp_path)
    last = rounds - 10
    assert again.started == {cid(i): last + i for i in range(1, 10, 2)}
    assert again.restarts == {cid(i): last + i for i in range(3, 10, 2)}
    again.close()
    inode = (tmp_path / FILE).stat().st_ino
    RunRecord(tmp_path).close()
    assert (tmp_path / FILE).stat().st_ino == inode, "a tidy record is rewritten at every open"


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    r = RunRecord(tmp_path)
    r.set_started("a", 4)
    r.set_started("b", 1)
    r.close()
    with (tmp_path / FILE).open("a") as f:
        f.write("s 5 a")  # a host crash in the middle of a line: no newline
    again = RunRecord(tmp_path)
    assert again.started == {"a": 4, "b": 1}
    again.set_started("c", 2)  # the compacted file takes appends again
    again.close()
    assert RunRecord(tmp_path).started == {"a": 4, "b": 1, "c": 2}


def test_the_files_of_an_earlier_agent_are_taken_over(tmp_path: Path) -> None:
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker-restarts").mkdir()
    (tmp_path / "worker" / "old1").write_text("3")
    (tmp_path / "worker" / "old2").write_text("1")
    (tmp_path / "worker-restarts" / "old1").write_text("5")
    r = RunRecord(tmp_path)
    assert (r.started, r.restarts) == ({"old1": 3, "old2": 1}, {"old1": 5})
    assert not (tmp_path / "worker").exists() and not (tmp_path / "worker-restarts").exists()
    r.close()
    assert RunRecord(tmp_path).started == {"old1": 3, "old2": 1}


def test_unused_descriptors_are_not_left_open(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    r = RunRecord(tmp_path)
    for i in range(3 * COMPACT_MIN_LINES):  # compactions reopen the file
        r.set_started(cid(i % 10), i)
    r.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_files_of_an_earlier_agent_left_behind_never_undo_the_record(tmp_path: Path) -> None:
    """Per-container files that outlived their take-over (their removal failed: rmtree ignores errors) are
    older than every line of the record: a later generation in the record wins, or the agent would start
    that generation again; and an entry forgotten since (b: its container was removed; a's restart count:
    reset by a user's start) does not come back from them."""
    r = RunRecord(tmp_path)
    r.set_started("a", 5)
    r.set_restarts("a", 2)
    r.set_started("b", 1)
    r.forget("b")
    r.set_restarts("c", 4)
    r.forget_restarts("c")
    r.close()
    RunRecord(tmp_path).close()  # compacted: the record no longer says that b and c's count were forgotten
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker-restarts").mkdir()
    (tmp_path / "worker" / "a").write_text("3")  # what an earlier agent wrote, before the record existed
    (tmp_path / "worker" / "b").write_text("1")
    (tmp_path / "worker-restarts" / "a").write_text("7")
    (tmp_path / "worker-restarts" / "c").write_text("4")
    again = RunRecord(tmp_path)
    assert (again.started, again.restarts) == ({"a": 5}, {"a": 2})
    again.close()
    assert not (tmp_path / "worker").exists() and not (tmp_path / "worker-restarts").exists()
