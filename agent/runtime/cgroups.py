"""Container cgroups on cgroup v1 and v2: create with limits, join, kill everything inside, read OOM kills,
remove.

One model, `Limits`, applied to either hierarchy:

    v1: /sys/fs/cgroup/<controller>/<parent>/<id> for memory, cpu, cpuacct, pids, freezer (those mounted)
        memory.limit_in_bytes; cpu.cfs_period_us + cpu.cfs_quota_us; pids.max
    v2: /sys/fs/cgroup/<parent>/<id>, controllers enabled in every ancestor's cgroup.subtree_control
        memory.max; cpu.max "quota period"; pids.max

The filesystem root is injectable (`Hierarchy(root=...)`) so tests can check the writes against a tree in a
temporary directory. Parents are created when missing and never removed: they may be shared with other
containers or created by the operator.

Exceptions: plain OSError from the filesystem; callers (the supervisor) turn them into start errors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from agent.runtime.cgroup_limits import write_v1_extra, write_v2_extra

DEFAULT_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer", "cpuset")
V2_CONTROLLERS = ("memory", "cpu", "pids", "cpuset")
CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    """Resource limits of one container; 0 means no limit."""

    memory_bytes: int = 0
    nano_cpus: int = 0
    pids_limit: int = 0
    # issue 3b: see agent.runtime.cgroup_limits for how these are written on v1 and v2.
    memory_swap_bytes: int = 0  # memory + swap; 0: twice memory_bytes when that is set; -1: unlimited
    cpu_shares: int = 0  # 0: the kernel's default
    cpuset_cpus: str = ""  # "": the parent's CPUs

    def cpu_quota_us(self) -> int:
        """The CFS quota per CFS_PERIOD_US that gives nano_cpus (1e9 = one CPU); -1 when unlimited."""
        if self.nano_cpus <= 0:
            return -1
        return max(1000, self.nano_cpus * CFS_PERIOD_US // 1_000_000_000)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_counter(path: Path, key: str) -> int | None:
    """The value of `key N` in a flat-keyed cgroup file, or None if the file or key is absent."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return None


class Cgroup:
    """One container's cgroup: a single directory on v2, one per mounted controller on v1."""

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        # v1: controller name -> directory (co-mounted controllers share one); v2: {"": directory}.
        self.dirs = dirs

    def unique_dirs(self) -> list[Path]:
        seen: list[Path] = []
        for d in self.dirs.values():
            if d not in seen:
                seen.append(d)
        return seen

    def procs_files(self) -> list[str]:
        """The cgroup.procs files a process writes "0" to, to join every hierarchy of this cgroup."""
        return [str(d / "cgroup.procs") for d in self.unique_dirs()]

    def join_files(self) -> list[str]:
        """The files a single-threaded process writes "0" to, to join every hierarchy of this cgroup.

        v1: `tasks`, which moves the writing thread alone. Moving a whole process (cgroup.procs) takes the
        kernel's global cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period: 6-15 ms
        per container start on a 250 Hz kernel, against ~0.5 ms through `tasks`. For a single-threaded
        process, such as the supervisor's forked child that becomes the container, both move the same one
        task. v2 joins a domain cgroup through cgroup.procs only."""
        name = "tasks" if self.version == 1 else "cgroup.procs"
        return [str(d / name) for d in self.unique_dirs()]

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.unique_dirs())

    def create(self, limits: Limits) -> None:
        """Create the directories (and missing parents) and write the limits. Idempotent: an existing cgroup
        gets the given limits, "unlimited" included. A limit whose controller the host lacks (v1: not
        mounted; v2: not enabled in the parent's cgroup.subtree_control) raises OSError(ENOTSUP); without a
        limit, a missing controller is fine."""
        wanted = {
            "memory": limits.memory_bytes > 0 or limits.memory_swap_bytes != 0,
            "cpu": limits.nano_cpus > 0 or limits.cpu_shares > 0,
            "pids": limits.pids_limit > 0,
            "cpuset": bool(limits.cpuset_cpus),
        }
        have = self._controllers()
        for ctrl, want in wanted.items():
            if want and ctrl not in have:
                raise OSError(
                    errno.ENOTSUP, f"{ctrl} limit requested but the {ctrl} cgroup controller is not available"
                )
        quota = limits.cpu_quota_us()
        if self.version == 2:
            d = self.dirs[""]
            d.mkdir(parents=True, exist_ok=True)
            if "memory" in have:
                _write(d / "memory.max", str(limits.memory_bytes) if limits.memory_bytes > 0 else "max")
            if "cpu" in have:
                _write(d / "cpu.max", f"{quota if quota > 0 else 'max'} {CFS_PERIOD_US}")
            if "pids" in have:
                _write(d / "pids.max", str(limits.pids_limit) if limits.pids_limit > 0 else "max")
            write_v2_extra(d, limits, have)
            return
        for d in self.unique_dirs():
            d.mkdir(parents=True, exist_ok=True)
        if "memory" in have:
            value = str(limits.memory_bytes) if limits.memory_bytes > 0 else "-1"
            _write(self.dirs["memory"] / "memory.limit_in_bytes", value)
        if "cpu" in have:
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        if "pids" in have:
            _write(self.dirs["pids"] / "pids.max", str(limits.pids_limit) if limits.pids_limit > 0 else "max")
        write_v1_extra(self.dirs, limits)

    def _controllers(self) -> set[str]:
        """Controllers this cgroup can use: v1 the mounted ones; v2 those enabled in the parent."""
        if self.version == 1:
            return set(self.dirs)
        try:
            text = (self.dirs[""].parent / "cgroup.subtree_control").read_text()
        except FileNotFoundError:
            return set()
        return {c.lstrip("+") for c in text.split()}

    def procs(self) -> list[int]:
        """Every pid in the cgroup (all hierarchies), without duplicates."""
        pids: set[int] = set()
        for d in self.unique_dirs():
            try:
                text = (d / "cgroup.procs").read_text()
            except FileNotFoundError:
                continue
            pids.update(int(p) for p in text.split())
        return sorted(pids)

    def signal_all(self, sig: int) -> int:
        """Send sig to every process in the cgroup once; returns how many were signalled."""
        n = 0
        for pid in self.procs():
            try:
                os.kill(pid, sig)
                n += 1
            except ProcessLookupError:
                pass
        return n

    def kill_all(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process in the cgroup until it is empty (new ones may fork meanwhile); True if it
        emptied before the deadline. Dead processes leave cgroup.procs once reaped, so call this from the
        process that reaps them or expect zombies to stay listed until their parent waits."""
        deadline = time.monotonic() + timeout_s
        if self.version == 2 and (self.dirs[""] / "cgroup.kill").exists():
            try:
                _write(self.dirs[""] / "cgroup.kill", "1")
            except FileNotFoundError:
                return True
        while True:
            live = [p for p in self.procs() if _alive(p)]
            if not live:
                return True
            for pid in live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)

    def oom_killed(self) -> bool:
        """Whether the kernel OOM killer killed a process of this cgroup (v1 memory.oom_control oom_kill, or
        memory.failcnt on old kernels; v2 memory.events oom_kill)."""
        if self.version == 2:
            return (_read_counter(self.dirs[""] / "memory.events", "oom_kill") or 0) > 0
        mem = self.dirs.get("memory")
        if mem is None:
            return False
        count = _read_counter(mem / "memory.oom_control", "oom_kill")
        if count is not None:
            return count > 0
        try:
            return int((mem / "memory.failcnt").read_text()) > 0
        except (OSError, ValueError):
            return False

    def remove(self, timeout_s: float = 5.0) -> None:
        """Remove the leaf directories; kills what is left inside first. Idempotent; parents stay."""
        deadline = time.monotonic() + timeout_s
        for d in self.unique_dirs():
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    self.kill_all(max(0.0, deadline - time.monotonic()))
                    time.sleep(0.001)


def _alive(pid: int) -> bool:
    """False for gone processes and zombies (a zombie still lists in cgroup.procs on v1)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 : data.rindex(b")") + 3] != b"Z"


