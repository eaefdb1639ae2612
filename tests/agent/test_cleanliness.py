"""After 200 create/start/rm cycles the host holds no more mounts and as many cgroups, network namespaces,
veths and open files (of the agent-side process and of the supervisor) as before.

The supervisor runs in a mount and network namespace of its own (unshare, private propagation), a copy of
the host's taken at its start: what it and its containers leave behind shows there and nothing the other
work on this machine does at the same time does, so the counts can be compared exactly. The agent side (the
executor) runs in a process of its own too, which counts its own open files: the test process's count also
moved with what earlier tests left in it (gRPC channels closing or reconnecting), and the test failed when
controller tests ran before it (session 7)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from tests.agent.conftest import REPO, Host, _socket_answers, wait_for

CYCLES = 200


def census(host: Host, sup: int) -> dict[str, object]:
    mountinfo = Path(f"/proc/{sup}/mountinfo").read_text().splitlines()
    pattern = f"{host.cgroup_parent}/**" if host.hier.version == 2 else f"*/{host.cgroup_parent}/**"
    cgroup_dirs = [p for p in host.hier.root.glob(pattern) if p.is_dir()]  # the parent and what is under it
    netns = {os.stat(f"/proc/{pid}/ns/net").st_ino for pid in host.container_pids() if Path(f"/proc/{pid}").exists()}
    return {
        # mount lines carry a unique mount id: a new one is a leak. (One may go away meanwhile: a namespace
        # bound on the host and deleted there can drop out of this copy; that is no leak of berth's.)
        "mounts": set(mountinfo),
        "cgroups": len(cgroup_dirs),
        "container network namespaces": len(netns),
        "interfaces (veths) in the supervisor's netns": sorted(
            line.split(":")[0].strip() for line in Path(f"/proc/{sup}/net/dev").read_text().splitlines()[2:]
        ),
        "supervisor open files": len(os.listdir(f"/proc/{sup}/fd")),
        "processes": len(host.container_pids()),
    }


# The agent side: one cycle first (the connection, the cgroup parent and lazily opened files exist from then on),
# then its open files counted ("before N"), the cycles once the test says so, and again ("after N"); it ends when
# the test says so. A failed cycle ends it with its traceback on stderr.
AGENT = """
import asyncio, os, sys
from pathlib import Path
from agent.executor import ContainerConfig, ProcessState
from agent.runtime.linux import LinuxExecutor

async def main(state_dir, cgroup_parent, rootfs, cycles):
    ex = LinuxExecutor(Path(state_dir), cgroup_parent)

    async def cycle(i):
        cid = f"cyc{i}"
        await ex.create(ContainerConfig(id=cid, name=cid, layers=(Path(rootfs),), hostname=cid,
                                        args=("sh", "-c", "echo hi > /f; echo out; echo err >&2")))
        await ex.start(cid)
        info = await ex.wait(cid)
        assert info.state is ProcessState.EXITED and info.exit_code == 0, info
        await ex.remove(cid)

    async def mark(name):
        print(name, len(os.listdir("/proc/self/fd")), flush=True)
        await asyncio.to_thread(sys.stdin.readline)

    try:
        await cycle(-1)
        await mark("before")
        for i in range(cycles):
            await cycle(i)
        await mark("after")
    finally:
        await ex.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


def _agent_mark(agent: subprocess.Popen[str], name: str, errors: Path) -> int:
    """The agent side's count of its open files at a mark ("before", "after")."""
    assert agent.stdout is not None
    line = agent.stdout.readline().split()
    assert line[:1] == [name], f"the agent side ended before {name!r}: {errors.read_text()}"
    return int(line[1])


def _go_on(agent: subprocess.Popen[str]) -> None:
    assert agent.stdin is not None
    agent.stdin.write("\n")
    agent.stdin.flush()


def test_200_cycles_leave_nothing_behind(host: Host) -> None:
    host.state_dir.mkdir(parents=True)
    with open(host.state_dir / "supervisor.log", "ab") as log:
        host.supervisor = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", sys.executable, "-m", "agent.supervisor",
             "--state-dir", str(host.state_dir), "--cgroup-parent", host.cgroup_parent],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
    sup = host.supervisor.pid
    wait_for(lambda: _socket_answers(host.state_dir / "supervisor.sock") or host.supervisor.poll() is not None,
             what="supervisor socket")  # type: ignore[union-attr]

    errors = host.state_dir.parent / "agent.err"
    with open(errors, "w") as err:
        agent = subprocess.Popen([sys.executable, "-c", AGENT, str(host.state_dir), host.cgroup_parent,
                                  str(host.rootfs), str(CYCLES)],
                                 cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    watchdog = threading.Timer(120, agent.kill)  # a hung agent side fails the test instead of hanging it
    watchdog.start()
    try:
        agent_files = _agent_mark(agent, "before", errors)  # the agent side waits while the host is counted
        before = census(host, sup) | {"agent open files": agent_files}
        _go_on(agent)
        agent_files = _agent_mark(agent, "after", errors)
        after = census(host, sup) | {"agent open files": agent_files}
        _go_on(agent)
        assert agent.wait() == 0, errors.read_text()
    finally:
        watchdog.cancel()
        agent.kill()
        agent.wait()
    new_mounts = after.pop("mounts") - before.pop("mounts")  # type: ignore[operator]
    assert not new_mounts, f"mounts left: {new_mounts}"
    assert after == before
    assert before["cgroups"] and before["supervisor open files"] and before["agent open files"]  # it counted
    assert not list((host.state_dir / "containers").iterdir())
