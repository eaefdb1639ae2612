"""Issue 6 on a dev cluster of its own (3 controllers on one etcd, 3 hosts): leader failover with kill -9, the
CLI and agents carrying on over several controller addresses, a host cut off (its --restart always container
runs elsewhere, a container without a policy shows lost; back from the partition it stops its duplicate and
keeps its files), drain, constraints with a pending reason and node labels.

Disruptive: never the session cluster. The tests run in file order and share the cluster."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from berthctl.dev import cluster as dev_cluster
from berthctl.dev.cluster import ClusterInfo
from tests.conftest import exclusive, run_berthctl, slot_name, slot_subnet
from tests.support import wait_for

NAME = slot_name("bha")
SUBNET = slot_subnet("10.77.70.0/24")


@pytest.fixture(scope="module")
def ha(cluster_state_dir: Path) -> Iterator[ClusterInfo]:
    with exclusive(NAME):
        dev_cluster.down(NAME, cluster_state_dir)
        info = dev_cluster.up(NAME, 3, SUBNET, cluster_state_dir, write_config=False, controllers=3)
        try:
            yield info
        finally:
            dev_cluster.down(NAME, cluster_state_dir)


def ctl(info: ClusterInfo, *args: str) -> subprocess.CompletedProcess[str]:
    return run_berthctl(info.controller_list, *args)


def ok(info: ClusterInfo, *args: str) -> str:
    out = ctl(info, *args)
    assert out.returncode == 0, f"berthctl {' '.join(args)}: {out.stderr}"
    return out.stdout


def containers(info: ClusterInfo) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in json.loads(ok(info, "ps", "-a", "-o", "json"))}


def nodes(info: ClusterInfo) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in json.loads(ok(info, "node", "ls", "-o", "json"))}


def etcd_get(info: ClusterInfo, key: str) -> str:
    return subprocess.run(
        ["etcdctl", f"--endpoints={info.etcd}", "get", "--print-value-only", key],
        capture_output=True, text=True, check=True, env={**os.environ, "ETCDCTL_API": "3"},
    ).stdout.strip()


def controller_pid(info: ClusterInfo, listen: str) -> int:
    i = info.controller_list.split(",").index(listen)
    proc = info.process("controller" if i == 0 else f"controller{i + 1}")
    assert proc is not None
    return proc.pid


def running_on(info: ClusterInfo, name: str, node: str | None = None) -> dict[str, Any] | None:
    c = containers(info).get(name)
    if c is not None and c["state"] == "running" and (node is None or c["node"] == node):
        return c
    return None


def set_link(info: ClusterInfo, host: str, up: bool) -> None:
    """Cut (or restore) a host's only link, on the bridge side."""
    index = int(host.removeprefix("host"))
    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=f"bv{index}-{info.name}")
        ipr.link("set", index=idx, state="up" if up else "down")


def test_leader_killed_another_takes_over_and_the_cluster_carries_on(ha: ClusterInfo) -> None:
    addresses = ha.controller_list.split(",")
    leader = wait_for(lambda: etcd_get(ha, "/berth/leader"), 30, "a leader")
    listen = leader.split(":", 1)[1]
    assert listen in addresses
    os.kill(controller_pid(ha, listen), signal.SIGKILL)
    new = wait_for(lambda: (v := etcd_get(ha, "/berth/leader")) and v != leader and v, 30, "a new leader")
    assert new.split(":", 1)[1] in addresses
    # berthctl given the dead controller first carries on with the next; agents that were connected to
    # it reconnect and stay ready.
    dead_first = ",".join([listen, *(a for a in addresses if a != listen)])
    out = run_berthctl(dead_first, "run", "-d", "--name", "after-failover", "busybox", "sleep", "3600")
    assert out.returncode == 0, out.stderr
    assert running_on(ha, "after-failover")
    wait_for(lambda: all(n["state"] == "ready" for n in nodes(ha).values()), 30, "every host ready")
    # The new leader's sweep places a container that waited for a host.
    ok(ha, "run", "-d", "--name", "waits", "--constraint", "node.labels.zone==b", "busybox", "sleep", "3600")
    assert containers(ha)["waits"]["pending_reason"] == "0/3 hosts: 3 not matching node.labels.zone==b"
    ok(ha, "node", "update", "--label-add", "zone=b", "host3")
    assert wait_for(lambda: running_on(ha, "waits", "host3"), 30, "the new leader to place it")
    assert nodes(ha)["host3"]["labels"]["zone"] == "b"
    ok(ha, "rm", "-f", "after-failover", "waits")


