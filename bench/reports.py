"""The agent -> controller report path alone (issue 6): a real etcd and the real controller, and many agents'
sessions (in this process) each sending status batches one at a time, and heartbeats, as messages on one
`Reports` stream per session (agent.reports). (The unary `ReportStatus` and `Heartbeat` calls it was first
measured against are gone from the API.) Every batch is really committed (a status put with a compare on the
container's revision).

Prints, per round, the CPU seconds of the controller and of the agents' side (this process) per 10,000 batches
(and per 10,000 heartbeats), then one last line:

    RESULT {"stream batches": {"controller": ..., "agents": ...}, "stream heartbeats": {...}}   (medians)

    BERTH_TEST_SLOT=N .venv/bin/python bench/reports.py [--agents 250] [--batches 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.reports import ReportStream  # noqa: E402
from berth import rpc  # noqa: E402
from berth.api import dispatcher_pb2 as d  # noqa: E402
from berth.api import dispatcher_pb2_grpc  # noqa: E402
from berth.api import types_pb2 as t  # noqa: E402
from berthctl.dev import etcd as etcd_server  # noqa: E402
from controller.store import Store  # noqa: E402
from tests.conftest import SLOT  # noqa: E402

HOST = f"127.0.{SLOT}.78"
PER_AGENT = 4  # containers per agent; a batch reports one of them


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


Send = Callable[[d.StatusReport], Awaitable[None]]


async def agent_round(stubs: list[dispatcher_pb2_grpc.DispatcherAsyncStub], nodes: list[str],
                      containers: list[list[str]], batches: int, heartbeats: bool) -> float:
    """Each agent sends its share of `batches` (or heartbeats), one at a time; returns the wall time."""
    streams: list[ReportStream] = []
    sends: list[Send] = []
    beats: list[Callable[[], Awaitable[object]]] = []
    for stub, node in zip(stubs, nodes, strict=True):
        stream = ReportStream(stub, node)
        streams.append(stream)
        sends.append(stream.send)
        beats.append(lambda s=stream: s.heartbeat(timeout=30))
    share = batches // len(stubs)

    async def one(i: int) -> None:
        for k in range(share):
            if heartbeats:
                await beats[i]()
                continue
            state = t.STATE_RUNNING if k % 2 else t.STATE_PREPARING
            cid = containers[i][k % PER_AGENT]
            await sends[i](d.StatusReport(node_id=nodes[i], updates=[d.ContainerStatusUpdate(
                container_id=cid, status=t.ContainerStatus(state=state, generation=1))]))

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(len(stubs))))
    finally:
        for stream in streams:
            await stream.close()
    return time.perf_counter() - t0


async def bench(controller: str, etcd: str, ctl_pid: int, agents: int, batches: int,
                rounds: int) -> dict[str, dict[str, float]]:
    channels = [rpc.aio_channel(controller) for _ in range(agents)]
    stubs = [dispatcher_pb2_grpc.DispatcherStub(ch) for ch in channels]
    store = Store(etcd)
    await store.connect()
    nodes: list[str] = []
    containers: list[list[str]] = []
    for i, stub in enumerate(stubs):
        reply = await stub.Join(d.JoinRequest(name=f"rb{i}", address="127.0.0.1"), timeout=30)
        nodes.append(reply.node_id)
        mine = []
        for j in range(PER_AGENT):
            cid = secrets.token_hex(32)
            await store.create_container(t.Container(id=cid, spec=t.ContainerSpec(name=f"rb{i}-{j}", image="busybox"),
                                                     desired_state=t.DESIRED_RUNNING, generation=1))
            mine.append(cid)
        containers.append(mine)
    await store.close()
    await asyncio.sleep(2)  # the controller's cache has every container
    results: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds):
        for what, count in (("batches", batches), ("heartbeats", batches // 2)):
            c0, a0 = cpu_s(ctl_pid), own_cpu_s()
            wall = await agent_round(stubs, nodes, containers, count, what == "heartbeats")
            ctl, ag = (cpu_s(ctl_pid) - c0) * 10_000 / count, (own_cpu_s() - a0) * 10_000 / count
            print(f"round {r} stream {what:10}: controller {ctl:5.2f}, agents {ag:5.2f} CPU-s per 10,000 "
                  f"({count / wall:,.0f}/s)", file=sys.stderr)
            entry = results.setdefault(f"stream {what}", {"controller": [], "agents": []})
            entry["controller"].append(ctl)
            entry["agents"].append(ag)
    for ch in channels:
        await ch.close()
    return {key: {role: round(statistics.median(v), 2) for role, v in roles.items()} for key, roles in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=250)
    parser.add_argument("--batches", type=int, default=10_000, help="status batches per round and mode")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="berth-bench-reports-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        etcd_proc = etcd_server.start(HOST, state / "etcd", state / "etcd.log", dict(os.environ))
        procs.append(etcd_proc)
        etcd_server.wait_healthy(etcd_server.client_url(HOST), etcd_proc, state / "etcd.log")
        controller = f"{HOST}:7070"
        with (state / "controller.log").open("wb") as log:
            ctl = subprocess.Popen(
                [sys.executable, "-m", "controller", "--etcd", etcd_server.client_url(HOST), "--listen", controller,
                 "--metrics-listen", f"{HOST}:7071", "--lease-ttl", "60", "--log-level", "WARNING",
                 "--max-txn-ops", str(etcd_server.MAX_TXN_OPS)], stdout=log, stderr=subprocess.STDOUT)
        procs.append(ctl)
        time.sleep(2)
        medians = asyncio.run(bench(controller, etcd_server.client_url(HOST), ctl.pid, args.agents, args.batches,
                                    args.rounds))
        print("RESULT " + json.dumps(medians))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
