"""What berth costs per running container on a host: 100 `sleep` containers started through the agent's
runtime (LinuxExecutor, in this process, standing in for the agent) and the host's one berth-supervisor.

Host-side memory berth adds per container = (growth of the supervisor's RSS + growth of this agent-side
process's RSS) / containers, from a baseline taken after one warm-up container ran and was removed (so
one-off imports and buffers are not counted). It also checks that berth has no per-container process of its
own on the host: every child of the supervisor must be a container's first process (inside the container's
cgroup), as containerd's shim per container would not be.

Prints one last line: RESULT {"containers", "rss_per_container_mib", "start_all_s", ...}; goal <= 1 MiB.

    sudo .venv/bin/python bench/density.py [--containers 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.executor import ContainerConfig, ProcessState  # noqa: E402
from agent.runtime.linux import LinuxExecutor  # noqa: E402
from bench.runtime_start import make_layer, remove_cgroup_parent  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
    return out


async def main_async(n: int, work: Path) -> dict[str, object]:
    layer = work / "layer"
    make_layer(layer)
    parent = f"berth-density-{uuid.uuid4().hex[:8]}"
    ex = LinuxExecutor(work / "state", parent)
    ids = [f"d{i}" for i in range(n)]

    def cfg(cid: str) -> ContainerConfig:
        return ContainerConfig(id=cid, name=cid, hostname=cid, layers=(layer,), args=("sleep", "100000"))

    try:
        await ex.create(cfg("warm"))
        await ex.start("warm")
        await ex.remove("warm")
        sup = int((work / "state" / "supervisor.pid").read_text())
        base_sup, base_agent = rss_kib(sup), rss_kib(os.getpid())
        t0 = time.perf_counter()
        for cid in ids:
            await ex.create(cfg(cid))
            info = await ex.start(cid)
            if info.state is not ProcessState.RUNNING:
                raise SystemExit(f"{cid}: {info}")
        start_all = time.perf_counter() - t0
        running = [i for i in await ex.list() if i.state is ProcessState.RUNNING]
        pids = {i.pid for i in running}
        extra = [c for c in children(sup) if c not in pids]
        sup_growth, agent_growth = rss_kib(sup) - base_sup, rss_kib(os.getpid()) - base_agent
        per = (sup_growth + agent_growth) / n / 1024
        return {
            "containers": len(running),
            "rss_per_container_mib": round(per, 3),
            "start_all_s": round(start_all, 2),
            "supervisor_rss_growth_mib": round(sup_growth / 1024, 2),
            "agent_rss_growth_mib": round(agent_growth / 1024, 2),
            "berth_processes_per_container": len(extra) / n,
        }
    finally:
        await asyncio.gather(*(ex.remove(cid) for cid in ids), return_exceptions=True)
        await ex.close()
        pid_file = work / "state" / "supervisor.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), 15)
        remove_cgroup_parent(parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    ap.add_argument("--containers", type=int, default=100)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("density: run as root (namespaces, cgroups, mounts)")
    work = Path(tempfile.mkdtemp(prefix="berth-bench-density-"))
    try:
        result = asyncio.run(main_async(args.containers, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
