"""How fast `run` is, end to end, on a 3-host dev cluster, against podman on the same host and image.

(a) API: from the Run call on a warm gRPC client to the container seen running (p50, p99 over N runs).
(b) CLI: wall time of the whole `berthctl run --rm busybox true` against `podman run --rm IMAGE true` of
    the same image (pulled by podman from the dev cluster's registry), alternating, N runs each.

Before it, on stderr: the sorted API samples, and where the agents' starts spent their time during the
counted runs (means of berth_agent_container_start_phase_seconds, from each agent's /metrics).

Prints one last line: RESULT {"api_p50_ms", "api_p99_ms", "cli_ms", "podman_ms", "ratio"} (medians;
ratio = cli / podman).

    sudo .venv/bin/python bench/run_latency.py [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from berth.api import control_pb2, control_pb2_grpc  # noqa: E402
from berth.api import types_pb2 as t  # noqa: E402
from berth.rpc import sync_channel  # noqa: E402
from berthctl.dev import cluster as dev  # noqa: E402

# Each test slot (BERTH_TEST_SLOT) gets its own cluster name and subnets, as the tests do.
SLOT = int(os.environ.get("BERTH_TEST_SLOT", "0"))
NAME = "bbench" if SLOT == 0 else f"bbench{SLOT}"
SUBNET = f"10.{77 + SLOT}.14.0/24"
CIDR = f"10.{88 + 2 * SLOT}.0.0/16"
PODMAN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def start_phases(info: dev.ClusterInfo) -> dict[str, tuple[float, float]]:
    """phase -> (sum of seconds, count) of the agents' start-phase histograms, all hosts together."""
    totals: dict[str, list[float]] = {}
    for host in info.hosts:
        with urllib.request.urlopen(f"http://{host.metrics_address}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        for line in text.splitlines():
            for suffix, slot in (("_sum{", 0), ("_count{", 1)):
                prefix = "berth_agent_container_start_phase_seconds" + suffix
                if line.startswith(prefix):
                    phase = line.split('phase="', 1)[1].split('"', 1)[0]
                    totals.setdefault(phase, [0.0, 0.0])[slot] += float(line.rsplit(" ", 1)[1])
    return {phase: (v[0], v[1]) for phase, v in totals.items()}


def api_latency(info: dev.ClusterInfo, runs: int) -> tuple[list[float], dict[str, float]]:
    """The samples (ms), and the mean of each start phase on the agents over the counted runs (ms)."""
    stub = control_pb2_grpc.ControlStub(sync_channel(info.controller))
    stub.ListNodes(control_pb2.ListNodesRequest())  # warm the channel
    # One run pinned to each host first, uncounted: it pulls the image there (placement alone need not
    # reach every host in the first few runs, and a pull among the counted runs is a ~300 ms outlier).
    for host in info.hosts:
        spec = t.ContainerSpec(name=f"warm-{host.name}", image="busybox", command=["true"],
                               constraints=[f"node.name=={host.name}"])
        events = list(stub.Run(control_pb2.RunRequest(spec=spec)))
        assert events and events[0].started.status.state in (t.STATE_RUNNING, t.STATE_EXITED), events
        stub.Remove(control_pb2.RemoveRequest(ref=spec.name, force=True))
    samples = []
    before = start_phases(info)
    for i in range(runs):
        spec = t.ContainerSpec(name=f"lat{i}", image="busybox", command=["sleep", "1000"])
        t0 = time.perf_counter()
        events = list(stub.Run(control_pb2.RunRequest(spec=spec)))
        elapsed = time.perf_counter() - t0
        assert events and events[0].started.status.state == t.STATE_RUNNING, events
        samples.append(elapsed * 1000)
        stub.Remove(control_pb2.RemoveRequest(ref=f"lat{i}", force=True))
    after = start_phases(info)
    means = {}
    for phase, (total, count) in after.items():
        old_total, old_count = before.get(phase, (0.0, 0.0))
        if count > old_count:
            means[phase] = (total - old_total) / (count - old_count) * 1000
    return samples, means


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    if shutil.which("podman") is None:
        sys.exit("podman is not installed: apt-get install podman (scripts/install-deps does)")
    state = Path(tempfile.mkdtemp(prefix="berth-bench-"))
    dev.down(NAME, state)
    info = dev.up(NAME, 3, SUBNET, state, write_config=False, container_cidr=CIDR)
    try:
        api, phases = api_latency(info, args.runs)
        print("api ms, sorted:", " ".join(f"{x:.0f}" for x in sorted(api)), file=sys.stderr)
        print("agent start phases, mean ms:", ", ".join(f"{p} {ms:.1f}" for p, ms in phases.items()), file=sys.stderr)
        image = f"{info.registry}/library/busybox:latest"
        subprocess.run(["podman", "pull", "--tls-verify=false", "-q", image], check=True,
                       stdout=subprocess.DEVNULL)
        env = {**os.environ, "BERTH_CONTROLLER": info.controller}
        berthctl = [str(Path(sys.executable).parent / "berthctl"), "run", "--rm", "busybox", "true"]
        podman = ["podman", "run", "--rm", *PODMAN_FLAGS, image, "true"]
        timed(berthctl, env), timed(podman, env)  # warm both
        cli, pod = [], []
        for _ in range(args.runs):
            cli.append(timed(berthctl, env))
            pod.append(timed(podman, env))
    finally:
        dev.down(NAME, state)
        shutil.rmtree(state, ignore_errors=True)
    result = {
        "runs": args.runs,
        "api_p50_ms": round(statistics.median(api), 1),
        "api_p99_ms": round(percentile(api, 99), 1),
        "cli_ms": round(statistics.median(cli), 1),
        "podman_ms": round(statistics.median(pod), 1),
    }
    result["ratio"] = round(result["cli_ms"] / result["podman_ms"], 3)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
