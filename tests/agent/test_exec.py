"""exec on the real kernel without a cluster (issue 3b): agent.exec_session and the agent.runtime.exec helper
enter a running container's namespaces and cgroup with its user and capabilities; the exit code comes back;
nothing of the session is left running."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from agent import exec_session
from agent.runtime.exec import ExecError
from agent.runtime.security import Security
from berth.api import types_pb2 as t
from tests.agent.conftest import Host, run
from tests.agent.test_runtime import wait_exit


async def _no_input() -> AsyncIterator[t.ExecInput]:
    return
    yield


async def collect(host: Host, start: t.ExecStart) -> tuple[int, bytes, bytes]:
    ex = host.executor()
    out, err, code = b"", b"", -1
    try:
        async for msg in exec_session.run(ex, start, _no_input()):
            kind = msg.WhichOneof("output")
            if kind == "stdout":
                out += msg.stdout
            elif kind == "stderr":
                err += msg.stderr
            else:
                code = msg.exit_code
    finally:
        await ex.close()
    return code, out, err


def test_exec_enters_namespaces_cgroup_user_and_caps(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            await ex.create(supervised.config("target", "sleep", "1000", hostname="inside", env=("X=1",),
                                              security=Security(user="nobody", cap_drop=("ALL",))))
            info = await ex.start("target")
            script = "hostname; echo $X; id -u; grep CapBnd /proc/self/status | cut -f2; cat /proc/self/cgroup; exit 5"
            code, out, err = await collect(supervised, t.ExecStart(container="target", args=["sh", "-c", script]))
            assert code == 5, err
            lines = out.decode().split()
            assert lines[:4] == ["inside", "1", "65534", "0000000000000000"]
            assert lines[4:] and all(line.endswith(":/") for line in lines[4:])  # the container's cgroup
            code, out, _ = await collect(supervised, t.ExecStart(container="target", args=["id", "-u"], user="root"))
            assert (code, out) == (0, b"0\n")
            code, _, err = await collect(supervised, t.ExecStart(container="target", args=["nosuch"]))
            assert code == 127 and b"executable file not found in $PATH: nosuch" in err
            # nothing of the sessions stays: only the container's own process is in its cgroup.
            assert supervised.container_pids() == [info.pid]
            await ex.stop("target", 0)
            await wait_exit(ex, "target")
            with pytest.raises(ExecError, match="container target is not running"):
                await collect(supervised, t.ExecStart(container="target", args=["true"]))
        finally:
            await ex.remove("target")
            await ex.close()

    run(body())
