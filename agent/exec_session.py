"""The agent's side of `berthctl exec` (issue 3b): one Exec stream from a controller becomes one helper
process (agent.runtime.exec) whose stdio is a pseudo-terminal (with -t) or three pipes, pumped to and from
the stream. The first message starts it; later ones bring stdin, window sizes and the end of stdin; the last
message out is the exit code. A stream that the caller drops kills the helper, and with it (PDEATHSIG) the
process in the container.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import sys
from collections.abc import AsyncIterator

from agent.executor import ContainerNotFound, ExecutorError, ProcessState
from agent.runtime import exec as rexec
from agent.runtime.cgroups import Hierarchy
from agent.runtime.linux import LinuxExecutor
from agent.runtime.state import config_from_json, read_json
from berth.api import types_pb2 as t

_CHUNK = 65536
_DRAIN_AFTER_EXIT_S = 2.0  # output still buffered when the helper exits; a background child may hold the tty


async def prepare(executor: LinuxExecutor, start: t.ExecStart) -> rexec.ExecSpec:
    """What the helper needs; raises ExecError when the container is unknown or not running."""
    cid = start.container
    try:
        info = await executor.info(cid)
    except ContainerNotFound:
        raise rexec.ExecError(f"no container {cid[:12]} on this host") from None
    except ExecutorError as e:
        raise rexec.ExecError(str(e)) from e
    if info.state is not ProcessState.RUNNING or not info.pid:
        raise rexec.ExecError(f"container {cid[:12]} is not running: start it first (berthctl start)")
    raw = read_json(executor.sd.container(cid).config)
    if raw is None:
        raise rexec.ExecError(f"no container {cid[:12]} on this host")
    cfg = config_from_json(raw)
    if not start.args:
        raise rexec.ExecError("no command given: berthctl exec CONTAINER COMMAND [ARG...]")
    for item in start.env:
        if "=" not in item or item.startswith("="):
            raise rexec.ExecError(f"invalid -e {item!r}: write -e KEY=VALUE")
    cg = Hierarchy().cgroup(executor.cgroup_parent, cid)
    return rexec.ExecSpec(
        pid=info.pid, cgroup_procs=tuple(cg.procs_files()), args=tuple(start.args),
        env=(*cfg.env, *start.env), workdir=start.workdir or cfg.workdir, hostname=cfg.hostname,
        user=start.user or cfg.security.user, tty=start.tty, security=cfg.security,
    )


class _Reader:
    """Chunks from a non-blocking fd into a queue as (stream, bytes), then (stream, b"") at EOF or EIO."""

    def __init__(self, fd: int, stream: str, out: asyncio.Queue[tuple[str, bytes]]) -> None:
        self.fd, self.stream, self.out = fd, stream, out
        self.done = asyncio.Event()
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's last slave closed
            data = b""
        self.out.put_nowait((self.stream, data))
        if not data:
            self.close()

    def close(self) -> None:
        if not self.done.is_set():
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.done.set()


def _write_all(fd: int, data: bytes) -> None:
    """Write everything to fd, waiting while it is full (a pty master dup shares O_NONBLOCK)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


async def run(
    executor: LinuxExecutor, first: t.ExecStart, requests: AsyncIterator[t.ExecInput]
) -> AsyncIterator[t.ExecOutput]:
    """Run one exec session; yields its output and, last, its exit code."""
    spec = await prepare(executor, first)
    loop = asyncio.get_running_loop()
    master = -1
    if spec.tty:
        master, slave = os.openpty()
        if first.size.rows and first.size.cols:
            rexec.set_window_size(master, first.size.rows, first.size.cols)
        stdin_w, fds = os.dup(master), {"stdout": master}
        child_stdio = (slave, slave, slave)
    else:
        in_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        fds = {"stdout": out_r, "stderr": err_r}
        child_stdio = (in_r, out_w, err_w)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.runtime.exec", spec.to_json(),
            stdin=child_stdio[0], stdout=child_stdio[1], stderr=child_stdio[2],
            cwd="/",
        )
    finally:
        for fd in set(child_stdio):
            os.close(fd)
    out: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    readers = [_Reader(fd, stream, out) for stream, fd in fds.items()]
    if not spec.tty and not first.interactive:
        os.close(stdin_w)
        stdin_w = -1

    async def pump_input() -> None:
        nonlocal stdin_w
        async for msg in requests:
            kind = msg.WhichOneof("input")
            if kind == "stdin" and stdin_w >= 0:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(_write_all, stdin_w, msg.stdin)
            elif kind == "resize" and master >= 0:
                rexec.set_window_size(master, msg.resize.rows, msg.resize.cols)
            elif kind == "close_stdin" and stdin_w >= 0 and not spec.tty:
                os.close(stdin_w)
                stdin_w = -1

    inputs = loop.create_task(pump_input())
    waiter = loop.create_task(proc.wait())
    try:
        open_streams = len(readers)
        while open_streams:
            getter = loop.create_task(out.get())
            done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            stream, data = getter.result()
            if not data:
                open_streams -= 1
                continue
            yield t.ExecOutput(stdout=data) if stream == "stdout" else t.ExecOutput(stderr=data)
        code = await waiter
        # The helper exited: what is left in the pipes or the pty is its last output.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_DRAIN_AFTER_EXIT_S):
                while open_streams:
                    stream, data = await out.get()
                    if not data:
                        open_streams -= 1
                        continue
                    yield t.ExecOutput(stdout=data) if stream == "stdout" else t.ExecOutput(stderr=data)
        yield t.ExecOutput(exit_code=code)
    finally:
        inputs.cancel()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        waiter.cancel()
        for r in readers:
            r.close()
        if stdin_w >= 0:
            os.close(stdin_w)
