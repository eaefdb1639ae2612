"""Isolation and hardening through the whole path (berthctl -> controller -> agent -> kernel), issue 3b:
run options reach the container, and bad ones fail with one clear line and leave nothing behind."""

from __future__ import annotations

from berthctl.dev.cluster import ClusterInfo
from tests.conftest import RunBerthctl
from tests.e2e.test_spine import assert_nothing_left


def test_run_options_reach_the_container(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    script = (
        "id -u; id -g; grep CapBnd /proc/self/status | cut -f2; ulimit -n;"
        " touch /x 2>/dev/null && echo root-rw || echo root-ro; touch /run/ok && echo run-rw;"
        " mount -t tmpfs none /run 2>/dev/null && echo mounted || echo mount-denied;"
        " grep Cpus_allowed_list /proc/self/status | cut -f2"
    )
    out = berthctl(
        "run", "--rm", "--name", "hard", "--user", "nobody", "--cap-drop", "ALL", "--cap-add", "KILL",
        "--ulimit", "nofile=64:128", "--read-only", "--tmpfs", "/run:mode=1777", "--cpuset-cpus", "0",
        "--cpu-shares", "512", "--memory", "32m", "--memory-swap", "64m", "busybox", "sh", "-c", script,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["65534", "65534", "0000000000000020", "64", "root-ro", "run-rw",
                                  "mount-denied", "0"]


def test_privileged_is_refused_by_a_host_that_does_not_allow_it(
    cluster: ClusterInfo, berthctl: RunBerthctl
) -> None:
    out = berthctl("run", "--rm", "--name", "priv", "--privileged", "busybox", "true")
    assert out.returncode == 125
    assert "privileged containers are not allowed on this host" in out.stderr
    assert "--allow-privileged" in out.stderr
    assert_nothing_left(cluster, berthctl, "priv")


def test_bad_options_fail_with_one_line(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    for args, message in (
        (("--cap-add", "NET_FOO"), "unknown capability 'NET_FOO' in --cap-add"),
        (("--ulimit", "nofile=10:1"), "the soft limit must not exceed the hard limit"),
        (("-v", "data"), "invalid -v 'data'"),
        (("--tmpfs", "/run:bogus"), "unknown option 'bogus'"),
        (("--memory-swap", "10m"), "--memory-swap needs --memory too"),
        (("--cpuset-cpus", "a-b"), "invalid --cpuset-cpus"),
    ):
        out = berthctl("run", "--rm", "--name", "bad", *args, "busybox", "true")
        assert out.returncode == 125, (args, out.stderr)
        assert message in out.stderr and out.stderr.count("\n") == 1, (args, out.stderr)
    assert_nothing_left(cluster, berthctl, "bad")


def test_user_unknown_to_the_image(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    out = berthctl("run", "--rm", "--name", "ghost", "--user", "ghost", "busybox", "true")
    assert out.returncode == 125
    assert "unable to find user ghost: no matching entries in the image's /etc/passwd" in out.stderr
    assert_nothing_left(cluster, berthctl, "ghost")
