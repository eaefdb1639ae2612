"""`berthctl dev`: up, status, down, and that down leaves nothing behind.

These clusters use their own names and subnets (10.77.201-206.0/24) so that they never collide with the
session cluster (`btest`, 10.77.9.0/24) from conftest, the default dev cluster (10.77.0.0/24) or the
benchmarks.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berthctl.dev import ClusterExistsError, DevError, StartError
from berthctl.dev import cluster as dev_cluster
from berthctl.dev import etcd as dev_etcd
from tests.conftest import exclusive, slot_name, slot_subnet
from tests.support import kill_9_keeping_command, respawn, wait_for

STATE_DIR = Path(tempfile.gettempdir()) / "berth-test-dev"
CLUSTER_NAMES = tuple(slot_name(n) for n in ("bdinf", "bdev", "bdsub", "bdsub2", "bdfail", "bdstray", "bnever", "bbad"))


def dev_cli(
    *args: str, timeout: float = 180.0, config_home: str = "/nonexistent-berth-test-config"
) -> subprocess.CompletedProcess[str]:
    """`berthctl dev ARGS...`; the CLI config goes under `config_home`, never the tester's own."""
    return subprocess.run(
        [sys.executable, "-m", "berthctl", "dev", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "XDG_CONFIG_HOME": config_home},
    )


def connect(address: str, timeout: float = 10.0) -> None:
    """TCP-connect to host:port, retrying until `timeout` (a listener may be a moment behind)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def connect_from_netns(ns: str, address: str) -> subprocess.CompletedProcess[str]:
    """TCP-connect to `address` from inside network namespace `ns` (a child process enters it)."""
    host, port = address.rsplit(":", 1)
    code = (
        "import socket, sys; from pyroute2 import netns; netns.setns(sys.argv[1], flags=0); "
        "socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5).close()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, ns, host, port], capture_output=True, text=True, timeout=30, check=False
    )


def _mountinfo() -> list[tuple[str, str]]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), left.split()[4])
        mounts.append((point, right.split()[0]))
    return mounts


def leftovers(name: str, state_dir: Path) -> list[str]:
    """Everything of dev cluster `name` still present on this machine, checked without berthctl's code."""
    cdir = state_dir / name
    found: list[str] = []
    found += (
        [f"netns {ns}" for ns in os.listdir("/var/run/netns") if re.match(rf"^{name}-host[0-9]+$", ns)]
        if os.path.isdir("/var/run/netns")
        else []
    )
    link_re = re.compile(rf"^(bb|b[vp][0-9]+)-{re.escape(name)}$")
    found += [f"link {ln}" for ln in os.listdir("/sys/class/net") if link_re.match(ln)]
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and re.search(re.escape(str(cdir)).encode() + rb"(?![\w.-])", cmdline):
            args = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"process {pid}: {args}")
    for point, fstype in _mountinfo():
        if fstype in ("cgroup", "cgroup2") and os.path.exists(os.path.join(point, f"berth-{name}")):
            found.append(f"cgroup {point}/berth-{name}")
        if point == str(cdir) or point.startswith(f"{cdir}/"):
            found.append(f"mount {point}")
    if cdir.exists():
        found.append(f"dir {cdir}")
    return found


@pytest.fixture(autouse=True)
def one_session_at_a_time() -> Iterator[None]:
    """The clusters made here have fixed names and a fixed state dir: another test session on this
    machine must not share them, and whatever a killed session left behind is removed first."""
    with exclusive("test_dev"):
        for name in CLUSTER_NAMES:
            dev_cluster.down(name, STATE_DIR)
        yield


@pytest.fixture
def state_dir() -> Path:
    return STATE_DIR


@pytest.fixture
def cleanup(state_dir: Path) -> Iterator[list[str]]:
    """Names to `down` after the test whatever happened; the test appends to it."""
    names: list[str] = []
    yield names
    for name in names:
        dev_cluster.down(name, state_dir)


