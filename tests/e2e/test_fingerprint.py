"""Hosts' fingerprints and labels (issue 6) on a 3-host dev cluster of its own, made with
`dev up --label host1:disk=ssd --label rack=r1`: `node inspect` shows what each agent found (capacity,
platform, kernel, host name, automatic `berth.*` labels) and its own labels; constraints (`==`, `!=`) match
them; operator labels (`node update --label-add`) are kept apart, win, and survive the agent re-joining;
a container no host matches stays pending and says why.

Disruptive (an agent is killed and started again): never the session cluster."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berthctl.dev import cluster as dev_cluster
from berthctl.dev.cluster import ClusterInfo, alive
from tests.conftest import exclusive, run_berthctl, slot_name, slot_subnet
from tests.support import kill_9_keeping_command, respawn, wait_for

NAME = slot_name("bfp")
SUBNET = slot_subnet("10.77.80.0/24")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


@pytest.fixture(scope="module")
def fp(cluster_state_dir: Path) -> Iterator[ClusterInfo]:
    with exclusive(NAME):
        dev_cluster.down(NAME, cluster_state_dir)
        info = dev_cluster.up(NAME, 3, SUBNET, cluster_state_dir, write_config=False,
                              labels=["host1:disk=ssd", "rack=r1"])
        try:
            yield info
        finally:
            dev_cluster.down(NAME, cluster_state_dir)


def ctl(info: ClusterInfo, *args: str) -> subprocess.CompletedProcess[str]:
    return run_berthctl(info.controller, *args)


def ok(info: ClusterInfo, *args: str) -> str:
    out = ctl(info, *args)
    assert out.returncode == 0, f"berthctl {' '.join(args)}: {out.stderr}"
    return out.stdout


def node(info: ClusterInfo, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ok(info, "node", "inspect", name))[0]
    return doc


def container(info: ClusterInfo, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ok(info, "inspect", name))[0]["State"]
    return doc


def test_node_inspect_shows_the_agents_fingerprint_and_labels(fp: ClusterInfo) -> None:
    h1, h2 = node(fp, "host1"), node(fp, "host2")
    uname = os.uname()
    assert h1["platform"] == f"linux/{ARCH}"
    assert h1["kernel_version"] == uname.release and h1["hostname"] == uname.nodename
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    assert h1["memory_bytes"] == mem_kib * 1024
    assert h1["nano_cpus"] == len(os.sched_getaffinity(0)) * 1_000_000_000
    cgroup = "2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "1"
    assert h1["agent_labels"] == {
        "disk": "ssd", "rack": "r1", "berth.platform.os": "linux", "berth.platform.arch": ARCH,
        "berth.kernel.version": uname.release, "berth.hostname": uname.nodename, "berth.cgroup.version": cgroup,
        "berth.storage.driver": "overlay",
    }
    assert h1["user_labels"] == {} and h1["labels"] == h1["agent_labels"]
    assert "disk" not in h2["labels"] and h2["labels"]["rack"] == "r1"


def test_constraints_match_the_agents_labels_and_say_why_when_nothing_does(fp: ClusterInfo) -> None:
    ok(fp, "run", "-d", "--name", "on-ssd", "--constraint", "node.labels.disk==ssd", "busybox", "sleep", "3600")
    assert container(fp, "on-ssd")["node"] == "host1"
    ok(fp, "run", "-d", "--name", "not-ssd", "--constraint", "node.labels.disk!=ssd",
       "--constraint", f"node.platform.arch=={ARCH}", "--constraint", "node.labels.berth.storage.driver==overlay",
       "busybox", "sleep", "3600")
    assert container(fp, "not-ssd")["node"] in ("host2", "host3")

    out = ctl(fp, "run", "-d", "--name", "wants-nvme", "--constraint", "node.labels.disk==nvme",
              "busybox", "sleep", "3600")
    assert out.returncode == 0, out.stderr
    assert "pending: 0/3 hosts: 3 not matching node.labels.disk==nvme" in out.stderr
    c = container(fp, "wants-nvme")
    assert (c["state"], c["pending_reason"]) == ("pending", "0/3 hosts: 3 not matching node.labels.disk==nvme")
    ps = ok(fp, "ps")
    assert "Pending: 0/3 hosts: 3 not matching node.labels.disk==nvme" in ps

    # An operator's label makes a host fit: the pending container is placed there.
    ok(fp, "node", "update", "--label-add", "disk=nvme", "host3")
    wait_for(lambda: container(fp, "wants-nvme")["state"] == "running", 30, "wants-nvme to be placed")
    assert container(fp, "wants-nvme")["node"] == "host3"


def test_operator_labels_win_and_survive_the_agent_rejoining(fp: ClusterInfo) -> None:
    ok(fp, "node", "update", "--label-add", "disk=hdd", "host1")
    h1 = node(fp, "host1")
    assert (h1["labels"]["disk"], h1["agent_labels"]["disk"], h1["user_labels"]) == ("hdd", "ssd", {"disk": "hdd"})
    ok(fp, "run", "-d", "--name", "ssd-again", "--constraint", "node.labels.disk==ssd", "busybox", "sleep", "3600")
    assert container(fp, "ssd-again")["pending_reason"] == "0/3 hosts: 3 not matching node.labels.disk==ssd"

    # The agent dies and comes back: it joins again with its own labels; the operator's are kept.
    agent = fp.process("agent-host1")
    assert agent is not None
    cmdline, environ = kill_9_keeping_command(agent.pid)
    # alive() counts a zombie as dead; reading /proc here as well raced with the process being reaped
    wait_for(lambda: not alive(agent.pid), what="the agent to die")
    respawn(cmdline, environ, fp.hosts[0].log)
    wait_for(lambda: (n := node(fp, "host1"))["joined_at_ns"] > h1["joined_at_ns"] and n["state"] == "ready",
             30, "host1 to join again")
    h1 = node(fp, "host1")
    assert (h1["labels"]["disk"], h1["agent_labels"]["disk"], h1["user_labels"]) == ("hdd", "ssd", {"disk": "hdd"})
    assert container(fp, "ssd-again")["state"] == "pending"

    # Without the operator's label, the agent's shows through again.
    ok(fp, "node", "update", "--label-rm", "disk", "host1")
    assert node(fp, "host1")["labels"]["disk"] == "ssd"
    wait_for(lambda: container(fp, "ssd-again")["state"] == "running", 30, "ssd-again to be placed")
    assert container(fp, "ssd-again")["node"] == "host1"


def test_dev_up_refuses_a_label_for_a_host_it_does_not_make(tmp_path: Path) -> None:
    from berthctl.dev import DevError

    with pytest.raises(DevError, match=r"no host 'host4' in a cluster of 3 \(host1..host3\)"):
        dev_cluster.parse_host_labels(["host4:disk=ssd"], 3)
    with pytest.raises(DevError, match=r"write \[HOST:\]KEY=VALUE"):
        dev_cluster.parse_host_labels(["host1:disk"], 3)
    assert dev_cluster.parse_host_labels(["host2:disk=ssd", "zone=a"], 2) == {
        "host1": ["zone=a"], "host2": ["disk=ssd", "zone=a"]}
