"""Health checks (issue 6) on the session's cluster: the check runs inside the container (it sees the
container's own files), failures in the start period do not count, a pass makes it healthy and failures in
a row unhealthy, a check past its timeout fails; ps and inspect show it all; a service's rolling update to a
spec whose check fails is rolled back, and a task that turns unhealthy later is replaced."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from berthctl.dev.cluster import ClusterInfo
from berthctl.dev.seed import PATH_ENV, busybox_entries, push_layout, tar_layer, write_image
from tests.conftest import RunBerthctl
from tests.support import wait_for


@pytest.fixture
def names(berthctl: RunBerthctl) -> Iterator[Callable[[str], str]]:
    made: list[str] = []

    def name(base: str) -> str:
        made.append(f"hc-{base}")
        return made[-1]

    yield name
    if made:
        berthctl("rm", "-f", *made)


def inspect(berthctl: RunBerthctl, name: str) -> dict[str, Any]:
    out = berthctl("inspect", name)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)[0]
    return doc


def health(berthctl: RunBerthctl, name: str) -> dict[str, Any]:
    h: dict[str, Any] = inspect(berthctl, name)["status"].get("health", {})
    return h


def ok(berthctl: RunBerthctl, *args: str) -> str:
    out = berthctl(*args, timeout=180)
    assert out.returncode == 0, f"berthctl {' '.join(args)}: {out.stderr}"
    return out.stdout


def test_check_inside_the_container_starting_healthy_unhealthy(
        cluster: ClusterInfo, berthctl: RunBerthctl, names: Callable[[str], str]) -> None:
    c = names("file")
    ok(berthctl, "run", "-d", "--name", c, "--health-cmd", "cat /tmp/ok", "--health-interval", "500ms",
       "--health-retries", "2", "--health-start-period", "10m", "busybox", "sleep", "3600")
    # In the start period failures do not count: it stays starting, with the failures in its log.
    h = wait_for(lambda: len((h := health(berthctl, c)).get("log", [])) >= 2 and h, 60, "two checks")
    assert h["status"] == "starting" and "failing_streak" not in h
    assert h["log"][-1]["exit_code"] == 1 and "/tmp/ok" in h["log"][-1]["output"]
    assert "(health: starting)" in ok(berthctl, "ps")

    ok(berthctl, "exec", c, "sh", "-c", "echo fine > /tmp/ok")  # a file only the container has
    h = wait_for(lambda: (h := health(berthctl, c))["status"] == "healthy" and h, 60, "healthy")
    assert h["log"][-1]["output"] == "fine\n" and "exit_code" not in h["log"][-1]  # 0, left out of the JSON
    row = next(line for line in ok(berthctl, "ps").splitlines() if line.endswith(c))
    assert "(healthy)" in row
    assert any(d["name"] == c and d["health"] == "healthy" for d in json.loads(ok(berthctl, "ps", "-o", "json")))

    # Once it passed, the start period is over: two failures in a row make it unhealthy.
    ok(berthctl, "exec", c, "rm", "/tmp/ok")
    h = wait_for(lambda: (h := health(berthctl, c))["status"] == "unhealthy" and h, 60, "unhealthy")
    assert h["failing_streak"] >= 2 and "/tmp/ok" in h["log"][-1]["output"]
    assert "(unhealthy)" in next(line for line in ok(berthctl, "ps").splitlines() if line.endswith(c))


def test_a_check_past_its_timeout_fails(cluster: ClusterInfo, berthctl: RunBerthctl,
                                        names: Callable[[str], str]) -> None:
    c = names("slow")
    ok(berthctl, "run", "-d", "--name", c, "--health-cmd", "sleep 60", "--health-interval", "1s",
       "--health-timeout", "300ms", "--health-retries", "1", "busybox", "sleep", "3600")
    h = wait_for(lambda: (h := health(berthctl, c))["status"] == "unhealthy" and h, 60, "unhealthy")
    assert h["log"][-1] == {**h["log"][-1], "exit_code": -1, "output": "Health check exceeded timeout (0.3s)"}


def test_bad_health_flags_fail_in_one_line(berthctl: RunBerthctl) -> None:
    out = berthctl("run", "-d", "--health-interval", "5x", "--health-cmd", "true", "busybox", "true")
    assert out.returncode == 125
    assert out.stderr == ("berthctl: invalid --health-interval '5x': write a duration such as 30s, 1m30s or "
                          "500ms\n")
    out = berthctl("run", "-d", "--health-retries", "-2", "busybox", "true")
    assert out.returncode == 125 and "must not be negative" in out.stderr and out.stderr.count("\n") == 1


def test_rolling_update_to_a_failing_health_check_is_rolled_back(
        cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    try:
        ok(berthctl, "service", "create", "--name", "hsvc", "--replicas", "2", "--health-cmd", "test ! -e /tmp/bad",
           "--health-interval", "500ms", "--update-monitor", "1", "--update-failure-action", "rollback",
           "busybox", "sleep", "3600")
        before = json.loads(ok(berthctl, "service", "ps", "-o", "json", "hsvc"))
        out = berthctl("service", "update", "--health-cmd", "exit 3", "--health-retries", "2", "hsvc", timeout=180)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "update rolled back" in out.stderr and "unhealthy after 2 failed health checks" in out.stderr
        svc = json.loads(ok(berthctl, "service", "inspect", "hsvc"))[0]
        assert svc["update_state"] == "rolled_back"
        assert svc["spec"]["template"]["healthcheck"]["test"] == ["CMD-SHELL", "test ! -e /tmp/bad"]
        after = wait_for(lambda: (ts := json.loads(ok(berthctl, "service", "ps", "-o", "json", "hsvc")))
                         and len(ts) == 2 and all(t["health"] == "healthy" for t in ts) and ts, 60,
                         "two healthy replicas of the old spec")
        assert {t["service_version"] for t in after} == {1}
        assert len({t["id"] for t in after} & {t["id"] for t in before}) == 1  # one was replaced, and back

        # Outside an update, a task that turns unhealthy is replaced (as Swarm does).
        sick = after[0]
        ok(berthctl, "exec", sick["name"], "touch", "/tmp/bad")
        healed = wait_for(lambda: (ts := json.loads(ok(berthctl, "service", "ps", "-o", "json", "hsvc")))
                          and len(ts) == 2 and sick["id"] not in {t["id"] for t in ts}
                          and all(t["health"] == "healthy" for t in ts) and ts, 90, "the unhealthy task replaced")
        assert {t["slot"] for t in healed} == {t["slot"] for t in after}
    finally:
        berthctl("service", "rm", "hsvc")


def push_image_with_check(cluster: ClusterInfo, tmp_path: Path, tag: str, shell_check: str,
                          interval_ns: int = 500_000_000, retries: int = 2) -> str:
    """busybox with a HEALTHCHECK CMD <shell_check> every 500ms, 2 retries, pushed to the cluster's registry."""
    layout = tmp_path / f"hcimage-{tag}"
    write_image(layout, tag, [tar_layer(busybox_entries())], {
        "Cmd": ["sh"], "Env": [PATH_ENV],
        "Healthcheck": {"Test": ["CMD-SHELL", shell_check], "Interval": interval_ns, "Retries": retries}})
    push_layout(layout, tag, cluster.registry, "library/hcimage")
    return f"hcimage:{tag}"


