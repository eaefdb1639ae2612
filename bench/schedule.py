"""Scheduling throughput: a real etcd, the real controller, 1,000 hollow agents (the real agent session, worker
and reporter over agent.hollow's executor that starts nothing, many agents per process, following the
overlay's Peers and the DNS Names streams as real agents do), 10,000 containers
submitted through the API's RunStream (each request answered once the agent reports its container running;
`--submit unary`: one Run call each, as before 2026-11-28).

Measures the time from the first submission until every container is placed and reported running, the Run
latency (p50, p99) and the controller's peak resident memory. Prints one last line:

    RESULT {"containers": 10000, "agents": 1000, "per_second": ..., "api_p50_ms": ..., "api_p99_ms": ...,
            "controller_peak_mib": ..., "in_flight": ...}

    sudo .venv/bin/python bench/schedule.py [--containers 10000] [--agents 1000] [--processes 4]
                                            [--submit stream|unary] [--streams 4] [--batch 64]
                                            [--concurrency 1000]

The client keeps --concurrency requests unanswered (1,000 by default: one start in flight per host). The
comparisons of issue 6 measure a scheduler draining work that is all submitted (kube-scheduler's scheduler_perf
creates the pods first; Nomad's C1M registers jobs of many instances): a small window measures latency instead,
since by Little's law the rate is at most window / latency (200 in flight at ~70 ms: ~2,860/s whatever the CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import grpc.aio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from berth import rpc  # noqa: E402
from berth.api import control_pb2, control_pb2_grpc  # noqa: E402
from berth.api import types_pb2 as t  # noqa: E402
from berthctl.dev import cluster as dev  # noqa: E402
from berthctl.dev import etcd as etcd_server  # noqa: E402
from tests.conftest import slot_name, slot_subnet  # noqa: E402

NAME, SUBNET = slot_name("bsched"), slot_subnet("10.77.72.0/24")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_shares(pids: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(cpu_s(p) for p in ps) for role, ps in pids.items()}


def peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def ready_nodes(stub: control_pb2_grpc.ControlAsyncStub) -> int:
    try:
        reply = await stub.ListNodes(control_pb2.ListNodesRequest(), timeout=60)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return 0  # the controller is still starting
        raise
    return sum(1 for n in reply.nodes if n.state == t.NODE_READY)


async def run_one(stub: control_pb2_grpc.ControlAsyncStub, spec: t.ContainerSpec) -> float:
    t0 = time.perf_counter()
    async for event in stub.Run(control_pb2.RunRequest(spec=spec), timeout=600):
        if event.HasField("started"):
            if event.started.status.state != t.STATE_RUNNING:
                raise RuntimeError(f"{spec.name}: {event.started.status.state} {event.started.pending_reason}")
            break
    return (time.perf_counter() - t0) * 1000


ETCD_COUNTERS = {
    "etcd_server_proposals_committed_total": "proposals", "etcd_mvcc_put_total": "puts",
    "etcd_mvcc_delete_total": "deletes", "etcd_mvcc_txn_total": "txns", "etcd_mvcc_range_total": "ranges",
    "etcd_debugging_mvcc_events_total": "watch_events",
}


def etcd_counts(url: str) -> dict[str, float]:
    """etcd's own counters of the requests it served (its /metrics), and its gRPC messages in and out."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        metric = name.split("{", 1)[0]
        key = ETCD_COUNTERS.get(metric) or {"grpc_server_msg_received_total": "grpc_in",
                                            "grpc_server_msg_sent_total": "grpc_out"}.get(metric)
        if key:
            out[key] = out.get(key, 0.0) + float(value)
    return out


