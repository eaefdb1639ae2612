"""Services with published ports (issue 6) on the session's 3-host cluster: each replica publishes on its own
host (host mode), so the scheduler keeps two off one host and a fourth waits with the reason; a stop-first
rolling update hands each host's port from the old container to its successor; a start-first update, whose
successor would need the port its predecessor holds, fails with a clear reason and is rolled back; with a
host to spare, a start-first update places each successor there."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from berthctl.dev.cluster import ClusterInfo
from tests.conftest import RunBerthctl
from tests.support import wait_for

PORT = "18080"
# Serves its own host name (the container's name) on port 80; stops at once on SIGTERM.
WEB = ("mkdir -p /www; hostname > /www/index.html; trap 'kill $!; exit 0' TERM; "
       "httpd -f -p 80 -h /www & wait")


def http_get(netns: str, url: str) -> str:
    """GET url from inside test host `netns` (a child process: setns moves the whole single-threaded child)."""
    code = ("import sys, urllib.request\nfrom pyroute2 import netns\nnetns.setns(sys.argv[1], flags=0)\n"
            "print(urllib.request.urlopen(sys.argv[2], timeout=5).read().decode().strip())\n")
    out = subprocess.run([sys.executable, "-c", code, netns, url], capture_output=True, text=True, timeout=30,
                         check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def pub(berthctl: RunBerthctl) -> Iterator[str]:
    yield "pub"
    berthctl("service", "rm", "pub")
    wait_for(lambda: not [c for c in json.loads(berthctl("ps", "-a", "-o", "json").stdout)
                          if c["name"].startswith("pub.")], 60, "the service's containers to go")


def tasks(berthctl: RunBerthctl) -> list[dict[str, Any]]:
    out = berthctl("service", "ps", "-o", "json", "pub")
    assert out.returncode == 0, out.stderr
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


def test_replicas_publish_on_their_own_hosts_and_updates_hand_the_port_over(
        cluster: ClusterInfo, berthctl: RunBerthctl, pub: str) -> None:
    out = berthctl("service", "create", "--name", pub, "--replicas", "4", "-p", f"{PORT}:80", "--update-monitor", "1",
                   "busybox", "sh", "-c", WEB, timeout=180)
    assert out.returncode == 0, out.stderr
    reason = f"0/3 hosts: 3 port {PORT} in use"
    assert f"1 of 4 containers of service pub are pending: {reason}" in out.stderr

    before = tasks(berthctl)
    running = [t for t in before if t["state"] == "running"]
    pending = [t for t in before if t["state"] == "pending"]
    assert sorted(t["node"] for t in running) == ["host1", "host2", "host3"]
    assert all(t["ports"] == [f"0.0.0.0:{PORT}->80/tcp"] for t in running)
    assert [t["pending_reason"] for t in pending] == [reason]
    table = berthctl("service", "ps", "pub").stdout
    assert reason in table and f"0.0.0.0:{PORT}->80/tcp" in table

    def served(ts: list[dict[str, Any]]) -> dict[str, str]:
        """What the hosts of these tasks answer on the published port, asked from another host."""
        hosts = {h.name: h for h in cluster.hosts}
        return {t["node"]: http_get(hosts["host1" if t["node"] != "host1" else "host2"].netns,
                                    f"http://{hosts[t['node']].address}:{PORT}/") for t in ts}

    assert served(running) == {t["node"]: t["name"] for t in running}
    doc = json.loads(berthctl("service", "inspect", "pub").stdout)[0]
    assert doc["endpoint"]["mode"] == "host"
    assert doc["endpoint"]["ports"] == [{"published_port": int(PORT), "target_port": 80, "protocol": "tcp",
                                         "host_ip": ""}]
    assert sorted(doc["endpoint"]["published"]) == sorted(t["name"] for t in running)

    # stop-first (the default): each old container goes, and its successor takes the port on the same host.
    out = berthctl("service", "update", "--env-add", "V=2", "pub", timeout=180)
    assert out.returncode == 0, out.stderr
    updated = tasks(berthctl)
    running = [t for t in updated if t["state"] == "running"]
    assert {t["service_version"] for t in updated} == {2}
    assert sorted(t["node"] for t in running) == ["host1", "host2", "host3"]
    assert not {t["id"] for t in running} & {t["id"] for t in before}
    assert [t["pending_reason"] for t in updated if t["state"] == "pending"] == [reason]
    assert served(running) == {t["node"]: t["name"] for t in running}

    # start-first: a successor would need a port its predecessor still holds on every host.
    out = berthctl("service", "update", "--env-add", "V=3", "--update-order", "start-first",
                   "--update-failure-action", "rollback", "pub", timeout=180)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "update rolled back" in out.stderr and f"cannot be placed: {reason}" in out.stderr, out.stderr
    assert "use --update-order stop-first" in out.stderr
    after = wait_for(lambda: (ts := tasks(berthctl)) and len(ts) == 4
                     and sum(t["state"] == "running" for t in ts) == 3 and ts, 60, "the rollback to settle")
    assert {t["service_version"] for t in after} == {2}
    assert {t["id"] for t in after if t["state"] == "running"} == {t["id"] for t in running}

    # start-first with a host to spare: each successor goes where the port is free, then its predecessor goes.
    out = berthctl("service", "scale", "pub=2", timeout=120)
    assert out.returncode == 0, out.stderr
    two = tasks(berthctl)
    assert len(two) == 2 and all(t["state"] == "running" for t in two)
    out = berthctl("service", "update", "--env-add", "V=4", "--update-order", "start-first", "pub", timeout=180)
    assert out.returncode == 0, out.stderr
    final = tasks(berthctl)
    assert len(final) == 2 and all(t["state"] == "running" and t["service_version"] == 4 for t in final)
    assert len({t["node"] for t in final}) == 2 and not {t["id"] for t in final} & {t["id"] for t in two}
    assert served(final) == {t["node"]: t["name"] for t in final}
