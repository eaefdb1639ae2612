"""LinuxExecutor: the real Executor (agent.executor), backed by the host's berth-supervisor.

The executor writes a container's config and writable layer itself (create, remove) and asks the supervisor
(agent.supervisor, one per host) for everything involving processes over `<state-dir>/supervisor.sock`. If the
socket does not answer it starts the supervisor detached (setsid, double fork), so containers survive this
process. Closing the executor closes its connections only; containers and supervisor keep running.

Errors: supervisor replies map to agent.executor exceptions (not_found -> ContainerNotFound, start ->
StartError, others -> ExecutorError); a supervisor that cannot be reached or started -> ExecutorError.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.executor import (
    ContainerConfig,
    ContainerInfo,
    ContainerNotFound,
    ExecutorError,
    ProcessState,
    StartError,
)
from agent.runtime.mounts import MountError, check_targets
from agent.runtime.security import SecurityError
from agent.runtime.security import check as check_security
from agent.runtime.state import ContainerPaths, StateDir, config_to_json, info_from_json, write_json
from agent.runtime.volumes import Volume, VolumeError, VolumeStore
from agent.runtime.volumes import users as volume_users

log = logging.getLogger("berth.runtime")

_SUPERVISOR_START_TIMEOUT_S = 10.0
_LIMIT = 64 << 20


class _Conn:
    """One multiplexed connection to the supervisor: requests carry ids, a reader task matches replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 1
        self.task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        err: BaseException = ExecutorError("connection to the supervisor closed")
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                fut = self.pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (OSError, ValueError) as e:
            err = ExecutorError(f"connection to the supervisor failed: {e}")
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self.pending.clear()
            self.writer.close()

    @property
    def alive(self) -> bool:
        return not self.task.done()

    async def request(self, op: str, **params: Any) -> dict[str, Any]:
        if not self.alive:
            raise ExecutorError("connection to the supervisor closed")
        req_id = self.next_id
        self.next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[req_id] = fut
        try:
            self.writer.write(json.dumps({"id": req_id, "op": op, **params}).encode() + b"\n")
            await self.writer.drain()
        except OSError as e:
            self.pending.pop(req_id, None)
            raise ExecutorError(f"send to the supervisor: {e}") from e
        try:
            return await fut
        finally:
            self.pending.pop(req_id, None)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError, ExecutorError):
            await self.task
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok"):
        return reply
    err = reply.get("error") or {}
    kind, message = err.get("kind"), str(err.get("message", "unknown supervisor error"))
    if kind == "not_found":
        raise ContainerNotFound(message)
    if kind == "start":
        raise StartError(message)
    raise ExecutorError(message)


