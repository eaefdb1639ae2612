"""exec: run one more process in a running container, in all of its namespaces and its cgroup.

The agent is multi-threaded, and setns(CLONE_NEWNS) refuses a multi-threaded caller, so the work is done
by a short-lived helper process, `python -m agent.runtime.exec SPEC_JSON`, started by `launch` with the
session's stdio (a pseudo-terminal's slave for -t, else pipes):

    helper: open /proc/<pid 1>/ns/{ipc,uts,net,pid,cgroup,mnt} -> join the container's cgroups -> setns
            each (mnt last: it moves the helper's root into the container's rootfs) -> fork
      └── child (a process of the container's pid namespace): with -t a new session whose controlling
          terminal is stdin; the user (-u, else the container's) looked up in the container's /etc/passwd;
          chdir; PATH lookup; the container's capabilities, ulimits and no_new_privs
          (agent.runtime.security); die with the helper (PDEATHSIG, set after setuid, which clears it);
          execve
    helper: forwards SIGTERM/SIGINT/SIGHUP to the child, exits with its exit code (128+N for signal N)

A failure before exec is one line on stderr, `berth exec: <reason>`, and exit code 127 when the executable
is missing, 126 otherwise (as `docker exec`).

Exceptions (agent side): ExecError, with a message meant for the user.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import struct
import sys
import termios
from dataclasses import asdict, dataclass
from typing import Any

from agent.runtime import security as sec
from agent.runtime import spawn as sp
from agent.runtime import syscalls as sc

NAMESPACES = ("ipc", "uts", "net", "pid", "cgroup", "mnt")


class ExecError(Exception):
    """exec cannot start; the message says why (no such container, not running, ...)."""


@dataclass(frozen=True)
class ExecSpec:
    pid: int  # host pid of the container's PID 1
    cgroup_procs: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[str, ...]  # the container's, then the exec's -e (later wins)
    workdir: str
    hostname: str
    user: str
    tty: bool
    security: sec.Security

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> ExecSpec:
        d: dict[str, Any] = json.loads(text)
        s = d["security"]
        return ExecSpec(
            pid=d["pid"], cgroup_procs=tuple(d["cgroup_procs"]), args=tuple(d["args"]), env=tuple(d["env"]),
            workdir=d["workdir"], hostname=d["hostname"], user=d["user"], tty=d["tty"],
            security=sec.Security(
                cap_add=tuple(s["cap_add"]), cap_drop=tuple(s["cap_drop"]), privileged=s["privileged"],
                read_only=s["read_only"], no_new_privs=s["no_new_privs"], user=s["user"],
                ulimits=tuple(sec.Ulimit(**u) for u in s["ulimits"]),
            ),
        )


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on a terminal (the pty master): the process on the slave gets SIGWINCH."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


# ----- the helper process -----


def _enter(spec: ExecSpec) -> None:
    fds = {}
    try:
        for kind in NAMESPACES:
            fds[kind] = os.open(f"/proc/{spec.pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise sp.SpawnError("the container is not running") from None
    try:
        for procs in spec.cgroup_procs:
            with open(procs, "w") as f:
                f.write("0")
        for kind in NAMESPACES:
            sc.setns(fds[kind])
    finally:
        for fd in fds.values():
            os.close(fd)


def _child(spec: ExecSpec) -> None:
    """In the container's namespaces: become the exec'd program (never returns)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    if spec.tty:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    env = sp.build_env(spec.env, spec.hostname)
    ident = sec.lookup_user(spec.user)
    env.setdefault("HOME", ident.home)
    if spec.tty:
        env.setdefault("TERM", "xterm")
    try:
        os.chdir(spec.workdir or "/")
    except OSError as e:
        raise sp.SpawnError(f"chdir to {spec.workdir}: {e.strerror}") from e
    exe = sp.find_executable(spec.args[0], env["PATH"])
    sec.enter(spec.security, ident)
    # After setuid: a change of credentials clears the parent-death signal. The helper lives outside the
    # container's pid namespace, so while it lives the parent pid reads 0; once it is gone, the
    # namespace's PID 1 (1) has adopted this process.
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != 0:
        raise sp.SpawnError("the exec session ended before its command started")
    try:
        os.execve(exe, list(spec.args), env)
    except OSError as e:
        raise sp.SpawnError(f"exec {exe}: {e.strerror}") from e


def _fail(message: str, code: int) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"berth exec: {message}\n".encode(errors="replace"))
    os._exit(code)


def helper_main(argv: list[str]) -> int:
    spec = ExecSpec.from_json(argv[0])
    if not spec.args:
        _fail("no command given", 126)
    try:
        _enter(spec)
    except (OSError, sp.SpawnError) as e:
        _fail(f"enter the container: {e}", 126)
    child = os.fork()
    if child == 0:
        try:
            _child(spec)
        except sp.SpawnError as e:
            _fail(str(e), 127 if "not found" in str(e) or "no such file" in str(e) else 126)
        except (OSError, sec.SecurityError) as e:
            _fail(str(e), 126)
        except BaseException as e:  # noqa: BLE001 - a forked child reports everything, then _exits
            _fail(f"{type(e).__name__}: {e}", 126)
        os._exit(126)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            return exit_status(status)
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1:]))