def check_status_json(info: dev_cluster.ClusterInfo, state_dir: Path, berth: bool) -> dict[str, Any]:
    res = dev_cli("status", "--name", info.name, "--state-dir", str(state_dir), "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    gw = str(info.gateway)
    assert data["name"] == info.name
    assert data["bridge"] == f"bb-{info.name}"
    assert data["etcd"] == f"http://{gw}:2379"
    assert data["registry"] == f"{gw}:5000"
    assert data["controller"] == f"{gw}:7070"
    assert data["controller_metrics"] == f"{gw}:7071"
    roles = {p["role"]: p for p in data["processes"]}
    expected = {"etcd", "registry"} | ({"controller"} | {f"agent-{h.name}" for h in info.hosts} if berth else set())
    assert set(roles) == expected
    assert all(p["alive"] and p["pid"] > 0 for p in roles.values()), roles
    for i, host in enumerate(data["hosts"], start=1):
        ip = str(ipaddress.IPv4Network(info.subnet)[10 + i])
        assert host["name"] == f"host{i}"
        assert host["netns"] == f"{info.name}-host{i}"
        assert host["address"] == ip
        assert host["agent_address"] == f"{ip}:7072"
        assert host["metrics_address"] == f"{ip}:7073"
        assert host["state_dir"] == str(state_dir / info.name / "hosts" / f"host{i}")
    return data


def test_infra_up_status_down(state_dir: Path, cleanup: list[str]) -> None:
    """--no-berth: network, etcd and registry only."""
    name = slot_name("bdinf")
    cleanup.append(name)
    info = dev_cluster.up(name, 2, slot_subnet("10.77.201.0/24"), state_dir, infra_only=True, write_config=False)

    check_status_json(info, state_dir, berth=False)
    assert {f"{name}-host1", f"{name}-host2"} <= set(os.listdir("/var/run/netns"))  # others' clusters may be up
    assert dev_etcd.healthy(info.etcd)
    for host in info.hosts:
        res = connect_from_netns(host.netns, f"{info.gateway}:2379")
        assert res.returncode == 0, f"{host.netns} cannot reach etcd: {res.stderr}"
        res = connect_from_netns(host.netns, info.registry)
        assert res.returncode == 0, f"{host.netns} cannot reach the registry: {res.stderr}"
    manifest = urllib.request.Request(
        f"http://{info.registry}/v2/library/busybox/manifests/latest",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"},
        method="HEAD",
    )
    with urllib.request.urlopen(manifest, timeout=5) as resp:
        assert resp.status == 200, "the registry was not seeded with busybox"
    table = dev_cli("status", "--name", name, "--state-dir", str(state_dir))
    assert table.returncode == 0 and "running" in table.stdout and f"{name}-host2" in table.stdout

    # A second up on the same name refuses, says what to do, and leaves the first cluster alone.
    with pytest.raises(ClusterExistsError, match=rf"already exists .*berthctl dev down --name {name}"):
        dev_cluster.up(name, 2, slot_subnet("10.77.202.0/24"), state_dir, infra_only=True, write_config=False)
    res = dev_cli(
        "up", "--name", name, "--state-dir", str(state_dir), "--subnet", slot_subnet("10.77.202.0/24"), "--no-berth"
    )
    assert res.returncode == 1
    assert f"run berthctl dev down --name {name} --state-dir {state_dir} first" in res.stderr
    assert dev_etcd.healthy(info.etcd)

    res = dev_cli("down", "--name", name, "--state-dir", str(state_dir))
    assert res.returncode == 0, res.stdout + res.stderr
    assert leftovers(name, state_dir) == []


def test_up_status_down(state_dir: Path, cleanup: list[str], tmp_path: Path) -> None:
    """The whole cluster from the CLI: controller and agents in their namespaces, every host NODE_READY,
    berthctl configured to use it."""
    name = slot_name("bdev")
    cleanup.append(name)
    config_home = tmp_path / "config"
    args = ("--name", name, "--state-dir", str(state_dir))
    res = dev_cli("up", *args, "--hosts", "2", "--subnet", slot_subnet("10.77.203.0/24"), config_home=str(config_home))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"dev cluster '{name}' is up in " in res.stdout
    assert "berthctl run busybox echo hello" in res.stdout
    assert f"berthctl dev down --name {name} --state-dir {state_dir}" in res.stdout
    config = config_home / "berth" / "config.json"
    assert json.loads(config.read_text()) == {"controller": slot_subnet("10.77.203.1/24").split("/")[0] + ":7070"}
    info = dev_cluster.load(name, state_dir)

    nodes = subprocess.run(
        [sys.executable, "-m", "berthctl", "node", "ls", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "XDG_CONFIG_HOME": str(config_home)},
    )
    assert nodes.returncode == 0, nodes.stderr
    assert "host1" in nodes.stdout and "host2" in nodes.stdout

    check_status_json(info, state_dir, berth=True)
    assert [h.netns for h in info.hosts] == [f"{name}-host1", f"{name}-host2"]
    for ns in (h.netns for h in info.hosts):
        assert os.path.exists(f"/var/run/netns/{ns}")
    for host in info.hosts:
        connect(host.agent_address)  # from the root namespace, through the bridge
    connect(info.controller)
    # An agent started again, as tests do (not in cluster.json), is stopped first with the recorded one
    # (stopped with the supervisors instead, one restarted its supervisor while dying: left running).
    agent = info.process("agent-host1")
    assert agent is not None
    respawn(*kill_9_keeping_command(agent.pid), info.hosts[0].log)
    wait_for(lambda: _listening(info.hosts[0].agent_address), what="the agent started again")

    res = dev_cli("down", *args, config_home=str(config_home))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "stopping 2 agents" in res.stdout, res.stdout
    assert res.stdout.endswith(f"dev cluster '{name}' removed\n")
    assert leftovers(name, state_dir) == []
    assert not config.exists(), "down leaves berthctl pointing at a cluster that is gone"


def _listening(address: str) -> bool:
    try:
        connect(address, timeout=0.5)
    except OSError:
        return False
    return True


def test_down_of_unknown_cluster_is_quiet(state_dir: Path) -> None:
    res = dev_cli("down", "--name", slot_name("bnever"), "--state-dir", str(state_dir))
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    dev_cluster.down(slot_name("bnever"), state_dir)


def test_status_of_unknown_cluster(state_dir: Path) -> None:
    res = dev_cli("status", "--name", slot_name("bnever"), "--state-dir", str(state_dir))
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"berthctl: no dev cluster '{slot_name('bnever')}' under {state_dir}; start one with berthctl dev up"
    )


