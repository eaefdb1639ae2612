"""etcd restarted under load (issue 6), on a dev cluster of its own (2 controllers, 2 hosts): containers are
being submitted while etcd is killed and started again on the same data; afterwards controllers and agents
have reconnected, every container the API acknowledged runs exactly once (one assignment, one process),
none is lost, and the cluster takes new work."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berthctl.dev import cluster as dev_cluster
from berthctl.dev import etcd as etcd_server
from berthctl.dev.cluster import ClusterInfo
from tests.conftest import exclusive, run_berthctl, slot_name, slot_subnet
from tests.support import etcd_keys, wait_for

NAME = slot_name("bet")
SUBNET = slot_subnet("10.77.74.0/24")


@pytest.fixture(scope="module")
def ec(cluster_state_dir: Path) -> Iterator[ClusterInfo]:
    with exclusive(NAME):
        dev_cluster.down(NAME, cluster_state_dir)
        info = dev_cluster.up(NAME, 2, SUBNET, cluster_state_dir, write_config=False, controllers=2)
        try:
            yield info
        finally:
            dev_cluster.down(NAME, cluster_state_dir)


def ps(info: ClusterInfo) -> list[dict[str, Any]]:
    out = run_berthctl(info.controller_list, "ps", "-a", "-o", "json")
    assert out.returncode == 0, out.stderr
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


def test_etcd_restarted_under_load_nothing_lost_or_duplicated(ec: ClusterInfo) -> None:
    acknowledged: list[str] = []
    failed: list[str] = []

    def submit() -> None:
        for i in range(24):
            out = run_berthctl(ec.controller_list, "run", "-d", "--name", f"load{i}", "busybox", "sleep", "3600")
            (acknowledged if out.returncode == 0 else failed).append(f"load{i}")

    loader = threading.Thread(target=submit)
    loader.start()
    try:
        wait_for(lambda: len(acknowledged) >= 4, 60, "the first containers")
        etcd = ec.process("etcd")
        assert etcd is not None
        os.kill(etcd.pid, signal.SIGKILL)
        wait_for(lambda: not etcd_server.healthy(ec.etcd), 10, "etcd to die")
        cdir = Path(ec.state_dir)
        proc = etcd_server.start(ec.gateway, cdir / "etcd", cdir / "etcd.log", dev_cluster._child_env(cdir))
        etcd_server.wait_healthy(ec.etcd, proc, cdir / "etcd.log")
    finally:
        loader.join(timeout=300)
    assert acknowledged, failed
    # Agents and controllers are back: every host ready, and new work runs.
    wait_for(lambda: (out := run_berthctl(ec.controller_list, "node", "ls", "-o", "json")).returncode == 0
             and all(n["state"] == "ready" for n in json.loads(out.stdout)), 60, "hosts ready again")
    out = run_berthctl(ec.controller_list, "run", "-d", "--name", "after", "busybox", "sleep", "3600")
    assert out.returncode == 0, out.stderr
    # Every acknowledged container runs, once: placed on one node (its assignment, issue 6), one process.
    def all_running() -> list[dict[str, Any]]:
        cs = ps(ec)
        return cs if all(c["state"] == "running" for c in cs if c["name"] in acknowledged) else []

    containers = {c["name"]: c for c in wait_for(all_running, 60, "acknowledged containers running")}
    assert set(acknowledged) <= set(containers)
    assert etcd_keys(ec.etcd, "/berth/assignments/") == []  # issue 6: the container key is the assignment
    for name in acknowledged:
        assert containers[name]["node"], name
    pids = [c["pid"] for c in containers.values() if c["state"] == "running"]
    assert len(pids) == len(set(pids))
    # No host runs a copy the cluster does not know of: each container has one cgroup, on its own host.
    where: dict[str, list[str]] = {}
    for host in ec.hosts:
        base = Path(f"/sys/fs/cgroup/memory/berth-{ec.name}/{host.name}")
        for d in base.iterdir() if base.is_dir() else []:
            if d.is_dir():
                where.setdefault(d.name, []).append(host.name)
    for name in acknowledged:
        c = containers[name]
        assert where.get(c["id"]) == [c["node"]], (name, where.get(c["id"]))
