"""berthctl exec through the whole path (berthctl -> controller -> agent -> helper in the container's
namespaces and cgroup), issue 3b: output and exit code, -e -u -w, stdin with -i, and an interactive -it
session driven through a pseudo-terminal: window size (stty size) and Ctrl-C."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator

import pytest

from berthctl.dev.cluster import ClusterInfo
from tests.conftest import RunBerthctl
from tests.e2e.test_spine import by_name
from tests.support import wait_for


@pytest.fixture
def sleeper(cluster: ClusterInfo, berthctl: RunBerthctl) -> Iterator[str]:
    out = berthctl("run", "-d", "--name", "execme", "--hostname", "box", "-e", "FROM_RUN=1", "busybox",
                   "sh", "-c", "echo $$ > /tmp/pid1; exec sleep 100000")
    assert out.returncode == 0, out.stderr
    try:
        yield "execme"
    finally:
        berthctl("rm", "-f", "execme")


def test_exec_output_exit_code_and_namespaces(berthctl: RunBerthctl, sleeper: str) -> None:
    out = berthctl("exec", sleeper, "sh", "-c", "hostname; cat /tmp/pid1; echo $FROM_RUN; ps -o pid | wc -l; exit 3")
    assert out.returncode == 3, out.stderr
    hostname, pid1, env, nprocs = out.stdout.split()
    assert (hostname, pid1, env) == ("box", "1", "1")  # its uts and pid namespaces, its environment
    assert int(nprocs) <= 5  # header, sleep, sh, ps, wc: none of the host's processes
    # its cgroup: the exec'd shell is in the container's cgroup (a cgroup namespace rooted there shows "/").
    out = berthctl("exec", sleeper, "cat", "/proc/self/cgroup")
    assert out.returncode == 0 and all(line.endswith(":/") for line in out.stdout.split()), out.stdout


def test_exec_env_user_workdir_and_stdin(berthctl: RunBerthctl, sleeper: str) -> None:
    out = berthctl("exec", "-e", "A=b", "-u", "nobody", "-w", "/tmp", sleeper, "sh", "-c", 'echo $A $(id -u) $PWD')
    assert (out.returncode, out.stdout) == (0, "b 65534 /tmp\n"), out.stderr
    out = berthctl("exec", "-i", sleeper, "sh", "-c", "tr a-z A-Z", input="hello\n")
    assert (out.returncode, out.stdout) == (0, "HELLO\n"), out.stderr


def test_exec_errors(berthctl: RunBerthctl, sleeper: str) -> None:
    out = berthctl("exec", sleeper, "nosuchcmd")
    assert out.returncode == 127
    assert "executable file not found in $PATH: nosuchcmd" in out.stderr
    out = berthctl("exec", "nosuchcontainer", "true")
    assert out.returncode == 125 and "no such container" in out.stderr
    berthctl("run", "--name", "exited", "busybox", "true")
    try:
        out = berthctl("exec", "exited", "true")
        assert out.returncode == 125 and "container exited is not running" in out.stderr
    finally:
        berthctl("rm", "-f", "exited")


def _spawn_in_pty(cluster: ClusterInfo, rows: int, cols: int, *args: str) -> tuple[int, int]:
    """Run berthctl ARGS with a new pseudo-terminal of the given size as its controlling terminal."""
    pid, master = pty.fork()
    if pid == 0:  # the child: its stdio is the pty's slave
        os.environ["BERTH_CONTROLLER"] = cluster.controller
        os.execv(sys.executable, [sys.executable, "-m", "berthctl", *args])
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return pid, master


def _read_until(master: int, want: Callable[[bytes], bool], timeout_s: float = 30.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout_s
    while not want(data):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {data!r}"
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: berthctl exited and closed the slave
                break
            if not chunk:
                break
            data += chunk
    return data


def _wait_exit(pid: int, master: int) -> int:
    _read_until(master, lambda _d: False)  # drain to EOF so berthctl never blocks on a full pty
    _, status = os.waitpid(pid, 0)
    os.close(master)
    return os.waitstatus_to_exitcode(status)


def test_exec_it_window_size_through_a_pty(cluster: ClusterInfo, sleeper: str) -> None:
    pid, master = _spawn_in_pty(cluster, 37, 101, "exec", "-it", sleeper, "stty", "size")
    try:
        out = _read_until(master, lambda d: b"37 101" in d)
        assert b"37 101" in out
        assert _wait_exit(pid, master) == 0
    finally:
        with_kill(pid)


def test_exec_it_ctrl_c_interrupts_the_command(cluster: ClusterInfo, berthctl: RunBerthctl, sleeper: str) -> None:
    script = "trap 'echo got-sigint; exit 42' INT; echo ready; while :; do sleep 0.05; done"
    pid, master = _spawn_in_pty(cluster, 24, 80, "exec", "-it", sleeper, "sh", "-c", script)
    try:
        _read_until(master, lambda d: b"ready" in d)
        os.write(master, b"\x03")  # Ctrl-C, sent raw through berthctl to the container's pty
        out = _read_until(master, lambda d: b"got-sigint" in d)
        assert b"got-sigint" in out
        assert _wait_exit(pid, master) == 42
    finally:
        with_kill(pid)
    assert by_name(berthctl, sleeper)["state"] == "running"  # only the exec'd command got it


def with_kill(pid: int) -> None:
    """Teardown: a berthctl left running (the test failed) is killed and reaped."""
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_a_dropped_exec_session_kills_its_command(cluster: ClusterInfo, berthctl: RunBerthctl, sleeper: str) -> None:
    """berthctl killed mid-session: the controller and agent see the stream end; the command goes too, also
    without a tty (no hangup to kill it) and as another user (a change of uid clears the parent-death
    signal, so the helper sets it after)."""
    env = {**os.environ, "BERTH_CONTROLLER": cluster.controller}
    proc = subprocess.Popen(
        [sys.executable, "-m", "berthctl", "exec", "-u", "nobody", sleeper, "sh", "-c", "echo ready; exec sleep 4242"],
        env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        assert "sleep 4242" in berthctl("exec", sleeper, "ps", "-o", "args").stdout
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def gone() -> bool:
        return "sleep 4242" not in berthctl("exec", sleeper, "ps", "-o", "args").stdout

    wait_for(gone, timeout=20, what="the exec'd command to be killed")
