"""Small helpers shared by tests: waiting on a condition with a deadline, reading etcd's keys, and killing a
daemon then starting it again the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until condition() is truthy and return its value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def etcd_keys(url: str, prefix: str = "/berth/") -> list[str]:
    """The keys under a prefix, read with etcdctl (independent of berth's own client)."""
    out = subprocess.run(
        ["etcdctl", f"--endpoints={url}", "get", "--prefix", "--keys-only", prefix],
        capture_output=True, text=True, check=True, env={**os.environ, "ETCDCTL_API": "3"},
    ).stdout
    return [line for line in out.splitlines() if line]


def kill_9_keeping_command(pid: int) -> tuple[list[bytes], dict[bytes, bytes]]:
    """SIGKILL a process (say, a dev cluster's agent) and return its argv and environment, so that
    `respawn` can start it again the same way."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    environ = dict(
        item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item
    )
    os.kill(pid, signal.SIGKILL)
    return cmdline, environ


def respawn(cmdline: list[bytes], environ: dict[bytes, bytes], log: str) -> None:
    """Start a command detached, as the dev cluster starts its processes, so `dev down` finds it later."""
    with open(log, "ab") as out:
        subprocess.Popen(cmdline, env=environ, stdin=subprocess.DEVNULL, stdout=out, stderr=out,  # type: ignore[arg-type]
                         start_new_session=True)