def test_host_cut_off_its_restart_always_container_runs_elsewhere(ha: ClusterInfo) -> None:
    ok(ha, "run", "-d", "--restart", "always", "--name", "web", "busybox", "sleep", "3600")
    web = containers(ha)["web"]
    host = web["node"]
    ok(ha, "run", "-d", "--name", "pet", "--constraint", f"node.name=={host}", "busybox", "sleep", "3600")
    pet = running_on(ha, "pet", host)
    assert pet is not None
    ok(ha, "run", "-d", "--name", "halt", "--constraint", f"node.name=={host}", "busybox", "sleep", "3600")
    halt = running_on(ha, "halt", host)
    assert halt is not None
    marker = Path(next(h.state_dir for h in ha.hosts if h.name == host)) / "containers" / web["id"]
    assert marker.is_dir()
    set_link(ha, host, up=False)
    try:
        moved = wait_for(lambda: (c := running_on(ha, "web")) and c["node"] != host and c, 60, "web elsewhere")
        assert moved["id"] == web["id"]
        assert containers(ha)["pet"]["state"] == "lost"
        assert os.path.exists(f"/proc/{web['pid']}"), "cut off, the old copy still runs (a duplicate)"
        # A stop of a container on the dead host is recorded and answered at once, with a warning (it waited
        # for the agent's word: DEADLINE_EXCEEDED after the stop timeout + 30 s).
        out = ctl(ha, "stop", "halt")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["halt"]
        assert out.stderr.strip() == (f"berthctl: warning: halt: host {host} is down; it is stopped when its host "
                                      "is back (or berthctl rm -f it)")
        assert _alive(halt["pid"]), "cut off, nothing reaches its agent yet"
    finally:
        set_link(ha, host, up=True)
    # Back from the partition, the host stops its duplicate and keeps its files.
    wait_for(lambda: not _alive(web["pid"]), 60, "the duplicate to stop")
    assert marker.is_dir()
    assert running_on(ha, "web", moved["node"])
    # The agent notices the cut through gRPC keepalives, then rejoins with back-off: allow for a loaded machine.
    wait_for(lambda: running_on(ha, "pet", host), 90, "pet to show running again")
    # ... and carries out the stop recorded while it was away.
    wait_for(lambda: containers(ha)["halt"]["state"] == "exited", 60, "halt stopped by its agent once back")
    assert not _alive(halt["pid"])
    ok(ha, "rm", "halt")


def test_drain_moves_what_can_move_and_waits(ha: ClusterInfo) -> None:
    # Every host must be back from the previous test's partition before reasons can be counted.
    wait_for(lambda: all(n["state"] == "ready" for n in nodes(ha).values()), 90, "all hosts ready")
    web = running_on(ha, "web")
    assert web is not None
    out = ctl(ha, "node", "update", "--availability", "drain", web["node"])
    assert out.returncode == 0, out.stderr
    try:
        # When update returns, web already runs on another host; pet (no restart policy) stays.
        after = running_on(ha, "web")
        assert after is not None and after["node"] != web["node"]
        assert nodes(ha)[web["node"]]["availability"] == "drain"
        out = ctl(ha, "run", "-d", "--name", "no-room", "--constraint", f"node.name=={web['node']}", "busybox")
        assert out.returncode == 0, out.stderr
        assert containers(ha)["no-room"]["pending_reason"] == "0/3 hosts: 2 not matching node.name==" + web[
            "node"] + ", 1 paused or drained"
    finally:
        ok(ha, "node", "update", "--availability", "active", web["node"])
    ok(ha, "rm", "-f", "web", "pet", "no-room")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def etcd_prefix(info: ClusterInfo, prefix: str) -> dict[str, str]:
    """Every key under prefix and its value (protobuf values decoded loosely: enough to find an id in)."""
    out = json.loads(subprocess.run(
        ["etcdctl", f"--endpoints={info.etcd}", "get", "--prefix", "-w", "json", prefix],
        capture_output=True, text=True, check=True, env={**os.environ, "ETCDCTL_API": "3"},
    ).stdout)
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode(errors="replace")
            for kv in out.get("kvs", [])}


def test_node_rm_refuses_a_live_host_and_removes_a_dead_one(ha: ClusterInfo) -> None:
    """Last in the file: host3 is gone afterwards."""
    wait_for(lambda: all(n["state"] == "ready" for n in nodes(ha).values()), 90, "all hosts ready")
    out = ctl(ha, "node", "rm", "host3")
    assert out.returncode != 0 and "is up: drain it and stop its agent first, or use --force" in out.stderr
    assert "host3" in nodes(ha)
    out = ctl(ha, "node", "rm", "no-such-host")
    assert out.returncode != 0 and "no-such-host" in out.stderr
    ok(ha, "run", "-d", "--name", "left", "--constraint", "node.name==host3", "busybox", "sleep", "3600")
    assert running_on(ha, "left", "host3")
    host3 = nodes(ha)["host3"]
    subnets = {k: v for k, v in etcd_prefix(ha, "/berth/subnets/").items() if v == host3["id"]}
    assert len(subnets) == 1, "host3's container subnet claim"

    agent = ha.process("agent-host3")
    assert agent is not None
    os.kill(agent.pid, signal.SIGKILL)
    wait_for(lambda: nodes(ha)["host3"]["state"] == "down", 60, "host3 down")
    ok(ha, "node", "rm", "host3")
    assert "host3" not in nodes(ha)
    out = ctl(ha, "node", "inspect", "host3")
    assert out.returncode != 0 and "host3" in out.stderr
    # Its container is shown lost (not running for ever); the subnet stays marked as a removed node's while
    # the container holds an address in it (a new host gets it once nothing names host3: controller.network);
    # nothing else of the host or the container stays in etcd.
    assert containers(ha)["left"]["state"] == "lost"
    (key,) = subnets
    assert etcd_prefix(ha, key)[key] == "removed/" + host3["id"]
    ok(ha, "rm", "-f", "left")
    assert "left" not in containers(ha)
    assert [k for k, v in etcd_prefix(ha, "/berth/").items() if host3["id"] in k + v] == [key]
    # The other hosts carry on.
    ok(ha, "run", "-d", "--name", "after-rm", "busybox", "sleep", "3600")
    assert running_on(ha, "after-rm")["node"] in ("host1", "host2")  # type: ignore[index]
    ok(ha, "rm", "-f", "after-rm")