class LinuxExecutor:
    """Executor on this host's kernel through berth-supervisor. See the module docstring."""

    def __init__(
        self, state_dir: Path, cgroup_parent: str, supervisor_cmd: list[str] | None = None,
        allow_privileged: bool = False,
    ) -> None:
        self.sd = StateDir(Path(state_dir).resolve())
        self.allow_privileged = allow_privileged
        self.volumes = VolumeStore(self.sd.volumes)
        self.cgroup_parent = cgroup_parent
        self.supervisor_cmd = supervisor_cmd or [sys.executable, "-m", "agent.supervisor"]
        self._conn: _Conn | None = None
        self._conn_lock: asyncio.Lock | None = None
        self._closed = False
        self._subscriptions: set[asyncio.StreamWriter] = set()

    # ----- supervisor connection -----

    async def _open_conn(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(self.sd.socket), limit=_LIMIT)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the running supervisor, starting one if none answers."""
        try:
            return await self._open_conn()
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        await self._spawn_supervisor()
        deadline = time.monotonic() + _SUPERVISOR_START_TIMEOUT_S
        delay = 0.002
        while True:
            try:
                return await self._open_conn()
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if time.monotonic() > deadline:
                    raise ExecutorError(
                        f"supervisor did not come up within {_SUPERVISOR_START_TIMEOUT_S:.0f}s "
                        f"(see {self.sd.supervisor_log}): {e}"
                    ) from e
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _spawn_supervisor(self) -> None:
        self.sd.root.mkdir(parents=True, exist_ok=True)
        cmd = [*self.supervisor_cmd, "--state-dir", str(self.sd.root), "--cgroup-parent", self.cgroup_parent]
        log.info("starting supervisor: %s", " ".join(cmd))
        with open(self.sd.supervisor_log, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                "--detach",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                cwd="/",
            )
        rc = await proc.wait()
        if rc != 0:
            raise ExecutorError(f"supervisor failed to start (exit {rc}); see {self.sd.supervisor_log}")

    async def _request(self, op: str, **params: Any) -> dict[str, Any]:
        if self._closed:
            raise ExecutorError("executor is closed")
        if self._conn_lock is None:
            self._conn_lock = asyncio.Lock()
        async with self._conn_lock:
            if self._conn is None or not self._conn.alive:
                self._conn = _Conn(*await self._connect())
            conn = self._conn
        return _raise_for(await conn.request(op, **params))

    async def close(self) -> None:
        """Close connections; containers and the supervisor keep running."""
        self._closed = True
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        for w in list(self._subscriptions):
            w.close()

    # ----- Executor -----

    async def create(self, config: ContainerConfig) -> None:
        paths = self._paths(config.id)
        if not config.layers:
            raise ExecutorError(f"container {config.id}: no image layers")
        await asyncio.to_thread(self._prepare_host_side, config)
        for d in (paths.upper, paths.work, paths.rootfs):
            d.mkdir(parents=True, exist_ok=True)
        write_json(paths.config, config_to_json(config))

    async def start(self, container_id: str) -> ContainerInfo:
        reply = await self._request("start", container=container_id)
        return info_from_json(reply["info"])

    async def stop(self, container_id: str, timeout_s: float) -> ContainerInfo:
        await self._request("signal", container=container_id, signal=int(signal.SIGTERM), all=False)
        reply = await self._request("wait", container=container_id, timeout_s=max(0.0, timeout_s))
        if not reply["exited"]:
            await self._request("signal", container=container_id, signal=int(signal.SIGKILL), all=True)
            reply = await self._request("wait", container=container_id, timeout_s=None)
        return info_from_json(reply["info"])

    async def signal(self, container_id: str, sig: int) -> ContainerInfo:
        """Send sig to the container's first process (docker kill -s); issue 3a."""
        reply = await self._request("signal", container=container_id, signal=int(sig), all=False)
        return info_from_json(reply["info"])

    async def pause(self, container_id: str, paused: bool = True) -> ContainerInfo:
        """Freeze (paused) or thaw every process of the container's cgroup; issue 3a."""
        reply = await self._request("freeze", container=container_id, frozen=paused)
        return info_from_json(reply["info"])

    async def wait(self, container_id: str, timeout_s: float | None = None) -> ContainerInfo:
        """The container's info once it is not running (or at the timeout); issue 3a."""
        reply = await self._request("wait", container=container_id, timeout_s=timeout_s)
        return info_from_json(reply["info"])

    async def remove(self, container_id: str) -> None:
        paths = self._paths(container_id)
        if not paths.dir.exists():
            return
        await self._request("remove", container=container_id)
        await asyncio.to_thread(_rmtree, paths.dir)

    async def list(self) -> list[ContainerInfo]:
        reply = await self._request("list")
        return [info_from_json(d) for d in reply["containers"]]

    async def info(self, container_id: str) -> ContainerInfo:
        """One container's state (not part of the Executor protocol)."""
        return info_from_json((await self._request("info", container=container_id))["info"])

    async def exits(self) -> AsyncIterator[ContainerInfo]:
        """Exit events from a supervisor subscription; reconnects (starting the supervisor if needed)."""
        delay = 0.05
        while not self._closed:
            try:
                reader, writer = await self._connect()
            except (OSError, ExecutorError) as e:
                log.warning("exit subscription: %s; retrying", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._subscriptions.add(writer)
            try:
                writer.write(json.dumps({"id": 0, "op": "subscribe"}).encode() + b"\n")
                await writer.drain()
                delay = 0.05
                while True:
                    line = await reader.readline()
                    if not line:
                        break
                    msg = json.loads(line)
                    if msg.get("event") == "exit":
                        info = info_from_json(msg["info"])
                        if info.state is ProcessState.EXITED:
                            yield info
            except (OSError, ValueError) as e:
                log.warning("exit subscription lost: %s", e)
            finally:
                self._subscriptions.discard(writer)
                writer.close()

    def _prepare_host_side(self, config: ContainerConfig) -> None:
        """issue 3b: refuse what this host does not allow, make named volumes and missing bind sources."""
        if config.security.privileged and not self.allow_privileged:
            raise StartError(
                "privileged containers are not allowed on this host: its agent must run with --allow-privileged"
            )
        try:
            check_security(config.security)
            check_targets(config.mounts)
            for m in config.mounts:
                if m.kind == "volume":
                    self.volumes.create(m.source)
                elif m.kind == "bind" and not Path(m.source).exists():
                    Path(m.source).mkdir(parents=True)  # as `docker run -v` does
        except (SecurityError, MountError, VolumeError) as e:
            raise StartError(str(e)) from e
        except OSError as e:
            raise StartError(f"prepare mounts: {e}") from e

    # ----- volumes (issue 3b; not part of the Executor protocol) -----

    def volume_create(self, name: str, labels: dict[str, str] | None = None) -> Volume:
        return self.volumes.create(name, labels)

    def volume_get(self, name: str) -> Volume:
        return self.volumes.get(name)

    def volume_list(self) -> builtins.list[Volume]:
        return self.volumes.list()

    def volume_remove(self, name: str) -> None:
        self.volumes.remove(name, volume_users(self.sd.containers, name))

    def log_path(self, container_id: str) -> Path:
        return self._paths(container_id).log

    def _paths(self, container_id: str) -> ContainerPaths:
        try:
            return self.sd.container(container_id)
        except ValueError as e:
            raise ExecutorError(str(e)) from None


def _rmtree(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
