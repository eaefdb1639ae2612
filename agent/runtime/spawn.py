"""Fork a container process: join cgroups, new namespaces, rootfs, exec. Runs inside the supervisor.

    supervisor ──fork──▶ intermediate: join cgroups, unshare(NEWNS|UTS|IPC|NET|PID|CGROUP), fork, send the
                         grandchild's pid over a pipe, _exit (with a netns given: setns into it, no NEWNET)
                           └──fork──▶ PID 1 of the new pid namespace: rootfs (agent.runtime.rootfs),
                                      hostname, lo up, capabilities, chdir, PATH lookup, execve

The grandchild is re-parented to the supervisor (child subreaper) when the intermediate exits. Any failure
before exec is written to an O_CLOEXEC error pipe: the supervisor reads it until EOF; no bytes means the
exec succeeded. stdin is /dev/null; stdout and stderr are pipes whose read ends the supervisor keeps.

spawn() blocks only until the intermediate has exited (microseconds after its fork); it returns before the
grandchild has exec'd, so the caller watches `error_fd` in its event loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from dataclasses import dataclass, field

from agent.runtime import rootfs as rfs
from agent.runtime import security as sec
from agent.runtime import syscalls as sc

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default capability set: chown dac_override fowner fsetid kill setgid setuid setpcap
# net_bind_service net_raw sys_chroot mknod audit_write setfcap.
DEFAULT_CAPS = sec.DEFAULT_CAPABILITIES

NAMESPACES = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET | sc.CLONE_NEWPID | sc.CLONE_NEWCGROUP

_EXIT_SETUP_FAILED = 127


class SpawnError(Exception):
    """The container process could not be started; the message is meant for a user."""


@dataclass(frozen=True)
class SpawnSpec:
    args: tuple[str, ...]
    env: tuple[str, ...]
    workdir: str
    hostname: str
    rootfs: rfs.RootfsPlan
    # Files the (single-threaded) process writes "0" to, to join its cgroups before unsharing its cgroup
    # namespace: Cgroup.join_files().
    cgroup_procs: tuple[str, ...]
    # FIFOs for stdout and stderr (see open_output).
    stdout_fifo: str
    stderr_fifo: str
    # issue 3b: capabilities, user, ulimits, no_new_privs (agent.runtime.security).
    security: sec.Security = field(default_factory=sec.Security)
    # "" : a new network namespace; "host": stay in the supervisor's; else a namespace file to join (setns).
    netns: str = ""


@dataclass(frozen=True)
class Spawned:
    pid: int  # host pid of the container's PID 1
    error_fd: int  # EOF without data: exec'd; data: the reason it failed
    stdout_fd: int
    stderr_fd: int


def build_env(env: tuple[str, ...], hostname: str) -> dict[str, str]:
    """The exec environment: the config's, plus PATH and HOSTNAME when it does not set them (as Docker)."""
    out: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if key and sep:
            out[key] = value
    out.setdefault("PATH", DEFAULT_PATH)
    out.setdefault("HOSTNAME", hostname)
    return out


def find_executable(name: str, path: str) -> str:
    """Resolve argv[0] as execvp would, raising SpawnError with the message a user sees."""
    if "/" in name:
        try:
            st = os.stat(name)
        except FileNotFoundError:
            raise SpawnError(f"no such file or directory: {name}") from None
        except OSError as e:
            raise SpawnError(f"{name}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise SpawnError(f"is a directory: {name}")
        return name
    for d in path.split(":"):
        candidate = os.path.join(d or ".", name)
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK):
            return candidate
    raise SpawnError(f"executable file not found in $PATH: {name}")


def open_output(fifo: str) -> tuple[int, int]:
    """(read end, write end) of a container's output FIFO, created if missing.

    The container gets the FIFO opened read-write, not a pipe: it then never sees EPIPE (nor dies of
    SIGPIPE) while no supervisor reads, e.g. across a supervisor restart; at worst it blocks once the FIFO
    is full, until a new supervisor reopens the FIFO by its path and drains it. The read end is
    non-blocking and reaches EOF once every process of the container has exited."""
    with contextlib.suppress(FileExistsError):
        os.mkfifo(fifo, 0o600)
    w = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
    try:
        r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        os.close(w)
        raise
    return r, w


