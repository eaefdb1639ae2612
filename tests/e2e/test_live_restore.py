"""Live-restore on a real dev cluster: `kill -9` of a host's berth-agent leaves its 20 containers running; the
agent started again adopts them (same processes, none started twice), their logs keep flowing, and a
container that exited while no agent ran is reported with its real exit code."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berthctl.dev import cluster as dev_cluster
from berthctl.dev.cluster import ClusterInfo
from tests.conftest import exclusive, run_berthctl, slot_name, slot_subnet
from tests.support import kill_9_keeping_command, respawn, wait_for

NAME = slot_name("blr")
SUBNET = slot_subnet("10.77.31.0/24")
N = 20
TICK = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done"


@pytest.fixture(scope="module")
def one_host(cluster_state_dir: Path) -> Iterator[ClusterInfo]:
    with exclusive(NAME):
        dev_cluster.down(NAME, cluster_state_dir)
        try:
            yield dev_cluster.up(NAME, 1, SUBNET, cluster_state_dir, write_config=False)
        finally:
            dev_cluster.down(NAME, cluster_state_dir)


def ctl(info: ClusterInfo, *args: str) -> str:
    out = run_berthctl(info.controller, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def containers(info: ClusterInfo) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in json.loads(ctl(info, "ps", "-a", "-o", "json"))}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def last_tick(info: ClusterInfo, name: str) -> int:
    lines = [line for line in ctl(info, "logs", name).splitlines() if line.startswith("tick ")]
    return int(lines[-1].split()[1]) if lines else -1


def test_kill_9_of_the_agent_leaves_containers_running_and_a_new_agent_adopts_them(one_host: ClusterInfo) -> None:
    info = one_host
    for i in range(N):
        ctl(info, "run", "-d", "--name", f"lr{i}", "busybox", "sh", "-c", TICK)
    ctl(info, "run", "-d", "--name", "quitter", "busybox", "sh", "-c", "sleep 3; exit 7")
    before = containers(info)
    pids = {name: c["pid"] for name, c in before.items()}
    assert all(before[f"lr{i}"]["state"] == "running" for i in range(N))

    agent = info.process("agent-host1")
    assert agent is not None
    cmdline, environ = kill_9_keeping_command(agent.pid)
    wait_for(lambda: not alive(agent.pid) or Path(f"/proc/{agent.pid}/stat").read_text().split()[2] == "Z",
             what="the agent to die")

    # No agent: every container still runs, and the quitter exits on its own meanwhile.
    assert all(alive(pids[f"lr{i}"]) for i in range(N))
    wait_for(lambda: not alive(pids["quitter"]), timeout=15, what="the quitter to exit while no agent runs")

    respawn(cmdline, environ, info.hosts[0].log)

    def adopted() -> dict[str, dict[str, Any]] | None:
        now = containers(info)
        return now if now["quitter"]["state"] == "exited" else None

    after = wait_for(adopted, timeout=30, what="the new agent to report the quitter's exit")
    assert after["quitter"]["exit_code"] == 7
    for i in range(N):
        c = after[f"lr{i}"]
        assert (c["state"], c["pid"]) == ("running", pids[f"lr{i}"]), f"lr{i} was not adopted as it ran"
    # Nothing started twice: each container's cgroup holds just its own shell and sleep.
    cgroups = Path(f"/sys/fs/cgroup/pids/berth-{info.name}/host1")
    for i in range(N):
        procs = (cgroups / after[f"lr{i}"]["id"] / "cgroup.procs").read_text().split()
        assert str(pids[f"lr{i}"]) in procs and len(procs) <= 2, procs
    # Logs keep flowing through the new agent.
    first = last_tick(info, "lr0")
    wait_for(lambda: last_tick(info, "lr0") > first + 2, what="new log lines after the restart")
    for i in range(N):
        ctl(info, "rm", "-f", f"lr{i}")
    ctl(info, "rm", "quitter")
