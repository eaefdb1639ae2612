"""Failover times on a dev cluster of 3 hosts and 3 controllers, default settings (host lease 5 s, leader
lease 5 s), 5 trials each:

(a) host death -> rescheduled and running: a `--restart always` container's host loses its link (to the
    controllers it is dead; its processes cannot be told apart from a crashed host's), until the container
    is reported running on another host. The link comes back between trials.
(b) leader death -> first new placement: a container waits (pending, its constraint matches no host); the
    leader controller is killed with SIGKILL while a label that lets it fit is added through another
    controller; only the leader's sweep places pending containers, so its placement marks the new leader at
    work. The killed controller is started again between trials.

Prints one last line: RESULT {"host_death_to_running_s": ..., "leader_death_to_placement_s": ...} (medians).

    sudo .venv/bin/python bench/failover.py [--trials 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyroute2 import IPRoute  # noqa: E402

from berth.api import control_pb2, control_pb2_grpc  # noqa: E402
from berth.api import types_pb2 as t  # noqa: E402
from berthctl.client import Connection  # noqa: E402
from berthctl.dev import cluster as dev  # noqa: E402
from tests.conftest import slot_name, slot_subnet  # noqa: E402

NAME, SUBNET = slot_name("bfail"), slot_subnet("10.77.73.0/24")


def wait(condition: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()  # type: ignore[operator]
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def container(stub: control_pb2_grpc.ControlStub, ref: str) -> t.Container:
    return stub.Inspect(control_pb2.ContainerRef(ref=ref), timeout=10)


def set_link(info: dev.ClusterInfo, host: str, up: bool) -> None:
    index = int(host.removeprefix("host"))
    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=f"bv{index}-{info.name}")
        ipr.link("set", index=idx, state="up" if up else "down")


def etcd_get(info: dev.ClusterInfo, key: str) -> str:
    return subprocess.run(["etcdctl", f"--endpoints={info.etcd}", "get", "--print-value-only", key],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "ETCDCTL_API": "3"}).stdout.strip()


def host_death(info: dev.ClusterInfo, stub: control_pb2_grpc.ControlStub, trial: int) -> float:
    name = f"hd{trial}"
    events = list(stub.Run(control_pb2.RunRequest(spec=t.ContainerSpec(
        name=name, image="busybox", command=["sleep", "3600"], restart_policy="always")), timeout=60))
    host = events[0].started.node_id
    set_link(info, host, up=False)
    t0 = time.monotonic()
    try:
        wait(lambda: (c := container(stub, name)).node_id not in ("", host) and c.status.state == t.STATE_RUNNING,
             60, f"{name} running elsewhere")
        elapsed = time.monotonic() - t0
    finally:
        set_link(info, host, up=True)
    wait(lambda: host in {n.id for n in stub.ListNodes(control_pb2.ListNodesRequest()).nodes
                          if n.state == t.NODE_READY}, 60, f"{host} back")
    stub.Remove(control_pb2.RemoveRequest(ref=name, force=True))
    return elapsed


def leader_death(info: dev.ClusterInfo, addresses: list[str], trial: int,
                 restarted: list[subprocess.Popen[bytes]]) -> float:
    leader = wait(lambda: etcd_get(info, "/berth/leader"), 30, "a leader")
    listen = str(leader).split(":", 1)[1]
    others = [a for a in addresses if a != listen]
    conn = Connection(",".join(others))
    stub = conn.control
    name, label = f"ld{trial}", f"trial{trial}"
    list(stub.Run(control_pb2.RunRequest(spec=t.ContainerSpec(
        name=name, image="busybox", command=["sleep", "3600"], constraints=[f"node.labels.fit=={label}"]))))
    pid = next((p.pid for p in restarted if listen in " ".join(map(str, p.args))), 0)  # type: ignore[arg-type]
    if not pid:
        i = addresses.index(listen)
        proc = info.process("controller" if i == 0 else f"controller{i + 1}")
        assert proc is not None
        pid = proc.pid
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    stub.UpdateNode(control_pb2.UpdateNodeRequest(ref="host1", label_add={"fit": label}), timeout=10)
    wait(lambda: container(stub, name).node_id, 60, f"{name} placed by a new leader")
    elapsed = time.monotonic() - t0
    stub.Remove(control_pb2.RemoveRequest(ref=name, force=True))
    # Start the killed controller again, as the dev cluster did.
    port = int(listen.rsplit(":", 1)[1])
    cdir = Path(info.state_dir)
    with (cdir / f"controller-restart{trial}.log").open("wb") as log:
        restarted.append(subprocess.Popen(
            [sys.executable, "-m", "controller", "--etcd", info.etcd, "--listen", listen,
             "--metrics-listen", f"{info.gateway}:{port + 1}"],
            stdout=log, stderr=subprocess.STDOUT, env=dev._child_env(cdir), start_new_session=True))
    conn.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="berth-bench-failover-"))
    dev.down(NAME, state)
    info = dev.up(NAME, 3, SUBNET, state, write_config=False, controllers=3)
    restarted: list[subprocess.Popen[bytes]] = []
    try:
        addresses = info.controller_list.split(",")
        conn = Connection(info.controller_list)
        hosts = [host_death(info, conn.control, i) for i in range(args.trials)]
        print("host death -> running elsewhere, s:", " ".join(f"{x:.2f}" for x in hosts), file=sys.stderr)
        leaders = [leader_death(info, addresses, i, restarted) for i in range(args.trials)]
        print("leader death -> first placement, s:", " ".join(f"{x:.2f}" for x in leaders), file=sys.stderr)
        conn.close()
        print("RESULT " + json.dumps({"host_death_to_running_s": round(statistics.median(hosts), 2),
                                      "leader_death_to_placement_s": round(statistics.median(leaders), 2)}))
    finally:
        for p in restarted:
            p.kill()
            p.wait()
        dev.down(NAME, state)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