async def bench(controller: str, etcd: str, containers: int, agents: int, processes: int, concurrency: int,
                hollow_procs: list[subprocess.Popen[bytes]], pids: dict[str, list[int]], submit: str = "stream",
                streams: int = 4, batch: int = 64) -> tuple[float, list[float]]:
    channel = rpc.aio_channel(controller)
    stub = control_pb2_grpc.ControlStub(channel)
    deadline = time.monotonic() + 600
    while (n := await ready_nodes(stub)) < agents:
        if time.monotonic() > deadline or any(p.poll() is not None for p in hollow_procs):
            raise SystemExit(f"only {n}/{agents} hollow agents joined")
        await asyncio.sleep(1)
    print(f"{agents} hollow agents ready", file=sys.stderr)
    # Warm up: one container per hollow process pulls the image into that process's shared store.
    await asyncio.gather(*(run_one(stub, t.ContainerSpec(
        name=f"warm{i}", image="busybox", command=["sleep", "1"], constraints=[f"node.name==hollow-p{i}-0"]))
        for i in range(processes)))
    for i in range(processes):
        await stub.Remove(control_pb2.RemoveRequest(ref=f"warm{i}", force=True))
    latencies: list[float] = []
    next_index = 0

    def next_spec() -> t.ContainerSpec | None:
        nonlocal next_index
        if next_index >= containers:
            return None
        next_index += 1
        return t.ContainerSpec(name=f"c{next_index - 1}", image="busybox", command=["sleep", "1000"])

    async def submitter() -> None:
        while (spec := next_spec()) is not None:
            latencies.append(await run_one(stub, spec))

    async def streamer(in_flight: int) -> None:
        """One RunStream with up to in_flight requests unanswered, sent in batches of up to `batch` (as many as
        there is room for when the writer wakes); a request's latency is from its write to its reply."""
        call = stub.RunStream(timeout=600)  # type: ignore[call-arg]  # the read/write API: no request iterator
        room = asyncio.Semaphore(in_flight)
        sent: list[float] = []

        async def write() -> None:
            while True:
                await room.acquire()
                specs: list[t.ContainerSpec] = []
                while (spec := next_spec()) is not None:
                    specs.append(spec)
                    if len(specs) == batch or room.locked():
                        break
                    await room.acquire()  # free: does not wait
                if not specs:
                    break
                now = time.perf_counter()
                sent.extend(now for _ in specs)
                await call.write(control_pb2.RunBatch(requests=[control_pb2.RunRequest(spec=s) for s in specs]))
            await call.done_writing()

        writer = asyncio.create_task(write())
        try:
            while (message := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                assert isinstance(message, control_pb2.RunStreamEvents)
                now = time.perf_counter()
                for reply in message.events:
                    if reply.WhichOneof("result") != "started" or reply.started.status.state != t.STATE_RUNNING:
                        raise RuntimeError(f"request {reply.index}: {reply}")
                    latencies.append((now - sent[reply.index]) * 1000)
                    room.release()
            await writer
        finally:
            writer.cancel()

    print(f"submitting through {'RunStream' if submit == 'stream' else 'Run'}: "
          + (f"{streams} streams, up to {batch} requests a message, " if submit == "stream" else "")
          + f"{concurrency} in flight", file=sys.stderr)
    before, etcd_before = cpu_shares(pids), etcd_counts(etcd)
    t0 = time.perf_counter()
    if submit == "stream":
        await asyncio.gather(*(streamer(concurrency // streams + (i < concurrency % streams))
                               for i in range(streams)))
    else:
        await asyncio.gather(*(submitter() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    # What etcd was asked to do, per container: its cost follows the requests and keys, not the containers
    etcd_after = etcd_counts(etcd)
    print("etcd per container: " + json.dumps({k: round((etcd_after[k] - etcd_before.get(k, 0)) / containers, 2)
                                               for k in sorted(etcd_after)}), file=sys.stderr)
    # Where the 2 cores went while measuring (CPU seconds per role, and its share of the wall time)
    used = {role: round(s - before[role], 1) for role, s in cpu_shares(pids).items()}
    print(f"CPU seconds during the {elapsed:.1f} s run: {json.dumps(used)} "
          f"(total {sum(used.values()):.1f} of {2 * elapsed:.1f} on 2 cores)", file=sys.stderr)
    await channel.close()
    return elapsed, latencies


def _is_etcd(proc: Path, url: str) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"etcd") and f"--listen-client-urls={url}".encode() in cmdline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=10_000)
    parser.add_argument("--agents", type=int, default=1_000)
    parser.add_argument("--processes", type=int, default=4, help="processes the hollow agents share")
    parser.add_argument("--concurrency", type=int, default=1000,
                        help="containers submitted and not yet answered (default: as many as there are hosts, "
                        "one start in flight per host; 200 until 2026-11-28 13:30, see docs/benchmarks.md)")
    parser.add_argument("--submit", choices=("stream", "unary"), default="stream",
                        help="stream: through RunStream (the default, issue 6); unary: one Run call per container")
    parser.add_argument("--streams", type=int, default=4, help="RunStream calls that share --concurrency")
    parser.add_argument("--batch", type=int, default=64,
                        help="requests a RunStream message carries at most (1: a message each, as before session 5)")
    parser.add_argument("--sample", type=int, default=10, help="controller --sample")
    parser.add_argument("--lease-ttl", type=int, default=30,
                        help="controller --lease-ttl: heartbeats come every TTL/4 from each agent, so the default "
                        "5 s means 800 heartbeats a second from 1,000 agents (default %(default)s)")
    parser.add_argument("--agent-streams", action=argparse.BooleanOptionalAction, default=True,
                        help="the hollow agents also follow the Peers and Names streams, as real agents do (the "
                        "default; --no-agent-streams leaves them out, as the figures before 2026-11-28 did)")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="berth-bench-schedule-"))
    dev.down(NAME, state)
    info = dev.up(NAME, 1, SUBNET, state, infra_only=True, write_config=False)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        controller = f"{info.gateway}:7070"
        with (state / "controller.log").open("wb") as log:
            ctl = subprocess.Popen(
                [sys.executable, *(["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get(
                    "BENCH_PROFILE") else []), "-m", "controller", "--etcd", info.etcd, "--listen", controller,
                 "--metrics-listen", f"{info.gateway}:7071", "--sample", str(args.sample),
                 "--lease-ttl", str(args.lease_ttl), "--log-level", "WARNING",
                 # a /24 for each of 1,000 hosts (the default /16 has 256); hollow agents configure none
                 "--container-cidr", "10.128.0.0/12", "--max-txn-ops", str(etcd_server.MAX_TXN_OPS)],
                stdout=log, stderr=subprocess.STDOUT)
        procs.append(ctl)
        per = args.agents // args.processes
        hollow = []
        for i in range(args.processes):
            count = per if i < args.processes - 1 else args.agents - per * (args.processes - 1)
            with (state / f"hollow{i}.log").open("wb") as log:
                hollow.append(subprocess.Popen(
                    [sys.executable, "-m", "agent.hollow", "--controller", controller, "--count", str(count),
                     "--prefix", f"hollow-p{i}-", "--state-dir", str(state / f"hollow{i}"),
                     "--registry", info.registry, *(["--streams"] if args.agent_streams else [])],
                    stdout=log, stderr=subprocess.STDOUT))
        procs += hollow
        etcd_pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_etcd(p, info.etcd)]
        pids = {"controller": [ctl.pid], "etcd": etcd_pids, "hollow_agents": [p.pid for p in hollow],
                "client": [os.getpid()]}
        elapsed, latencies = asyncio.run(
            bench(controller, info.etcd, args.containers, args.agents, args.processes, args.concurrency, hollow, pids,
                  args.submit, args.streams, args.batch))
        result = {
            "containers": args.containers, "agents": args.agents,
            "per_second": round(args.containers / elapsed, 1),
            "api_p50_ms": round(percentile(latencies, 50), 1), "api_p99_ms": round(percentile(latencies, 99), 1),
            "controller_peak_mib": round(peak_mib(ctl.pid), 1), "in_flight": args.concurrency,
        }
        print(f"{args.containers} containers running after {elapsed:.1f} s", file=sys.stderr)
        print("RESULT " + json.dumps(result))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        dev.down(NAME, state)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
