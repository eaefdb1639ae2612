"""The on-disk state of the runtime, shared by the supervisor (writer of pid and exit files) and
LinuxExecutor (writer of config and writable layer). One place for the layout:

    <state-dir>/supervisor.sock       the supervisor's unix socket
    <state-dir>/supervisor.pid        its pid
    <state-dir>/supervisor.log        its stdout/stderr
    <state-dir>/containers/<id>/
        config.json                   ContainerConfig (written by create)
        upper/ work/                  overlayfs writable layer and its work dir (kept until remove)
        rootfs/                       mount point of the overlay, inside the container's mount ns only
        container.log                 CRI-format log; container.log.1 .. .N-1 its rotated older parts
        stdout.fifo stderr.fifo       the container's output, read by the supervisor (survive its restart)
        state.json                    {"pid", "started_at_ns", "pid_start_time"} while running
        exit.json                     {"pid", "exit_code", "started_at_ns", "finished_at_ns", "oom_killed",
                                       "signal"}
    <state-dir>/volumes/<name>/       named volumes (agent.runtime.volumes)

JSON files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.executor import ContainerConfig, ContainerInfo, ProcessState
from agent.runtime.mounts import Mount
from agent.runtime.security import Security, Ulimit


@dataclass(frozen=True)
class ContainerPaths:
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def work(self) -> Path:
        return self.dir / "work"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def log(self) -> Path:
        return self.dir / "container.log"

    @property
    def stdout_fifo(self) -> Path:
        return self.dir / "stdout.fifo"

    @property
    def stderr_fifo(self) -> Path:
        return self.dir / "stderr.fifo"

    def rotated_log(self, n: int) -> Path:
        """The n-th older part of the log (1: the most recent one)."""
        return self.dir / f"container.log.{n}"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def exit(self) -> Path:
        return self.dir / "exit.json"


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "supervisor.sock"

    @property
    def pid_file(self) -> Path:
        return self.root / "supervisor.pid"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    @property
    def containers(self) -> Path:
        return self.root / "containers"

    @property
    def volumes(self) -> Path:
        """Named volumes (agent.runtime.volumes)."""
        return self.root / "volumes"

    def container(self, container_id: str) -> ContainerPaths:
        if not container_id or "/" in container_id or container_id in (".", ".."):
            raise ValueError(f"invalid container id: {container_id!r}")
        return ContainerPaths(self.containers / container_id)

    def container_ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self.containers.iterdir() if (p / "config.json").exists())
        except FileNotFoundError:
            return []


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The parsed file, or None if it does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def config_to_json(c: ContainerConfig) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.name,
        "hostname": c.hostname,
        "layers": [str(p) for p in c.layers],
        "args": list(c.args),
        "env": list(c.env),
        "workdir": c.workdir,
        "memory_bytes": c.memory_bytes,
        "nano_cpus": c.nano_cpus,
        "pids_limit": c.pids_limit,
        "labels": dict(c.labels),
        "security": asdict(c.security),
        "memory_swap_bytes": c.memory_swap_bytes,
        "cpu_shares": c.cpu_shares,
        "cpuset_cpus": c.cpuset_cpus,
        "mounts": [asdict(m) for m in c.mounts],
        "log_max_size_bytes": c.log_max_size_bytes,
        "log_max_files": c.log_max_files,
        "netns": c.netns,
    }


def config_from_json(d: dict[str, Any]) -> ContainerConfig:
    return ContainerConfig(
        id=d["id"],
        name=d["name"],
        hostname=d["hostname"],
        layers=tuple(Path(p) for p in d["layers"]),
        args=tuple(d["args"]),
        env=tuple(d["env"]),
        workdir=d["workdir"],
        memory_bytes=d["memory_bytes"],
        nano_cpus=d["nano_cpus"],
        pids_limit=d["pids_limit"],
        labels=dict(d["labels"]),
        security=_security_from_json(d.get("security") or {}),
        memory_swap_bytes=d.get("memory_swap_bytes", 0),
        cpu_shares=d.get("cpu_shares", 0),
        cpuset_cpus=d.get("cpuset_cpus", ""),
        mounts=tuple(Mount(**m) for m in d.get("mounts", ())),
        log_max_size_bytes=d.get("log_max_size_bytes", 0),
        log_max_files=d.get("log_max_files", 1),
        netns=d.get("netns", ""),
    )


def _security_from_json(d: dict[str, Any]) -> Security:
    return Security(
        cap_add=tuple(d.get("cap_add", ())),
        cap_drop=tuple(d.get("cap_drop", ())),
        privileged=bool(d.get("privileged", False)),
        read_only=bool(d.get("read_only", False)),
        no_new_privs=bool(d.get("no_new_privs", True)),
        user=str(d.get("user", "")),
        ulimits=tuple(Ulimit(**u) for u in d.get("ulimits", ())),
    )


def info_to_json(i: ContainerInfo) -> dict[str, Any]:
    return {
        "id": i.id,
        "state": i.state.value,
        "pid": i.pid,
        "exit_code": i.exit_code,
        "started_at_ns": i.started_at_ns,
        "finished_at_ns": i.finished_at_ns,
        "oom_killed": i.oom_killed,
        "signal": i.signal,
        "paused": i.paused,
    }


def info_from_json(d: dict[str, Any]) -> ContainerInfo:
    return ContainerInfo(
        id=d["id"],
        state=ProcessState(d["state"]),
        pid=d["pid"],
        exit_code=d["exit_code"],
        started_at_ns=d["started_at_ns"],
        finished_at_ns=d["finished_at_ns"],
        oom_killed=d["oom_killed"],
        signal=d.get("signal", 0),
        paused=d.get("paused", False),
    )