def test_the_images_healthcheck_runs_unless_the_container_says_otherwise(
        cluster: ClusterInfo, berthctl: RunBerthctl, names: Callable[[str], str], tmp_path: Path) -> None:
    image = push_image_with_check(cluster, tmp_path, "file", "cat /tmp/ok")
    off, own, imaged = names("img-off"), names("img-own"), names("img")
    ok(berthctl, "run", "-d", "--name", off, "--no-healthcheck", image, "sleep", "3600")
    ok(berthctl, "run", "-d", "--name", own, "--health-cmd", "cat /tmp/other", "--health-interval", "500ms",
       "--health-retries", "1", image, "sh", "-c", "echo x > /tmp/ok; exec sleep 3600")
    ok(berthctl, "run", "-d", "--name", imaged, image, "sh", "-c", "echo fine > /tmp/ok; exec sleep 3600")
    # The image's check runs in the container (it reads the container's own file) and makes it healthy.
    h = wait_for(lambda: (h := health(berthctl, imaged))["status"] == "healthy" and h, 60, "healthy by the image")
    assert h["log"][-1]["output"] == "fine\n"
    assert "(healthy)" in next(line for line in ok(berthctl, "ps").splitlines() if line.endswith(imaged))
    # The container's own check replaces the image's; --no-healthcheck runs none (it started first, so it
    # would have had checks by now).
    h = wait_for(lambda: (h := health(berthctl, own))["status"] == "unhealthy" and h, 60, "unhealthy by its own")
    assert "/tmp/other" in h["log"][-1]["output"]
    assert health(berthctl, off) == {} and inspect(berthctl, off)["status"]["state"] == "STATE_RUNNING"


def test_a_rolling_update_to_an_image_whose_healthcheck_fails_is_rolled_back(
        cluster: ClusterInfo, berthctl: RunBerthctl, tmp_path: Path) -> None:
    good = push_image_with_check(cluster, tmp_path, "good", "true")
    bad = push_image_with_check(cluster, tmp_path, "bad", "exit 3")
    try:
        ok(berthctl, "service", "create", "--name", "himg", "--replicas", "1", "--update-monitor", "1",
           "--update-failure-action", "rollback", good, "sleep", "3600")
        wait_for(lambda: [t["health"] for t in json.loads(ok(berthctl, "service", "ps", "-o", "json", "himg"))]
                 == ["healthy"], 60, "the replica healthy by its image's check")
        # Running is not enough while the image's check has not passed: the update waits, the new task turns
        # unhealthy, and the update is rolled back.
        out = berthctl("service", "update", "--image", bad, "himg", timeout=180)
        assert out.returncode == 1, out.stdout + out.stderr
        # (the failures in a row seen when the controller acted: the image's retries are the agent's to know)
        assert re.search(r"update rolled back: task himg\.1\.\w+ unhealthy after \d failed health checks: exit "
                         r"code 3$", out.stderr), out.stderr
        svc = json.loads(ok(berthctl, "service", "inspect", "himg"))[0]
        assert svc["update_state"] == "rolled_back" and svc["spec"]["template"]["image"] == good
    finally:
        berthctl("service", "rm", "himg")


def test_health_timings_without_a_command_apply_to_the_images_check(
        cluster: ClusterInfo, berthctl: RunBerthctl, names: Callable[[str], str], tmp_path: Path) -> None:
    """Docker applies --health-interval/--health-retries given without --health-cmd to the image's HEALTHCHECK
    (session 6: they were refused). The image checks every hour and needs 100 failures in a row: a check within
    the test's wait is the container's interval, unhealthy before 100 failures its retries."""
    image = push_image_with_check(cluster, tmp_path, "slow", "exit 3", interval_ns=3600 * 10**9, retries=100)
    c = names("img-timed")
    ok(berthctl, "run", "-d", "--name", c, "--health-interval", "500ms", "--health-retries", "1", image, "sleep",
       "3600")
    h = wait_for(lambda: (h := health(berthctl, c))["status"] == "unhealthy" and h, 60, "unhealthy by its own timings")
    assert h["failing_streak"] < 100 and h["log"][-1]["exit_code"] == 3, h
