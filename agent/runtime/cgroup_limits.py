"""The cgroup limits beyond memory, CPU quota and pids (agent.runtime.cgroups): swap, CPU shares and CPU sets,
from one model (cgroups.Limits) onto either hierarchy, as runc maps them:

    --memory-swap  v1 memory.memsw.limit_in_bytes (memory + swap)   v2 memory.swap.max (swap alone)
                   0 means twice --memory (Docker's default), -1 unlimited swap
    --cpu-shares   v1 cpu.shares                                     v2 cpu.weight = 1 + (shares - 2) * 9999 / 262142
    --cpuset-cpus  v1 cpuset.cpus (and cpuset.mems, which a v1 cpuset must have before a process can join;
                   empty ancestors made by berth get their parent's)  v2 cpuset.cpus

A limit asked for whose file the host lacks (v1 memsw without swap accounting, say) is an
OSError(ENOTSUP) that says so. Exceptions: plain OSError, as agent.runtime.cgroups.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.runtime.cgroups import Limits

DEFAULT_SHARES = 1024
DEFAULT_WEIGHT = 100


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _unsupported(what: str, path: Path) -> OSError:
    return OSError(errno.ENOTSUP, f"{what} requested but this host's cgroups lack {path.name}", str(path))


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares (2..262144) to v2 cpu.weight (1..10000), as runc converts them."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def memsw_v1(limits: Limits) -> int:
    """memory.memsw.limit_in_bytes: memory + swap, -1 for unlimited."""
    if limits.memory_swap_bytes > 0:
        return limits.memory_swap_bytes
    if limits.memory_swap_bytes == 0 and limits.memory_bytes > 0:
        return 2 * limits.memory_bytes
    return -1


def write_v1_extra(dirs: dict[str, Path], limits: Limits) -> None:
    mem = dirs.get("memory")
    if mem is not None:
        path = mem / "memory.memsw.limit_in_bytes"
        if path.exists():
            _write(path, str(memsw_v1(limits)))
        elif limits.memory_swap_bytes != 0:
            raise _unsupported("--memory-swap", path)
    cpu = dirs.get("cpu")
    if cpu is not None:
        _write(cpu / "cpu.shares", str(limits.cpu_shares if limits.cpu_shares > 0 else DEFAULT_SHARES))
    cpuset = dirs.get("cpuset")
    if cpuset is not None:
        _fill_cpuset_v1(cpuset)
        if limits.cpuset_cpus:
            _write(cpuset / "cpuset.cpus", limits.cpuset_cpus)


def _fill_cpuset_v1(leaf: Path) -> None:
    """Give every empty cpuset on the way down to leaf its parent's cpus and mems."""
    chain = [leaf]
    while True:
        d = chain[-1]
        try:
            if (d / "cpuset.cpus").read_text().strip() and (d / "cpuset.mems").read_text().strip():
                break
        except FileNotFoundError:
            break
        chain.append(d.parent)
    for child in reversed(chain[:-1]):
        parent = child.parent
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not (child / name).read_text().strip():
                _write(child / name, (parent / name).read_text().strip())


def write_v2_extra(d: Path, limits: Limits, have: set[str]) -> None:
    swap = d / "memory.swap.max"
    if "memory" in have and swap.exists():
        if limits.memory_swap_bytes > 0:
            value = str(max(0, limits.memory_swap_bytes - limits.memory_bytes))
        elif limits.memory_swap_bytes == 0 and limits.memory_bytes > 0:
            value = str(limits.memory_bytes)
        else:
            value = "max"
        _write(swap, value)
    elif limits.memory_swap_bytes != 0:
        raise _unsupported("--memory-swap", swap)
    if "cpu" in have:
        weight = shares_to_weight(limits.cpu_shares) if limits.cpu_shares > 0 else DEFAULT_WEIGHT
        _write(d / "cpu.weight", str(weight))
    if limits.cpuset_cpus:
        if "cpuset" not in have:
            raise _unsupported("--cpuset-cpus", d / "cpuset.cpus")
        _write(d / "cpuset.cpus", limits.cpuset_cpus)
