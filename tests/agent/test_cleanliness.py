"""After 200 create/start/rm cycles the host holds no more mounts and as many cgroups, network namespaces,
veths and open files (of the agent-side process and of the supervisor) as before.

The supervisor runs in a mount and network namespace of its own (unshare, private propagation), a copy of
the host's taken at its start: what it and its containers leave behind shows there and nothing the other
work on this machine does at the same time does, so the counts can be compared exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.executor import ProcessState
from tests.agent.conftest import REPO, Host, _socket_answers, run, wait_for

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
        "agent open files": len(os.listdir("/proc/self/fd")),
        "processes": len(host.container_pids()),
    }


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

    async def body() -> None:
        ex = host.executor()
        try:
            # one cycle first: the connection, the cgroup parent and lazily opened files exist from then on
            async def cycle(i: int) -> None:
                cid = f"cyc{i}"
                await ex.create(host.config(cid, "sh", "-c", "echo hi > /f; echo out; echo err >&2"))
                await ex.start(cid)
                info = await ex.wait(cid)
                assert info.state is ProcessState.EXITED and info.exit_code == 0, info
                await ex.remove(cid)

            await cycle(-1)
            before = census(host, sup)
            for i in range(CYCLES):
                await cycle(i)
            after = census(host, sup)
            new_mounts = after.pop("mounts") - before.pop("mounts")  # type: ignore[operator]
            assert not new_mounts, f"mounts left: {new_mounts}"
            assert after == before
            assert before["cgroups"] and before["supervisor open files"]  # it counted
            assert not list((host.state_dir / "containers").iterdir())
        finally:
            await ex.close()

    run(body(), timeout_s=120)