@pytest.mark.parametrize(
    ("name", "hosts", "subnet", "message"),
    [
        ("Bad_Name", 1, "10.77.5.0/24", "invalid cluster name 'Bad_Name'"),
        ("averyveryverylongname", 1, "10.77.5.0/24", "too long for interface names"),
        ("bbad", 0, "10.77.5.0/24", "--hosts must be between 1 and 99, not 0"),
        ("bbad", 1, "10.77.5.0/29", "subnet 10.77.5.0/29 is too small for 1 hosts"),
        ("bbad", 1, "10.77.5.1/24", "invalid --subnet '10.77.5.1/24'"),
        ("bbad", 1, "nonsense", "invalid --subnet 'nonsense'"),
    ],
)
def test_bad_input(state_dir: Path, name: str, hosts: int, subnet: str, message: str) -> None:
    with pytest.raises(DevError, match=re.escape(message)):
        dev_cluster.up(name, hosts, subnet, state_dir, infra_only=True, write_config=False)
    assert leftovers(name, state_dir) == []


def test_subnet_in_use(state_dir: Path, cleanup: list[str]) -> None:
    cleanup.append(slot_name("bdsub"))
    dev_cluster.up(slot_name("bdsub"), 1, slot_subnet("10.77.204.0/24"), state_dir, infra_only=True, write_config=False)
    with pytest.raises(
        DevError,
        match=re.escape(f"subnet {slot_subnet('10.77.204.0/24')} is already in use by bb-{slot_name('bdsub')}"),
    ):
        dev_cluster.up(
            slot_name("bdsub2"), 1, slot_subnet("10.77.204.0/24"), state_dir, infra_only=True, write_config=False
        )
    assert leftovers(slot_name("bdsub2"), state_dir) == []


