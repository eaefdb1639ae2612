"""Pause and unpause a container by freezing its cgroup (docker pause), on cgroup v1 and v2:

    v1: <freezer dir>/freezer.state: write FROZEN or THAWED; it reads FREEZING until every task is frozen
    v2: <dir>/cgroup.freeze: write 1 or 0; cgroup.events has "frozen 1" once every task is frozen

Works on an agent.runtime.cgroups.Cgroup, so the same code runs against a v2-shaped tree in a temporary
directory (the tests) and the real /sys/fs/cgroup.

Exceptions: plain OSError (ENOTSUP when the host has no freezer for this cgroup; the caller maps it).
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

from agent.runtime.cgroups import Cgroup


def _file(cg: Cgroup) -> Path:
    if cg.version == 2:
        return cg.dirs[""] / "cgroup.freeze"
    d = cg.dirs.get("freezer")
    if d is None:
        raise OSError(errno.ENOTSUP, "the freezer cgroup controller is not mounted on this host")
    return d / "freezer.state"


def set_frozen(cg: Cgroup, frozen: bool, timeout_s: float = 5.0) -> None:
    """Freeze (or thaw) every process of the cgroup; returns once the kernel says it is done (frozen), or
    raises TimeoutError(ETIMEDOUT) after timeout_s."""
    path = _file(cg)
    value = ("1" if frozen else "0") if cg.version == 2 else ("FROZEN" if frozen else "THAWED")
    with open(path, "w") as f:
        f.write(value)
    if not frozen:
        return
    deadline = time.monotonic() + timeout_s
    while not is_frozen(cg):
        if time.monotonic() > deadline:
            raise TimeoutError(errno.ETIMEDOUT, f"cgroup {path.parent} did not freeze within {timeout_s:g}s")
        time.sleep(0.001)


def is_frozen(cg: Cgroup) -> bool:
    """True when every process of the cgroup is frozen (False for a missing cgroup or freezer)."""
    try:
        if cg.version == 2:
            events = (cg.dirs[""] / "cgroup.events").read_text().split()
            return "frozen" in events and events[events.index("frozen") + 1] == "1"
        return _file(cg).read_text().strip() == "FROZEN"
    except (OSError, IndexError):  # no such cgroup, or no freezer on this host
        return False
