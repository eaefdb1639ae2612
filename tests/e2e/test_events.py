"""berthctl events (issue 6) on the session cluster (it only reads): a container's life from etcd revisions,
in order, and a stream resumed with --since from an event already seen gives exactly what followed."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from typing import Any

from berthctl.dev.cluster import ClusterInfo
from tests.conftest import RunBerthctl


def revision(cluster: ClusterInfo) -> int:
    out = subprocess.run(
        ["etcdctl", f"--endpoints={cluster.etcd}", "get", "/berth/", "--prefix", "--keys-only", "--limit=1",
         "-w", "json"], capture_output=True, text=True, check=True, env={**os.environ, "ETCDCTL_API": "3"},
    ).stdout
    return int(json.loads(out)["header"]["revision"])


def events_until(cluster: ClusterInfo, since: int, name: str, last: str) -> list[dict[str, Any]]:
    """Events of one container after a revision, up to the first with action `last` (fails after 30 s)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "berthctl", "events", "--since", str(since), "--filter", f"name={name}",
         "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "BERTH_CONTROLLER": cluster.controller},
    )
    timer = threading.Timer(30, proc.kill)
    timer.start()
    seen: list[dict[str, Any]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(json.loads(line))
            if seen[-1]["action"] == last:
                return seen
        raise AssertionError(f"events ended before {last!r}: {seen}; {proc.stderr.read() if proc.stderr else ''}")
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()


def test_a_containers_life_in_events_and_resuming_from_a_revision(cluster: ClusterInfo,
                                                                  berthctl: RunBerthctl) -> None:
    name = f"evt-{secrets.token_hex(4)}"
    start = revision(cluster)
    out = berthctl("run", "--rm", "--name", name, "busybox", "sh", "-c", "exit 3")
    assert out.returncode == 3, out.stderr
    events = events_until(cluster, start, name, "destroy")
    actions = [e["action"] for e in events]
    wanted = iter(actions)
    assert all(a in wanted for a in ("create", "assign", "start", "die", "destroy")), actions
    assert [e["revision"] for e in events] == sorted(e["revision"] for e in events)
    assert all(e["revision"] > start and e["name"] == name and e["type"] == "container" for e in events)
    die = next(e for e in events if e["action"] == "die")
    assert die["attributes"]["exit_code"] == "3"
    assert len({e["id"] for e in events}) == 1

    started = next(e for e in events if e["action"] == "start")
    resumed = events_until(cluster, started["revision"], name, "destroy")
    assert resumed == [e for e in events if e["revision"] > started["revision"]]


def test_a_bad_filter_is_refused(berthctl: RunBerthctl) -> None:
    out = berthctl("events", "--filter", "nonsense")
    assert out.returncode == 125
    assert "invalid filter 'nonsense': write KEY=VALUE" in out.stderr
