"""Services (issue 6) on a 3-host dev cluster of their own: replicas spread over hosts, a rolling update of a
6-replica service rolled back when the new image fails to start, scale, a start-first update that completes,
a global service, and removal leaving no container behind."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berthctl.dev import cluster as dev_cluster
from berthctl.dev.cluster import ClusterInfo
from tests.conftest import exclusive, run_berthctl, slot_name, slot_subnet
from tests.support import wait_for

NAME = slot_name("bsv")
SUBNET = slot_subnet("10.77.71.0/24")


@pytest.fixture(scope="module")
def sv(cluster_state_dir: Path) -> Iterator[ClusterInfo]:
    with exclusive(NAME):
        dev_cluster.down(NAME, cluster_state_dir)
        info = dev_cluster.up(NAME, 3, SUBNET, cluster_state_dir, write_config=False)
        try:
            yield info
        finally:
            dev_cluster.down(NAME, cluster_state_dir)


def ctl(info: ClusterInfo, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    return run_berthctl(info.controller_list, *args, timeout=timeout)


def ok(info: ClusterInfo, *args: str) -> str:
    out = ctl(info, *args)
    assert out.returncode == 0, f"berthctl {' '.join(args)}: {out.stderr}"
    return out.stdout


def tasks(info: ClusterInfo, service: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(ok(info, "service", "ps", "-o", "json", service))
    return result


def inspect(info: ClusterInfo, service: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(ok(info, "service", "inspect", service))[0]
    return result


def test_rolling_update_of_six_replicas_is_rolled_back_when_the_new_image_fails(sv: ClusterInfo) -> None:
    ok(sv, "service", "create", "--name", "web", "--replicas", "6", "--update-parallelism", "2",
       "--update-monitor", "1", "--update-failure-action", "rollback", "busybox", "sleep", "3600")
    before = tasks(sv, "web")
    assert len(before) == 6 and all(t["state"] == "running" for t in before)
    assert sorted(Counter(t["node"] for t in before).values()) == [2, 2, 2], "spread over the hosts"

    out = ctl(sv, "service", "update", "--image", "busybox:no-such-tag", "web")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "update rolled back" in out.stderr and "no-such-tag" in out.stderr, out.stderr
    svc = inspect(sv, "web")
    assert svc["update_state"] == "rolled_back"
    assert svc["spec"]["template"]["image"] == "busybox"
    after = wait_for(lambda: (ts := tasks(sv, "web")) and len(ts) == 6
                     and all(t["state"] == "running" and t["image"] == "busybox" for t in ts) and ts,
                     60, "6 replicas of the old image")
    # The rollback returns to the old version: the replicas never replaced are kept; only the first batch
    # (update parallelism 2) was replaced, and replaced back.
    assert {t["service_version"] for t in after} == {1}
    assert sum(1 for t in after if t["id"] in {b["id"] for b in before}) == 4

    # Scale down, then a start-first update that works.
    ok(sv, "service", "scale", "web=2")
    assert len(tasks(sv, "web")) == 2
    ok(sv, "service", "update", "--args", "sleep 3601", "--update-order", "start-first", "web")
    final = tasks(sv, "web")
    assert len(final) == 2 and all(t["command"] == ["sleep", "3601"] and t["state"] == "running" for t in final)
    assert inspect(sv, "web")["update_state"] == "completed"
    listed = json.loads(ok(sv, "service", "ls", "-o", "json"))
    assert [(s["spec"]["name"], s["running"], s["desired"]) for s in listed] == [("web", 2, 2)]


def test_global_service_runs_one_per_host_and_rm_leaves_nothing(sv: ClusterInfo) -> None:
    ok(sv, "service", "create", "--name", "agentd", "--mode", "global", "busybox", "sleep", "3600")
    running = tasks(sv, "agentd")
    assert sorted(t["node"] for t in running) == ["host1", "host2", "host3"]
    ok(sv, "service", "rm", "agentd", "web")
    wait_for(lambda: not json.loads(ok(sv, "ps", "-a", "-o", "json")), 30, "every service container to go")
    assert json.loads(ok(sv, "service", "ls", "-o", "json")) == []
    out = ctl(sv, "service", "inspect", "web")
    assert out.returncode != 0 and "no such service: web" in out.stderr