def test_failure_half_way_tears_down_and_keeps_logs(
    state_dir: Path, cleanup: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd dies at start: up removes the network it made and points at the kept etcd log."""
    name = slot_name("bdfail")
    cleanup.append(name)

    def broken_etcd(host: str, data_dir: Path) -> list[str]:
        return ["/bin/sh", "-c", "echo 'etcd: simulated start-up failure' >&2; exit 3"]

    monkeypatch.setattr(dev_etcd, "command", broken_etcd)
    with pytest.raises(StartError) as raised:
        dev_cluster.up(name, 2, slot_subnet("10.77.205.0/24"), state_dir, infra_only=True, write_config=False)
    kept = state_dir / f"{name}.failed" / "etcd.log"
    assert str(raised.value) == f"etcd exited with status 3 while starting; read {kept}"
    assert "simulated start-up failure" in kept.read_text()
    assert leftovers(name, state_dir) == []

    dev_cluster.down(name, state_dir)
    assert not kept.exists()


def cgroup_mounts() -> list[str]:
    return [point for point, fstype in _mountinfo() if fstype in ("cgroup", "cgroup2")]


def test_down_without_cluster_json_removes_strays(state_dir: Path, cleanup: list[str]) -> None:
    """down finds what a crashed agent or a lost cluster.json would leave: processes in a host namespace,
    processes in the cluster's cgroups, mounts under the state dir."""
    name = slot_name("bdstray")
    cleanup.append(name)
    info = dev_cluster.up(name, 1, slot_subnet("10.77.206.0/24"), state_dir, infra_only=True, write_config=False)
    host = info.hosts[0]
    cdir = state_dir / name

    # A process inside the host's namespace, its command line naming nothing of the cluster.
    code = "import sys, time; from pyroute2 import netns; netns.setns(sys.argv[1], flags=0); time.sleep(600)"
    in_netns = subprocess.Popen([sys.executable, "-c", code, host.netns])
    want = os.stat(f"/var/run/netns/{host.netns}")
    deadline = time.monotonic() + 10
    while (os.stat(f"/proc/{in_netns.pid}/ns/net").st_ino, in_netns.poll()) != (want.st_ino, None):
        assert time.monotonic() < deadline, "the stray never entered the namespace"
        time.sleep(0.05)

    # A "container": a process in a nested cgroup of the cluster, in every hierarchy.
    in_cgroup = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    placed = 0
    for mount in cgroup_mounts():
        group = Path(mount) / f"berth-{name}" / "host1" / "c1"
        try:
            group.mkdir(parents=True)
            (group / "cgroup.procs").write_text(str(in_cgroup.pid))
            placed += 1
        except OSError:  # a v2 hierarchy with controllers on in v1 refuses some moves; one is enough
            continue

    assert placed, "could not put the stray into any cgroup"

    # A mount left under the state dir (an overlay rootfs would be one).
    target = cdir / "hosts" / "host1" / "rootfs"
    target.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)

    (cdir / "cluster.json").unlink()
    dev_cluster.down(name, state_dir)
    in_netns.wait(timeout=10)  # both are gone (TimeoutExpired otherwise)
    in_cgroup.wait(timeout=10)
    assert leftovers(name, state_dir) == []
