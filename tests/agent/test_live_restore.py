"""Live-restore with the real worker (agent.worker) and runtime: an agent process killed with SIGKILL while 20
containers run leaves them running; a new agent adopts them without starting or duplicating any, their logs
keep flowing, and one that exited while no agent ran is reported with its real exit code. A simulated host
reboot (every container process and the supervisor killed) brings back, with their writable layers, the
containers whose restart policy says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from agent.runtime.cgroups import Hierarchy
from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from tests.agent.conftest import REPO, Host, _kill_supervisor_by_pidfile, async_wait_for, run, wait_for
from tests.agent.test_restart import FakeSleep, runs, worker_on

N = 20
SCRIPT = "echo run >> /runs; trap 'exit 7' USR1; trap 'exit 0' TERM; while :; do echo tick; sleep 0.1; done"

AGENT = """
import asyncio, sys
from pathlib import Path
from agent.metrics import AgentMetrics
from agent.runtime.linux import LinuxExecutor
from agent.worker import Reporter, Worker
from berth.api import types_pb2 as t
from tests.agent.test_live_restore import assignments
from tests.agent.test_restart import _Images

async def main():
    state, parent, rootfs = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    ex = LinuxExecutor(state, parent)
    w = Worker(ex, _Images(rootfs), Reporter(), AgentMetrics(), state)
    await w.load()
    asyncio.create_task(w.watch_exits())
    w.apply(assignments())
    while sum(1 for s in w.reporter.sent.values() if s.state == t.STATE_RUNNING) < len(w.assignments):
        await asyncio.sleep(0.01)
    print(" ".join(f"{c}={s.pid}" for c, s in sorted(w.reporter.sent.items())), flush=True)
    await asyncio.Event().wait()  # an agent idling until it is killed

asyncio.run(main())
"""


def policy(i: int) -> str:
    return ("always", "no", "unless-stopped", "on-failure")[i % 4]


def assignments(desired: dict[str, int] | None = None) -> d.AssignmentsMessage:
    changes = []
    for i in range(N):
        cid = f"lr{i:02d}"
        spec = t.ContainerSpec(name=cid, image="busybox", command=["sh", "-c", SCRIPT], restart_policy=policy(i))
        a = t.Assignment(container_id=cid, spec=spec, generation=1, stop_timeout_s=5,
                         desired_state=(desired or {}).get(cid, t.DESIRED_RUNNING))  # type: ignore[arg-type]
        changes.append(d.AssignmentChange(container_id=cid, action=d.AssignmentChange.UPDATE, assignment=a))
    return d.AssignmentsMessage(kind=d.AssignmentsMessage.COMPLETE, changes=changes)


def ticks(host: Host, cid: str) -> int:
    return host.log_text(cid).count(" stdout F tick")


def start_agent_and_kill_it(host: Host) -> dict[str, int]:
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(host.state_dir), host.cgroup_parent, str(host.rootfs)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline()
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    pids = {k: int(v) for k, v in (item.split("=") for item in line.split())}
    assert len(pids) == N, line
    return pids


def test_kill_9_of_the_agent_with_20_containers(host: Host) -> None:
    pids = start_agent_and_kill_it(host)
    assert set(pids.values()) <= set(host.container_pids()), "every container outlives the agent"
    wait_for(lambda: all(runs(host, c) == 1 for c in pids), what="each container's first line")
    # While no agent runs: one container exits with a code of its own, and the others go on logging.
    os.kill(pids["lr05"], signal.SIGUSR1)
    exit_file = host.state_dir / "containers" / "lr05" / "exit.json"
    wait_for(exit_file.exists, what="lr05 to exit (recorded by the supervisor) while no agent runs")
    before = {c: ticks(host, c) for c in pids}
    wait_for(lambda: all(ticks(host, c) > before[c] for c in pids if c != "lr05"), what="logs to keep flowing")

    sleep = FakeSleep()

    async def body() -> None:
        async with worker_on(host, sleep) as (w, _ex):
            w.apply(assignments())

            async def reported() -> bool:
                return len(w.reporter.sent) == N

            await async_wait_for(reported, what="a status for every container")
            sent = w.reporter.sent
            assert sent["lr05"].state == t.STATE_EXITED and sent["lr05"].exit_code == 7, sent["lr05"]
            for cid, pid in pids.items():
                if cid != "lr05":
                    assert (sent[cid].state, sent[cid].pid) == (t.STATE_RUNNING, pid), (cid, sent[cid])
            # lr05 has policy "no": it stays exited; no container was started again or twice.
            assert sleep.delays == [] and not w._restart_tasks
            assert all(runs(host, c) == 1 for c in pids)
            assert {p for c, p in pids.items() if c != "lr05"} <= set(host.container_pids())
            assert {leaf.name for leaf in host.cgroup_leaves()} == {c for c in pids if c != "lr05"}
            mid = {c: ticks(host, c) for c in pids}
            wait_for(lambda: all(ticks(host, c) > mid[c] for c in pids if c != "lr05"), what="logs after adoption")

    run(body(), timeout_s=120)


def test_simulated_host_reboot_brings_back_what_the_policy_says(host: Host) -> None:
    pids = start_agent_and_kill_it(host)
    wait_for(lambda: all(runs(host, c) == 1 for c in pids), what="each container's first line")
    # The reboot: the supervisor and every container process go; the state dir (a disk) stays.
    _kill_supervisor_by_pidfile(host.state_dir)
    hier = Hierarchy()
    for cid in pids:
        hier.cgroup(host.cgroup_parent, cid).kill_all()
    wait_for(lambda: not host.container_pids(), what="every container process gone")

    sleep = FakeSleep()
    stopped_by_user = "lr06"  # unless-stopped, stopped by its user before the reboot: stays down
    assert policy(6) == "unless-stopped"

    async def body() -> None:
        async with worker_on(host, sleep) as (w, _ex):
            w.apply(assignments({stopped_by_user: t.DESIRED_STOPPED}))
            back = {c for i, c in enumerate(sorted(pids)) if policy(i) != "no" and c != stopped_by_user}

            async def settled() -> bool:
                s = w.reporter.sent
                return len(s) == N and all(s[c].state == t.STATE_RUNNING and runs(host, c) == 2 for c in back)

            await async_wait_for(settled, timeout_s=60, what="the containers with a restart policy to come back")
            for c in sorted(pids):
                if c not in back:
                    assert w.reporter.sent[c].state == t.STATE_EXITED and runs(host, c) == 1, c
            # on-failure too: a process killed by the reboot did not exit 0 (its code is unknown: 255)
            assert "lr03" in back and w.reporter.sent["lr01"].exit_code == 255
            assert sorted(sleep.delays) == [0.1] * len(back)

    run(body(), timeout_s=120)