class Hierarchy:
    """The host's cgroup filesystem: detects v1 or v2 once and names container cgroups in it."""

    def __init__(self, root: Path = DEFAULT_ROOT, version: int | None = None) -> None:
        self.root = root
        self.version = version if version is not None else detect_version(root)
        self.v1_controllers: dict[str, Path] = {}
        if self.version == 1:
            for ctrl in V1_CONTROLLERS:
                d = root / ctrl
                if (d / "cgroup.procs").exists():
                    self.v1_controllers[ctrl] = d.resolve()

    def cgroup(self, parent: str, container_id: str) -> Cgroup:
        rel = Path(parent.strip("/")) / container_id
        if self.version == 2:
            return Cgroup(2, {"": self.root / rel})
        return Cgroup(1, {ctrl: base / rel for ctrl, base in self.v1_controllers.items()})

    def prepare_parent(self, parent: str) -> None:
        """v2 only (no-op on v1): create the parent and enable memory, cpu and pids in the subtree_control of
        the root and of every ancestor down to the parent, as far as the root offers them."""
        if self.version != 2:
            return
        try:
            available = set((self.root / "cgroup.controllers").read_text().split())
        except FileNotFoundError:
            available = set()
        wanted = [c for c in V2_CONTROLLERS if c in available]
        d = self.root
        for part in Path(parent.strip("/")).parts:
            self._enable(d, wanted)
            d = d / part
            d.mkdir(exist_ok=True)
        self._enable(d, wanted)

    @staticmethod
    def _enable(d: Path, wanted: list[str]) -> None:
        if not wanted:
            return
        try:
            enabled = set((d / "cgroup.subtree_control").read_text().split())
        except FileNotFoundError:
            enabled = set()
        missing = [c for c in wanted if c not in enabled]
        if missing:
            _write(d / "cgroup.subtree_control", " ".join("+" + c for c in missing))


def detect_version(root: Path = DEFAULT_ROOT) -> int:
    """2 if root is a cgroup2 mount (it has cgroup.controllers), else 1 (v1 or hybrid: controllers mounted
    at root/<controller>)."""
    return 2 if (root / "cgroup.controllers").exists() else 1
