"""berth-supervisor: the one long-lived process per host that starts containers, is their child subreaper,
writes their logs and records their exits. It is separate from the agent so containers outlive the agent
(kill -9 of the agent leaves them running), and it is one process for all containers, not one per container.

Single-threaded selectors loop over: the unix socket `<state-dir>/supervisor.sock`, every container's stdout
and stderr FIFO (a restarted supervisor reopens them by path), each starting container's error pipe, pidfds
of containers adopted after a restart, and a signal wakeup fd (SIGCHLD -> waitpid(-1, WNOHANG)).

Protocol: newline-delimited JSON on the unix socket. A request is `{"id": <int>, "op": <str>, ...}`; its reply
is `{"id": <same>, "ok": true, ...}` or `{"id": <same>, "ok": false, "error": {"kind": K, "message": M}}` with K
one of not_found, start, bad_request, internal. Replies may come out of order (start and wait are answered
when the event happens).

    ping                                   -> {"pid": supervisor pid, "subscribers": n}
    start     {"container"}                -> {"info"}    after exec; kind "start" with the reason if it failed
    signal    {"container", "signal", "all"} -> {"info", "sent": bool}; all: every process of its cgroup
    wait      {"container", "timeout_s"}   -> {"info", "exited": bool}  when not running, or at the timeout
                                              (timeout_s null: no timeout)
    info      {"container"}                -> {"info"}
    list                                   -> {"containers": [info, ...]}  every dir with a config.json
    remove    {"container"}                -> {}  after killing it (if running) and removing its cgroup;
                                              the caller deletes the state dir
    freeze    {"container", "frozen"}      -> {"info"}  pause (frozen true) or unpause its cgroup (issue 3a)
    subscribe                              -> {} then, on that connection, `{"event": "exit", "info": info}`
                                              for every exit from then on

info is agent.runtime.state.info_to_json(ContainerInfo). Logs go to `<state-dir>/containers/<id>/container.log`
in CRI format, rotated when the config caps its size (container.log -> container.log.1 -> ... up to
log_max_files files in all, the oldest dropped); exits to exit.json, the running pid to state.json (see
agent.runtime.state). On start the supervisor reloads state.json files: a container whose process still runs
is adopted (watched through a pidfd; its exit code is then unknown and recorded as 255; its output FIFOs are
reopened, so its log goes on), one whose process is gone gets an exit recorded.

Run: `python -m agent.supervisor --state-dir DIR --cgroup-parent PATH [--detach]`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import resource
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.executor import ContainerInfo, ProcessState
from agent.runtime import freezer, volumes
from agent.runtime import rootfs as rfs
from agent.runtime import spawn as sp
from agent.runtime import syscalls as sc
from agent.runtime.cgroups import Cgroup, Hierarchy, Limits
from agent.runtime.state import StateDir, config_from_json, info_to_json, read_json, write_json

log = logging.getLogger("berth.supervisor")

UNKNOWN_EXIT_CODE = 255
_MAX_WBUF = 16 << 20
_READ_CHUNK = 65536

Handler = Callable[[int], None]


def rfc3339nano(ns: int) -> str:
    """UTC timestamp with nine fractional digits, as the CRI log format and containerd write it."""
    sec, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:09d}Z"


def cri_lines(ns: int, stream: str, data: bytes) -> bytes:
    """One chunk read from a pipe as CRI log lines: F for each newline-terminated line, P for a trailing
    piece without newline."""
    prefix = f"{rfc3339nano(ns)} {stream} ".encode()
    parts = data.split(b"\n")
    out = [prefix + b"F " + line + b"\n" for line in parts[:-1]]
    if parts[-1]:
        out.append(prefix + b"P " + parts[-1] + b"\n")
    return b"".join(out)


def exit_code_of(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def signal_of(status: int) -> int:
    """The signal that killed the process, 0 if it exited by itself."""
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


class RequestError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    rbuf: bytes = b""
    wbuf: bytes = b""
    subscribed: bool = False
    closed: bool = False


@dataclass(eq=False)
class Waiter:
    conn: Conn
    req_id: Any
    deadline: float | None = None  # monotonic; None: none


@dataclass(eq=False)
class Container:
    id: str
    cgroup: Cgroup | None
    phase: str = "starting"  # starting | running | exited
    pid: int = 0
    started_at_ns: int = 0
    error_fd: int = -1
    error_buf: bytes = b""
    reaped_status: int | None = None
    pipes: dict[int, str] = field(default_factory=dict)  # fd -> "stdout" | "stderr"
    log_fd: int = -1
    log_size: int = 0
    log_max_size: int = 0  # 0: no rotation
    log_max_files: int = 1
    paused: bool = False
    pidfd: int = -1  # adopted after a supervisor restart
    start_waiters: list[Waiter] = field(default_factory=list)
    exit_waiters: list[Waiter] = field(default_factory=list)
    remove_waiters: list[Waiter] = field(default_factory=list)


class Supervisor:
    def __init__(self, state_dir: Path, cgroup_parent: str, hierarchy: Hierarchy | None = None) -> None:
        self.sd = StateDir(state_dir)
        self.cgroup_parent = cgroup_parent
        self.hier = hierarchy or Hierarchy()
        self.sel = selectors.DefaultSelector()
        self.containers: dict[str, Container] = {}
        self.by_pid: dict[int, Container] = {}
        self.conns: set[Conn] = set()
        self.stopping = False
        self._listener: socket.socket | None = None
        self._wake_r = -1

    # ----- setup -----

    def open(self) -> None:
        self.sd.containers.mkdir(parents=True, exist_ok=True)
        sc.set_child_subreaper()
        # Three fds per running container (two FIFOs, the log): lift the soft limit to the hard one.
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
        self._reload()
        with contextlib.suppress(FileNotFoundError):
            self.sd.socket.unlink()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(self.sd.socket))
        os.chmod(self.sd.socket, 0o600)
        lsock.listen(128)
        lsock.setblocking(False)
        self._listener = lsock
        self.sel.register(lsock, selectors.EVENT_READ, self._on_accept)
        self._reap()

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _reload(self) -> None:
        """Pick up containers a previous supervisor left running."""
        for cid in self.sd.container_ids():
            paths = self.sd.container(cid)
            st = read_json(paths.state)
            if st is None:
                continue
            ex = read_json(paths.exit)
            if ex is not None and ex.get("started_at_ns") == st["started_at_ns"]:
                paths.state.unlink(missing_ok=True)
                continue
            c = Container(id=cid, cgroup=self.hier.cgroup(self.cgroup_parent, cid), phase="running")
            c.pid = st["pid"]
            c.started_at_ns = st["started_at_ns"]
            raw = read_json(paths.config)
            if raw is not None:
                c.log_max_size = int(raw.get("log_max_size_bytes", 0))
                c.log_max_files = max(1, int(raw.get("log_max_files", 1)))
            self.containers[cid] = c
            if sc.proc_start_time(c.pid) == st.get("pid_start_time"):
                try:
                    c.pidfd = os.pidfd_open(c.pid)
                except ProcessLookupError:
                    c.pidfd = -1
            if c.pidfd < 0:
                log.info("container %s: process %d gone while no supervisor ran", cid, c.pid)
                self._on_exit(c, UNKNOWN_EXIT_CODE)
                continue
            log.info("container %s: adopted running pid %d", cid, c.pid)
            if c.cgroup is not None and freezer.is_frozen(c.cgroup):
                c.paused = True  # paused before this supervisor started
            self.sel.register(c.pidfd, selectors.EVENT_READ, lambda _ev, c=c: self._on_pidfd(c))
            for fifo, stream in ((paths.stdout_fifo, "stdout"), (paths.stderr_fifo, "stderr")):
                try:
                    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError as e:
                    log.warning("container %s: reopen %s: %s; its %s is lost", cid, fifo, e, stream)
                    continue
                self._watch_output(c, fd, stream)

    # ----- loop -----

    def run(self) -> None:
        while not self.stopping:
            timeout = self._next_timeout()
            for key, events in self.sel.select(timeout):
                handler: Handler = key.data
                try:
                    handler(events)
                except Exception:
                    log.exception("handler failed")
            self._expire_waiters()
        self.close()

    def close(self) -> None:
        """Stop serving; containers keep running (a later supervisor adopts them)."""
        if self._listener is not None:
            self.sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.sd.socket.unlink()
        for conn in list(self.conns):
            self._close_conn(conn)

    def _next_timeout(self) -> float | None:
        deadlines = [w.deadline for c in self.containers.values() for w in c.exit_waiters if w.deadline is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire_waiters(self) -> None:
        now = time.monotonic()
        for c in self.containers.values():
            expired = [w for w in c.exit_waiters if w.deadline is not None and w.deadline <= now]
            for w in expired:
                c.exit_waiters.remove(w)
                self._reply(w, {"info": info_to_json(self._info(c.id)), "exited": False})

    def _on_wakeup(self, _events: int) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            c = self.by_pid.get(pid)
            if c is None:
                continue
            if c.phase == "starting":
                c.reaped_status = status
            else:
                self._on_exit(c, exit_code_of(status), signal_of(status))

    # ----- connections -----

    def _on_accept(self, _events: int) -> None:
        assert self._listener is not None
        while True:
            try:
                s, _ = self._listener.accept()
            except BlockingIOError:
                return
            s.setblocking(False)
            conn = Conn(s)
            self.conns.add(conn)
            self.sel.register(s, selectors.EVENT_READ, lambda ev, conn=conn: self._on_conn(conn, ev))

    def _on_conn(self, conn: Conn, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
        if not events & selectors.EVENT_READ or conn.closed:
            return
        try:
            data = conn.sock.recv(_READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_conn(conn)
            return
        conn.rbuf += data
        if len(conn.rbuf) > _MAX_WBUF:
            log.warning("dropping a client sending an over-long request")
            self._close_conn(conn)
            return
        while b"\n" in conn.rbuf and not conn.closed:
            line, conn.rbuf = conn.rbuf.split(b"\n", 1)
            if line.strip():
                self._handle_line(conn, line)

    def _close_conn(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()
        for c in self.containers.values():
            c.exit_waiters = [w for w in c.exit_waiters if w.conn is not conn]

    def _send(self, conn: Conn, msg: dict[str, Any]) -> None:
        if conn.closed:
            return
        conn.wbuf += json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        if len(conn.wbuf) > _MAX_WBUF:
            log.warning("dropping a client that does not read")
            self._close_conn(conn)
            return
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        try:
            while conn.wbuf:
                n = conn.sock.send(conn.wbuf)
                conn.wbuf = conn.wbuf[n:]
        except BlockingIOError:
            pass
        except OSError:
            self._close_conn(conn)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wbuf else 0)
        self.sel.modify(conn.sock, want, lambda ev, conn=conn: self._on_conn(conn, ev))

    def _reply(self, w: Waiter, result: dict[str, Any]) -> None:
        self._send(w.conn, {"id": w.req_id, "ok": True, **result})

    def _reply_error(self, w: Waiter, kind: str, message: str) -> None:
        self._send(w.conn, {"id": w.req_id, "ok": False, "error": {"kind": kind, "message": message}})

    def _handle_line(self, conn: Conn, line: bytes) -> None:
        req_id: Any = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise RequestError("bad_request", "request must be a JSON object")
            req_id = req.get("id")
            op = req.get("op")
            handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                raise RequestError("bad_request", f"unknown op: {op!r}")
            w = Waiter(conn, req_id)
            result = handler(w, req)
            if result is not None:
                self._reply(w, result)
        except RequestError as e:
            self._reply_error(Waiter(conn, req_id), e.kind, str(e))
        except (ValueError, KeyError, TypeError) as e:
            self._reply_error(Waiter(conn, req_id), "bad_request", f"{type(e).__name__}: {e}")
        except Exception as e:
            log.exception("request failed: %r", line[:200])
            self._reply_error(Waiter(conn, req_id), "internal", f"{type(e).__name__}: {e}")

    def _container_id(self, req: dict[str, Any]) -> str:
        cid = req.get("container")
        if not isinstance(cid, str):
            raise RequestError("bad_request", "missing container")
        try:
            paths = self.sd.container(cid)
        except ValueError as e:
            raise RequestError("bad_request", str(e)) from None
        if cid not in self.containers and not paths.config.exists():
            raise RequestError("not_found", f"no such container: {cid}")
        return cid

    # ----- operations -----

    def _op_ping(self, w: Waiter, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "subscribers": sum(1 for c in self.conns if c.subscribed)}

    def _op_info(self, w: Waiter, req: dict[str, Any]) -> dict[str, Any]:
        return {"info": info_to_json(self._info(self._container_id(req)))}

    def _op_list(self, w: Waiter, req: dict[str, Any]) -> dict[str, Any]:
        ids = set(self.sd.container_ids()) | set(self.containers)
        return {"containers": [info_to_json(self._info(cid)) for cid in sorted(ids)]}

    def _op_subscribe(self, w: Waiter, req: dict[str, Any]) -> dict[str, Any]:
        w.conn.subscribed = True
        return {}

    def _op_signal(self, w: Waiter, req: dict[str, Any]) -> dict[str, Any]:
        cid = self._container_id(req)
        sig = int(req["signal"])
        c = self.containers.get(cid)
        sent = False
        if c is not None and c.phase in ("running", "starting") and c.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, sig)
                sent = True
            if req.get("all") and c.cgroup is not None:
                sent = c.cgroup.signal_all(sig) > 0 or sent
            if sig == signal.SIGKILL:
                self._thaw(c)
        return {"info": info_to_json(self._info(cid)), "sent": sent}

    def _op_wait(self, w: Waiter, req: dict[str, Any]) -> dict[str, Any] | None:
        cid = self._container_id(req)
        c = self.containers.get(cid)
        if c is None or c.phase == "exited":
            return {"info": info_to_json(self._info(cid)), "exited": True}
        timeout = req.get("timeout_s")
        w.deadline = None if timeout is None else time.monotonic() + float(timeout)
        c.exit_waiters.append(w)
        return None

    def _op_remove(self, w: Waiter, req: dict[str, Any]) -> dict[str, Any] | None:
        cid = req.get("container")
        if not isinstance(cid, str):
            raise RequestError("bad_request", "missing container")
        self.sd.container(cid)
        c = self.containers.get(cid)
        if c is not None and c.phase != "exited":
            c.remove_waiters.append(w)
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)
            if c.cgroup is not None:
                c.cgroup.signal_all(signal.SIGKILL)
            self._thaw(c)
            return None
        self._forget(cid)
        return {}

    def _op_freeze(self, w: Waiter, req: dict[str, Any]) -> dict[str, Any]:
        cid = self._container_id(req)
        frozen = bool(req["frozen"])
        c = self.containers.get(cid)
        if c is None or c.phase != "running" or c.cgroup is None:
            raise RequestError("bad_request", f"container {cid} is not running")
        try:
            freezer.set_frozen(c.cgroup, frozen)
        except OSError as e:
            raise RequestError("internal", f"{'pause' if frozen else 'unpause'}: {rfs.describe(e)}") from e
        c.paused = frozen
        return {"info": info_to_json(self._info(cid))}

    def _thaw(self, c: Container) -> None:
        """Unfreeze a paused container (a frozen task does not act on SIGKILL until thawed)."""
        if c.paused and c.cgroup is not None:
            try:
                freezer.set_frozen(c.cgroup, False)
                c.paused = False
            except OSError as e:
                log.warning("container %s: thaw: %s", c.id, e)

    def _forget(self, cid: str) -> None:
        c = self.containers.pop(cid, None)
        if c is not None:
            for fd in list(c.pipes):
                self._close_pipe(c, fd)
            if c.log_fd >= 0:
                os.close(c.log_fd)
                c.log_fd = -1
        self.hier.cgroup(self.cgroup_parent, cid).remove()

    def _op_start(self, w: Waiter, req: dict[str, Any]) -> dict[str, Any] | None:
        cid = self._container_id(req)
        c = self.containers.get(cid)
        if c is not None and c.phase == "running":
            return {"info": info_to_json(self._info(cid))}
        if c is not None and c.phase == "starting":
            c.start_waiters.append(w)
            return None
        paths = self.sd.container(cid)
        raw = read_json(paths.config)
        if raw is None:
            raise RequestError("not_found", f"no such container: {cid}")
        cfg = config_from_json(raw)
        try:
            mounts = volumes.resolve(volumes.VolumeStore(self.sd.volumes), cfg.mounts)
        except (OSError, volumes.VolumeError) as e:
            raise RequestError("start", f"volume: {e}") from e
        cg = self.hier.cgroup(self.cgroup_parent, cid)
        try:
            self.hier.prepare_parent(self.cgroup_parent)
            cg.create(Limits(
                cfg.memory_bytes, cfg.nano_cpus, cfg.pids_limit,
                memory_swap_bytes=cfg.memory_swap_bytes, cpu_shares=cfg.cpu_shares, cpuset_cpus=cfg.cpuset_cpus,
            ))
        except OSError as e:
            with contextlib.suppress(OSError):
                cg.remove()
            raise RequestError("start", f"create cgroup: {rfs.describe(e)}") from e
        v1_mounts: tuple[str, ...] = ()
        if self.hier.version == 1:
            v1_mounts = tuple(sorted({d.name for d in self.hier.v1_controllers.values()}))
        spec = sp.SpawnSpec(
            args=cfg.args,
            env=cfg.env,
            workdir=cfg.workdir,
            hostname=cfg.hostname,
            rootfs=rfs.RootfsPlan(
                rootfs=str(paths.rootfs),
                layers=tuple(str(p) for p in cfg.layers),
                upper=str(paths.upper),
                work=str(paths.work),
                cgroup_version=self.hier.version,
                cgroup_v1_mounts=v1_mounts,
                mounts=mounts,
                read_only=cfg.security.read_only,
                privileged=cfg.security.privileged,
            ),
            security=cfg.security,
            cgroup_procs=tuple(cg.join_files()),  # the forked child joins while single-threaded
            stdout_fifo=str(paths.stdout_fifo),
            stderr_fifo=str(paths.stderr_fifo),
            netns=cfg.netns,
        )
        started = time.time_ns()
        try:
            spawned = sp.spawn(spec)
        except sp.SpawnError as e:
            cg.remove()
            raise RequestError("start", str(e)) from e
        except OSError as e:
            cg.remove()
            raise RequestError("start", f"fork: {rfs.describe(e)}") from e
        c = Container(id=cid, cgroup=cg, pid=spawned.pid, started_at_ns=started, error_fd=spawned.error_fd)
        c.log_max_size, c.log_max_files = cfg.log_max_size_bytes, max(1, cfg.log_max_files)
        c.start_waiters.append(w)
        if cid in self.containers:
            self._forget_fds(self.containers[cid])
        self.containers[cid] = c
        self.by_pid[c.pid] = c
        os.set_blocking(c.error_fd, False)
        self.sel.register(c.error_fd, selectors.EVENT_READ, lambda _ev: self._on_error_pipe(c))
        self._watch_output(c, spawned.stdout_fd, "stdout")
        self._watch_output(c, spawned.stderr_fd, "stderr")
        return None

    def _watch_output(self, c: Container, fd: int, stream: str) -> None:
        os.set_blocking(fd, False)
        c.pipes[fd] = stream
        self.sel.register(fd, selectors.EVENT_READ, lambda _ev: self._on_pipe(c, fd))

    def _forget_fds(self, c: Container) -> None:
        for fd in list(c.pipes):
            self._close_pipe(c, fd)
        if c.log_fd >= 0:
            os.close(c.log_fd)
            c.log_fd = -1

    # ----- container events -----

    def _on_error_pipe(self, c: Container) -> None:
        if c.error_fd < 0:
            return
        try:
            chunk = os.read(c.error_fd, _READ_CHUNK)
        except BlockingIOError:
            return
        if chunk:
            c.error_buf += chunk
            return
        self.sel.unregister(c.error_fd)
        os.close(c.error_fd)
        c.error_fd = -1
        if not c.error_buf:
            self._on_started(c)
            return
        message = c.error_buf.decode(errors="replace")
        if c.reaped_status is None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(c.pid, 0)
        self.by_pid.pop(c.pid, None)
        self._forget_fds(c)
        if c.cgroup is not None:
            try:
                c.cgroup.remove()
            except OSError as e:
                log.warning("container %s: remove cgroup after failed start: %s", c.id, e)
        self.containers.pop(c.id, None)
        log.info("container %s: start failed: %s", c.id, message)
        for w in c.start_waiters:
            self._reply_error(w, "start", message)
        for w in c.exit_waiters:
            self._reply(w, {"info": info_to_json(self._info(c.id)), "exited": True})
        if c.remove_waiters:
            self._forget(c.id)
            for w in c.remove_waiters:
                self._reply(w, {})

    def _on_started(self, c: Container) -> None:
        paths = self.sd.container(c.id)
        c.phase = "running"
        write_json(
            paths.state,
            {"pid": c.pid, "started_at_ns": c.started_at_ns, "pid_start_time": sc.proc_start_time(c.pid)},
        )
        paths.exit.unlink(missing_ok=True)
        info = info_to_json(self._info(c.id))
        for w in c.start_waiters:
            self._reply(w, {"info": info})
        c.start_waiters.clear()
        if c.reaped_status is not None:
            self._on_exit(c, exit_code_of(c.reaped_status), signal_of(c.reaped_status))

    def _on_pidfd(self, c: Container) -> None:
        if c.pidfd < 0:
            return
        self.sel.unregister(c.pidfd)
        os.close(c.pidfd)
        c.pidfd = -1
        self._on_exit(c, UNKNOWN_EXIT_CODE)

    def _on_pipe(self, c: Container, fd: int) -> None:
        if fd not in c.pipes:  # closed earlier in this loop iteration
            return
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_pipe(c, fd)
            return
        self._write_log(c, c.pipes[fd], data)

    def _drain(self, c: Container) -> None:
        for fd in list(c.pipes):
            while fd in c.pipes:
                try:
                    data = os.read(fd, _READ_CHUNK)
                except BlockingIOError:
                    break
                if not data:
                    self._close_pipe(c, fd)
                    break
                self._write_log(c, c.pipes[fd], data)

    def _close_pipe(self, c: Container, fd: int) -> None:
        c.pipes.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(fd)
        os.close(fd)
        if not c.pipes and c.phase == "exited" and c.log_fd >= 0:
            os.close(c.log_fd)
            c.log_fd = -1

    def _write_log(self, c: Container, stream: str, data: bytes) -> None:
        lines = cri_lines(time.time_ns(), stream, data)
        if c.log_max_size <= 0:
            self._append_log(c, lines)
            return
        # A chunk read from the pipe can hold many lines (64 KiB when the supervisor was slow to read): it is
        # cut at line ends so that each file stays within the cap, as Docker's json-file checks every line.
        while lines:
            self._open_log(c)  # the current file, and its size
            room = max(0, c.log_max_size - c.log_size)  # a file over the cap (an earlier supervisor's): none
            if len(lines) <= room:
                self._append_log(c, lines)
                return
            cut = lines.rfind(b"\n", 0, room) + 1
            if cut == 0 and c.log_size == 0:  # one line longer than the cap: alone in a file
                cut = lines.find(b"\n") + 1 or len(lines)
            if cut:
                self._append_log(c, lines[:cut])
                lines = lines[cut:]
            self._rotate_log(c)

    def _open_log(self, c: Container) -> None:
        if c.log_fd < 0:
            c.log_fd = os.open(self.sd.container(c.id).log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o640)
            c.log_size = os.fstat(c.log_fd).st_size

    def _append_log(self, c: Container, lines: bytes) -> None:
        self._open_log(c)
        try:
            os.write(c.log_fd, lines)
            c.log_size += len(lines)
        except OSError as e:
            log.warning("container %s: write log: %s", c.id, e)

    def _rotate_log(self, c: Container) -> None:
        """container.log becomes container.log.1, .1 becomes .2 and so on; the part beyond log_max_files
        goes. Whole lines only: a line is never split across two files (_write_log)."""
        paths = self.sd.container(c.id)
        os.close(c.log_fd)
        c.log_fd = -1
        c.log_size = 0
        try:
            for n in range(c.log_max_files - 1, 0, -1):
                src = paths.log if n == 1 else paths.rotated_log(n - 1)
                with contextlib.suppress(FileNotFoundError):
                    os.replace(src, paths.rotated_log(n))
            if c.log_max_files == 1:
                paths.log.unlink(missing_ok=True)
        except OSError as e:
            log.warning("container %s: rotate log: %s", c.id, e)

    def _on_exit(self, c: Container, code: int, sig: int = 0) -> None:
        self._drain(c)
        self.by_pid.pop(c.pid, None)
        oom = False
        if c.cgroup is not None:
            try:
                oom = c.cgroup.oom_killed()
                if c.paused:  # a frozen cgroup holds its killed tasks; thaw so that rmdir succeeds
                    freezer.set_frozen(c.cgroup, False)
                c.cgroup.remove()
            except OSError as e:
                log.warning("container %s: cgroup cleanup: %s", c.id, e)
        c.paused = False
        c.phase = "exited"
        paths = self.sd.container(c.id)
        finished = time.time_ns()
        if paths.dir.exists():
            write_json(
                paths.exit,
                {
                    "pid": c.pid,
                    "exit_code": code,
                    "started_at_ns": c.started_at_ns,
                    "finished_at_ns": finished,
                    "oom_killed": oom,
                    "signal": sig,
                },
            )
            paths.state.unlink(missing_ok=True)
        if not c.pipes and c.log_fd >= 0:
            os.close(c.log_fd)
            c.log_fd = -1
        info = ContainerInfo(
            id=c.id,
            state=ProcessState.EXITED,
            pid=c.pid,
            exit_code=code,
            started_at_ns=c.started_at_ns,
            finished_at_ns=finished,
            oom_killed=oom,
            signal=sig,
        )
        log.info("container %s: exited with %d%s", c.id, code, " (oom killed)" if oom else "")
        event = {"event": "exit", "info": info_to_json(info)}
        for conn in list(self.conns):
            if conn.subscribed:
                self._send(conn, event)
        for w in c.exit_waiters:
            self._reply(w, {"info": info_to_json(info), "exited": True})
        c.exit_waiters.clear()
        if c.remove_waiters:
            waiters, c.remove_waiters = c.remove_waiters, []
            self._forget(c.id)
            for w in waiters:
                self._reply(w, {})

    def _info(self, cid: str) -> ContainerInfo:
        c = self.containers.get(cid)
        if c is not None and c.phase == "running":
            return ContainerInfo(
                id=cid, state=ProcessState.RUNNING, pid=c.pid, started_at_ns=c.started_at_ns, paused=c.paused
            )
        ex = read_json(self.sd.container(cid).exit)
        if ex is not None:
            return ContainerInfo(
                id=cid,
                state=ProcessState.EXITED,
                pid=ex.get("pid", 0),
                exit_code=ex["exit_code"],
                started_at_ns=ex["started_at_ns"],
                finished_at_ns=ex["finished_at_ns"],
                oom_killed=ex["oom_killed"],
                signal=ex.get("signal", 0),
            )
        return ContainerInfo(id=cid, state=ProcessState.CREATED)


def _lock(state_dir: Path) -> int | None:
    """Hold <state-dir>/supervisor.lock for the life of the process; None if another supervisor holds it."""
    fd = os.open(state_dir / "supervisor.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _detach(log_path: Path) -> None:
    """Double fork into a new session with stdio on log_path; the original process exits 0."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="berth-supervisor", description=__doc__.split("\n\n")[0] if __doc__ else "")
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--cgroup-parent", required=True)
    ap.add_argument("--detach", action="store_true", help="double fork, setsid, log to <state-dir>/supervisor.log")
    args = ap.parse_args(argv)
    state_dir: Path = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if args.detach:
        _detach(StateDir(state_dir).supervisor_log)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = _lock(state_dir)
    if lock is None:
        log.info("another supervisor already serves %s", state_dir)
        return 0
    sup = Supervisor(state_dir, args.cgroup_parent)
    sup.open()
    write_json(StateDir(state_dir).pid_file, os.getpid())
    log.info("serving %s (cgroup v%d, parent %s)", sup.sd.socket, sup.hier.version, args.cgroup_parent)
    try:
        sup.run()
    finally:
        StateDir(state_dir).pid_file.unlink(missing_ok=True)
    log.info("stopped; containers keep running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
