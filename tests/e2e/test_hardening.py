"""Isolation and hardening through the whole path (berthctl -> controller -> agent -> kernel), issue 3b:
run options reach the container, and bad ones fail with one clear line and leave nothing behind."""

from __future__ import annotations

from pathlib import Path

from berthctl.dev.cluster import ClusterInfo
from berthctl.dev.seed import PATH_ENV, Entry, busybox_entries, push_layout, tar_layer, write_image
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


def test_image_user_and_a_volume_owned_by_it(cluster: ClusterInfo, berthctl: RunBerthctl, tmp_path: Path) -> None:
    """An image with USER app runs as app (from the image's /etc/passwd) unless --user says otherwise; a new
    named volume over the image's /data keeps /data's owner, so app can write there (a database's case)."""
    entries = [e for e in busybox_entries() if e.name not in ("etc/passwd", "etc/group")] + [
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"),
        Entry("etc/group", data=b"root:x:0:\napp:x:1000:\n"),
        Entry("home/", "dir", mode=0o755),
        Entry("home/app/", "dir", mode=0o700, uid=1000, gid=1000),
        Entry("data/", "dir", mode=0o700, uid=1000, gid=1000),
        Entry("data/seed", data=b"from the image\n", uid=1000, gid=1000),
    ]
    layout = tmp_path / "appuser"
    write_image(layout, "latest", [tar_layer(entries)], {"Cmd": ["sh"], "Env": [PATH_ENV], "User": "app"})
    push_layout(layout, "latest", cluster.registry, "library/appuser")
    try:
        out = berthctl("run", "--rm", "-v", "appdata:/data", "appuser", "sh", "-c",
                       "id -u; id -g; echo $HOME; cat /data/seed; echo mine > /data/own && echo wrote")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:5] == ["1000", "1000", "/home/app", "from the image", "wrote"]
        out = berthctl("run", "--rm", "--user", "root", "appuser", "id", "-u")
        assert (out.returncode, out.stdout) == (0, "0\n"), out.stderr
    finally:
        berthctl("volume", "rm", "appdata")
