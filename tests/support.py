"""Small helpers shared by tests: waiting on a condition with a deadline, and reading etcd's keys."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
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
