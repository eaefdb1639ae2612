"""berth end to end on a real 3-host dev cluster: berthctl -> controller -> etcd -> agents in network
namespaces -> containers on the kernel, with images pulled from a real registry."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from berthctl.dev.cluster import ClusterInfo, HostInfo
from tests import support
from tests.conftest import RunBerthctl
from tests.support import wait_for


def ps(berthctl: RunBerthctl, *flags: str) -> list[dict[str, Any]]:
    out = berthctl("ps", "-o", "json", *flags)
    assert out.returncode == 0, out.stderr
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


def by_name(berthctl: RunBerthctl, name: str) -> dict[str, Any]:
    return next(c for c in ps(berthctl, "-a") if c["name"] == name)


def host_of(cluster: ClusterInfo, node: str) -> HostInfo:
    return next(h for h in cluster.hosts if h.name == node)


def etcd_keys(cluster: ClusterInfo, prefix: str = "/berth/") -> list[str]:
    return support.etcd_keys(cluster.etcd, prefix)


def cgroup_dirs(cluster: ClusterInfo) -> set[str]:
    """Container ids that have a cgroup on any host, under any controller."""
    ids: set[str] = set()
    for controller in Path("/sys/fs/cgroup").iterdir():
        base = controller / f"berth-{cluster.name}"
        if base.is_dir():
            for host in base.iterdir():
                if host.is_dir():
                    ids.update(p.name for p in host.iterdir() if p.is_dir())
    return ids


def state_dirs(cluster: ClusterInfo) -> set[str]:
    """Container ids that have a state dir (writable layer) on any host."""
    ids: set[str] = set()
    for h in cluster.hosts:
        containers = Path(h.state_dir) / "containers"
        if containers.is_dir():
            ids.update(p.name for p in containers.iterdir())
    return ids


def known_ids(berthctl: RunBerthctl) -> set[str]:
    return {c["id"] for c in ps(berthctl, "-a")}


def assert_nothing_left(cluster: ClusterInfo, berthctl: RunBerthctl, name: str) -> None:
    """No trace of a container that failed to run: no key, cgroup, state dir, mount or process."""
    keys = etcd_keys(cluster)
    assert f"/berth/names/{name}" not in keys
    known = known_ids(berthctl)
    for key in keys:
        if key.startswith(("/berth/containers/", "/berth/status/", "/berth/assignments/")):
            assert key.rsplit("/", 1)[1] in known, f"orphan key {key}"
    wait_for(lambda: cgroup_dirs(cluster) <= known, what="cgroups of failed containers to go")
    wait_for(lambda: state_dirs(cluster) <= known, what="state dirs of failed containers to go")
    with open("/proc/self/mountinfo") as f:
        assert cluster.state_dir not in f.read()


@pytest.fixture
def cleanup(berthctl: RunBerthctl) -> Callable[[str], None]:
    names: list[str] = []
    yield names.append  # type: ignore[misc]
    for name in names:
        berthctl("rm", "-f", name)


def test_run_ps_logs_node_ls(cluster: ClusterInfo, berthctl: RunBerthctl, cleanup: Callable[[str], None]) -> None:
    nodes = berthctl("node", "ls", "-o", "json")
    assert nodes.returncode == 0, nodes.stderr
    assert sorted((n["name"], n["state"]) for n in json.loads(nodes.stdout)) == [
        ("host1", "ready"), ("host2", "ready"), ("host3", "ready"),
    ]
    table = berthctl("node", "ls")
    assert table.stdout.splitlines()[0].split()[:3] == ["NAME", "ADDRESS", "STATUS"]

    cleanup("web")
    out = berthctl("run", "-d", "--name", "web", "busybox", "sh", "-c", "echo hello; sleep 1000")
    assert out.returncode == 0, out.stderr
    cid = out.stdout.strip()
    assert len(cid) == 64
    [web] = [c for c in ps(berthctl) if c["name"] == "web"]
    assert (web["id"], web["state"]) == (cid, "running")
    assert web["node"] in {"host1", "host2", "host3"}
    wait_for(lambda: berthctl("logs", "web").stdout == "hello\n", what="hello in the logs")
    assert berthctl("logs", cid[:12]).stdout == "hello\n"


def test_namespaces_hostname_and_memory_limit(
    cluster: ClusterInfo, berthctl: RunBerthctl, cleanup: Callable[[str], None]
) -> None:
    cleanup("iso")
    # --network none (issue 5): by default a container's namespace also has eth0 (tests/e2e/test_network.py).
    out = berthctl("run", "-d", "--name", "iso", "--memory", "64m", "--network", "none", "busybox", "sh", "-c",
                   "ps -o pid,comm; hostname; cat /proc/net/dev; sleep 1000")
    assert out.returncode == 0, out.stderr
    c = by_name(berthctl, "iso")
    logs = wait_for(lambda: (r := berthctl("logs", "iso").stdout).count("\n") >= 6 and r, what="probe output")
    lines = logs.splitlines()
    # Its own pid namespace: ps sees the shell as pid 1 and nothing of the host.
    procs = [line.split() for line in lines[1 : lines.index("iso")]]
    assert procs[0] == ["1", "sh"]
    assert {p[1] for p in procs} <= {"sh", "ps"}
    # Its own uts namespace, named after the container; its own network namespace with only lo.
    assert "iso" in lines
    interfaces = [line.split(":")[0].strip() for line in lines if ":" in line and "|" not in line]
    assert interfaces == ["lo"]
    # Namespaces differ from the test process's (the host's) for pid, mnt, uts, ipc and net.
    pid = c["pid"]
    for ns in ("pid", "mnt", "uts", "ipc", "net"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    # Its memory cgroup carries the limit asked for.
    limit = Path(f"/sys/fs/cgroup/memory/berth-{cluster.name}/{c['node']}/{c['id']}/memory.limit_in_bytes")
    assert int(limit.read_text()) == 64 << 20
    with open(f"/proc/{pid}/cgroup") as f:
        assert f"berth-{cluster.name}/{c['node']}/{c['id']}" in f.read()


def test_files_survive_stop_and_start_and_rm_deletes_them(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    out = berthctl("run", "-d", "--name", "keep", "busybox", "sh", "-c",
                   "cat /data.txt 2>/dev/null; echo kept > /data.txt; sleep 1000")
    assert out.returncode == 0, out.stderr
    c = by_name(berthctl, "keep")
    upper = Path(host_of(cluster, c["node"]).state_dir) / "containers" / c["id"]
    assert berthctl("stop", "-t", "1", "keep").returncode == 0
    assert by_name(berthctl, "keep")["state"] == "exited"
    assert berthctl("start", "keep").returncode == 0
    assert by_name(berthctl, "keep")["state"] == "running"
    wait_for(lambda: "kept" in berthctl("logs", "keep").stdout, what="the file from the first run")
    refused = berthctl("rm", "keep")
    assert refused.returncode == 1
    assert "is running: stop it first" in refused.stderr
    assert upper.exists()
    assert berthctl("rm", "-f", "keep").returncode == 0
    wait_for(lambda: not upper.exists(), what="the writable layer to be deleted")
    assert "keep" not in {x["name"] for x in ps(berthctl, "-a")}


def test_image_layers_are_shared(cluster: ClusterInfo, berthctl: RunBerthctl, cleanup: Callable[[str], None]) -> None:
    names = [f"share{i}" for i in range(4)]
    for name in names:
        cleanup(name)
        assert berthctl("run", "-d", "--name", name, "busybox", "sleep", "1000").returncode == 0
    placed: dict[str, list[dict[str, Any]]] = {}
    for c in ps(berthctl):
        if c["name"] in names:
            placed.setdefault(c["node"], []).append(c)
    together = next(cs for cs in placed.values() if len(cs) >= 2)

    def lowerdir(pid: int) -> str:
        with open(f"/proc/{pid}/mountinfo") as f:
            root = next(line for line in f if line.split()[4] == "/")
        return next(o for o in root.split(" - ")[1].split()[2].split(",") if o.startswith("lowerdir="))

    assert lowerdir(together[0]["pid"]) == lowerdir(together[1]["pid"])


def test_exit_code_and_rm(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    out = berthctl("run", "--rm", "--name", "three", "busybox", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (out.returncode, out.stdout, out.stderr) == (3, "out\n", "err\n")
    wait_for(lambda: "three" not in {c["name"] for c in ps(berthctl, "-a")}, what="--rm to remove it")
    assert_nothing_left(cluster, berthctl, "three")


def test_missing_image(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    out = berthctl("run", "--name", "ghost", "nosuchimage", "true")
    assert out.returncode == 125
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith("berthctl: image not found: docker.io/library/nosuchimage:latest")
    assert_nothing_left(cluster, berthctl, "ghost")


def test_missing_command(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    out = berthctl("run", "-d", "--name", "nocmd", "busybox", "nosuchcommand")
    assert (out.returncode, out.stderr) == (127, "berthctl: executable file not found in $PATH: nosuchcommand\n")
    assert_nothing_left(cluster, berthctl, "nocmd")


def test_name_in_use(cluster: ClusterInfo, berthctl: RunBerthctl, cleanup: Callable[[str], None]) -> None:
    cleanup("twice")
    assert berthctl("run", "-d", "--name", "twice", "busybox", "sleep", "1000").returncode == 0
    out = berthctl("run", "-d", "--name", "twice", "busybox", "true")
    assert out.returncode == 125
    assert out.stderr.count("\n") == 1
    assert "name 'twice' is in use" in out.stderr and "berthctl rm twice" in out.stderr
    assert [c["name"] for c in ps(berthctl, "-a")].count("twice") == 1


def test_bad_memory_leaves_nothing(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    before = etcd_keys(cluster)
    out = berthctl("run", "--name", "lots", "--memory", "lots", "busybox", "true")
    assert out.returncode == 125
    assert out.stderr.startswith("berthctl: invalid --memory 'lots'")
    assert etcd_keys(cluster) == before


def test_metrics_parse_with_promtool(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    for address, wanted in (
        (cluster.controller_metrics, b"berth_scheduling_latency_seconds_bucket"),
        (cluster.hosts[0].metrics_address, b"berth_agent_container_start_seconds_bucket"),
    ):
        body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read()
        assert wanted in body
        check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr


def test_killed_agent_marks_host_not_ready(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    """Runs last in this module: it kills host3's agent, then starts it again the same way."""
    victim = cluster.process("agent-host3")
    assert victim is not None
    cmdline, environ = support.kill_9_keeping_command(victim.pid)

    def state_of_host3() -> str:
        nodes = json.loads(berthctl("node", "ls", "-o", "json").stdout)
        return str(next(n["state"] for n in nodes if n["name"] == "host3"))

    # The dev cluster's lease TTL is 5 s; etcd checks expiry every 500 ms, and `node ls` must see it.
    wait_for(lambda: state_of_host3() == "down", timeout=5 + 2, what="host3 to be marked down within the lease")
    # Bring it back, detached like the dev cluster starts it, so later tests and `dev down` find it.
    support.respawn(cmdline, environ, host_of(cluster, "host3").log)
    wait_for(lambda: state_of_host3() == "ready", timeout=30, what="host3 to be ready again")
