"""Lifecycle verbs end to end (issue 3a) on the session's dev cluster: create, start, pause, unpause, kill -s,
restart, the exit reason in inspect, restart policies, OOM kills, logs --since/--timestamps/--tail."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from berthctl.dev.cluster import ClusterInfo
from tests.conftest import RunBerthctl
from tests.support import wait_for

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")


def inspect(berthctl: RunBerthctl, name: str) -> dict[str, Any]:
    out = berthctl("inspect", name)
    assert out.returncode == 0, out.stderr
    state: dict[str, Any] = json.loads(out.stdout)[0]["State"]
    return state


def ok(berthctl: RunBerthctl, *args: str) -> str:
    out = berthctl(*args)
    assert out.returncode == 0, f"berthctl {' '.join(args)}: {out.stderr}"
    return out.stdout


@pytest.fixture
def names(berthctl: RunBerthctl) -> Iterator[Callable[[str], str]]:
    made: list[str] = []

    def name(n: str) -> str:
        made.append(n)
        return n

    yield name
    for n in made:
        berthctl("rm", "-f", n)


def test_create_start_pause_kill_restart(
    cluster: ClusterInfo, berthctl: RunBerthctl, names: Callable[[str], str]
) -> None:
    name = names("lc")
    script = "trap 'exit 5' TERM; echo up; while :; do sleep 0.05; done"
    cid = ok(berthctl, "create", "--name", name, "busybox", "sh", "-c", script).strip()
    assert len(cid) == 64
    assert inspect(berthctl, name)["state"] == "created"
    assert name not in ok(berthctl, "ps")  # only with -a
    ok(berthctl, "start", name)
    wait_for(lambda: inspect(berthctl, name)["state"] == "running", what="running")

    ok(berthctl, "pause", name)
    assert inspect(berthctl, name)["paused"]
    assert any(name in line and "(Paused)" in line for line in ok(berthctl, "ps").splitlines())
    ok(berthctl, "unpause", name)
    assert not inspect(berthctl, name)["paused"]

    ok(berthctl, "kill", "-s", "TERM", name)
    wait_for(lambda: inspect(berthctl, name)["state"] == "exited", what="exit on TERM")
    s = inspect(berthctl, name)
    assert (s["exit_code"], s["exit_reason"], s["signal"]) == (5, "exited", 0)

    ok(berthctl, "restart", "-t", "1", name)
    s = inspect(berthctl, name)
    assert s["state"] == "running", s
    first_pid = s["pid"]
    ok(berthctl, "restart", "-t", "1", name)  # a running one is stopped (its trap exits 5), then started
    s = inspect(berthctl, name)
    assert s["state"] == "running" and s["pid"] != first_pid, s

    ok(berthctl, "kill", name)  # KILL
    wait_for(lambda: inspect(berthctl, name)["state"] == "exited", what="exit on KILL")
    s = inspect(berthctl, name)
    assert (s["exit_code"], s["exit_reason"], s["signal"]) == (137, "killed by signal 9", 9)

    bad = berthctl("kill", "-s", "NOPE", name)
    assert bad.returncode != 0 and "invalid signal 'NOPE'" in bad.stderr
    stopped = berthctl("pause", name)
    assert stopped.returncode != 0 and "is not running" in stopped.stderr


def test_restart_policy_on_failure_and_kill_is_a_stop(
    cluster: ClusterInfo, berthctl: RunBerthctl, names: Callable[[str], str]
) -> None:
    flaky = names("flaky")
    ok(berthctl, "run", "-d", "--name", flaky, "--restart", "on-failure:2", "busybox", "sh", "-c", "exit 3")

    def given_up() -> dict[str, Any] | None:
        s = inspect(berthctl, flaky)
        return s if s["state"] == "exited" and s["restart_count"] == 2 else None

    s = wait_for(given_up, timeout=30, what="two restarts, then exited for good")
    assert (s["exit_code"], s["restart_policy"]) == (3, "on-failure:2")

    bad = berthctl("run", "-d", "--name", "badpolicy", "--restart", "sometimes", "busybox", "true")
    assert bad.returncode != 0 and "invalid restart policy 'sometimes'" in bad.stderr

    keeper = names("keeper")
    ok(berthctl, "run", "-d", "--name", keeper, "--restart", "always", "busybox", "sleep", "1000")
    ok(berthctl, "kill", keeper)
    wait_for(lambda: inspect(berthctl, keeper)["state"] == "exited", what="the kill")
    s = inspect(berthctl, keeper)
    assert s["restart_count"] == 0 and s["exit_reason"] == "killed by signal 9"


def test_memory_hog_is_oom_killed(cluster: ClusterInfo, berthctl: RunBerthctl, names: Callable[[str], str]) -> None:
    hog = names("hog")
    out = berthctl("run", "--name", hog, "-m", "16m", "busybox", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M",
                   "count=1")
    assert out.returncode == 137, out.stderr
    s = inspect(berthctl, hog)
    assert (s["exit_reason"], s["oom_killed"], s["exit_code"]) == ("OOM-killed", True, 137)


def test_logs_since_timestamps_tail_and_streams(
    cluster: ClusterInfo, berthctl: RunBerthctl, names: Callable[[str], str]
) -> None:
    name = names("lg")
    out = berthctl("run", "--name", name, "busybox", "sh", "-c",
                   "for i in 1 2 3 4 5; do echo out$i; sleep 0.1; done; echo err >&2")  # a time per line
    assert out.returncode == 0, out.stderr
    logs = berthctl("logs", "--timestamps", name)
    lines = logs.stdout.splitlines()
    assert len(lines) == 5 and all(STAMP.match(line) for line in lines), lines
    assert [line.split(" ", 1)[1] for line in lines] == [f"out{i}" for i in range(1, 6)]
    assert logs.stderr.split(" ", 1)[1] == "err\n"  # stderr kept apart
    third = lines[2].split(" ", 1)[0]
    since = berthctl("logs", "--since", third, name)
    # lines read in one chunk share a time: expect exactly those stamped at or after the third's
    expected = [line.split(" ", 1)[1] for line in lines if line.split(" ", 1)[0] >= third]
    assert since.stdout.splitlines() == expected and "out1" not in expected, since.stdout
    assert berthctl("logs", "--tail", "2", name).stdout.splitlines()[-1] == "out5"
    assert berthctl("logs", "--since", "1h", name).stdout.count("out") == 5
    assert berthctl("logs", "--since", "0.000001s", name).stdout == ""
    bad = berthctl("logs", "--since", "yesterday", name)
    assert bad.returncode != 0 and "invalid --since 'yesterday'" in bad.stderr


def test_log_rotation_through_log_opt(cluster: ClusterInfo, berthctl: RunBerthctl, names: Callable[[str], str]) -> None:
    name = names("rot")
    script = "i=0; while [ $i -lt 2000 ]; do echo line$i xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done"
    out = berthctl("run", "--name", name, "--log-opt", "max-size=8k", "--log-opt", "max-file=2", "busybox",
                   "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    cid = inspect(berthctl, name)["id"]
    host = next(h for h in cluster.hosts if h.name == inspect(berthctl, name)["node"])
    logs = sorted(p.name for p in (Path(host.state_dir) / "containers" / cid).glob("container.log*"))
    assert logs == ["container.log", "container.log.1"], logs  # max-file=2: the current file and one more
    lines = [line.split()[0] for line in ok(berthctl, "logs", name).splitlines()]
    first = int(lines[0].removeprefix("line"))
    assert first > 0 and lines == [f"line{i}" for i in range(first, 2000)], "the newest lines, across both files"
    bad = berthctl("run", "--log-opt", "max-file=0", "busybox", "true")
    assert bad.returncode != 0 and "invalid --log-opt 'max-file=0'" in bad.stderr