def spawn(spec: SpawnSpec) -> Spawned:
    """Fork the container; see the module docstring. Raises SpawnError if the intermediate process failed
    (cgroup join, unshare, fork); later failures arrive on error_fd."""
    if not spec.args:
        raise SpawnError("no command given")
    out_r, out_w = open_output(spec.stdout_fifo)
    try:
        err_r, err_w = open_output(spec.stderr_fifo)
    except OSError:
        os.close(out_r)
        os.close(out_w)
        raise
    fail_r, fail_w = os.pipe()
    pid_r, pid_w = os.pipe()
    devnull = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    ours = [out_r, err_r, fail_r, pid_r]  # read ends the parent keeps or must close on failure
    try:
        child = os.fork()
        if child == 0:
            status = _EXIT_SETUP_FAILED
            try:
                for fd in ours:
                    os.close(fd)
                _intermediate(spec, devnull, out_w, err_w, fail_w, pid_w)
                status = 0
            except BaseException as e:  # noqa: BLE001 - a forked child reports everything, then _exits
                _report(fail_w, e)
            finally:
                os._exit(status)
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w, fail_w, pid_w, devnull):
            os.close(fd)
    try:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(pid_r, 32)
            if not chunk:
                break
            data += chunk
        os.waitpid(child, 0)
        if not data.endswith(b"\n"):
            ours.remove(fail_r)
            raise SpawnError(read_all(fail_r).decode(errors="replace") or "container setup failed")
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    os.close(pid_r)
    return Spawned(pid=int(data), error_fd=fail_r, stdout_fd=out_r, stderr_fd=err_r)


def read_all(fd: int) -> bytes:
    """Read a (blocking) fd to EOF and close it."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _report(fd: int, e: BaseException) -> None:
    if isinstance(e, (SpawnError, rfs.SetupError, sec.SecurityError)):
        msg = str(e)
    elif isinstance(e, OSError):
        msg = rfs.describe(e)
    else:
        msg = f"{type(e).__name__}: {e}"
    with contextlib.suppress(OSError):
        os.write(fd, msg.encode(errors="replace")[:4000])


def _intermediate(spec: SpawnSpec, devnull: int, out_w: int, err_w: int, fail_w: int, pid_w: int) -> None:
    # Signals arriving now must not run the supervisor's Python handlers or poke its wakeup fd.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        for procs in spec.cgroup_procs:
            with open(procs, "w") as f:
                f.write("0")
    except OSError as e:
        raise SpawnError(f"join cgroup: {rfs.describe(e)}") from e
    flags = NAMESPACES
    if spec.netns:
        flags &= ~sc.CLONE_NEWNET
    if spec.netns and spec.netns != "host":
        try:
            fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                sc.setns(fd, sc.CLONE_NEWNET)
            finally:
                os.close(fd)
        except OSError as e:
            raise SpawnError(f"join network namespace {spec.netns}: {rfs.describe(e)}") from e
    try:
        sc.unshare(flags)
    except OSError as e:
        raise SpawnError(f"create namespaces: {rfs.describe(e)}") from e
    try:
        pid = os.fork()
    except OSError as e:
        raise SpawnError(f"fork the container's first process: {rfs.describe(e)}") from e
    if pid == 0:
        status = _EXIT_SETUP_FAILED
        try:
            os.close(pid_w)
            _container_init(spec, devnull, out_w, err_w)
        except BaseException as e:  # noqa: BLE001 - a forked child reports everything, then _exits
            _report(fail_w, e)
        finally:
            os._exit(status)
    os.write(pid_w, f"{pid}\n".encode())


def _container_init(spec: SpawnSpec, devnull: int, out_w: int, err_w: int) -> None:
    """PID 1 of the new namespaces: build the container's world, then exec (never returns)."""
    os.umask(0)
    rfs.setup(spec.rootfs)
    try:
        sc.sethostname(spec.hostname)
    except OSError as e:
        raise SpawnError(f"set hostname: {rfs.describe(e)}") from e
    try:
        sc.set_loopback_up()
    except OSError as e:
        raise SpawnError(f"bring up lo: {rfs.describe(e)}") from e
    env = build_env(spec.env, spec.hostname)
    ident = sec.lookup_user(spec.security.user)
    env.setdefault("HOME", ident.home)
    workdir = spec.workdir or "/"
    try:
        os.makedirs(workdir, 0o755, exist_ok=True)
        os.chdir(workdir)
    except OSError as e:
        raise SpawnError(f"chdir to working directory {workdir}: {rfs.describe(e)}") from e
    exe = find_executable(spec.args[0], env["PATH"])
    os.umask(0o022)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    try:
        sec.enter(spec.security, ident)
    except OSError as e:
        raise SpawnError(f"drop privileges: {rfs.describe(e)}") from e
    try:
        os.execve(exe, list(spec.args), env)
    except OSError as e:
        raise SpawnError(f"exec {exe}: {e.strerror}") from e
