"""The container runtime seen from the agent: a small interface (swarmkit's exec.Controller, Nomad's
driver) with the real Linux implementation in agent.runtime and, for scale tests only, a hollow one.

The worker (agent.worker) drives an Executor; nothing else in the agent touches namespaces or cgroups.

Exceptions:

    ExecutorError                 base of every runtime failure
     +-- ContainerNotFound        no such container on this host
     +-- StartError               the container could not start; message is for the user
                                  (e.g. "executable file not found in $PATH: foo")
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.runtime.mounts import Mount
from agent.runtime.security import Security


class ExecutorError(Exception):
    """Base of every runtime failure."""


class ContainerNotFound(ExecutorError):
    """No such container on this host."""


class StartError(ExecutorError):
    """The container could not start; the message says why, in words meant for a user."""


@dataclass(frozen=True)
class ContainerConfig:
    """Everything the runtime needs to create one container; built by the worker from the spec and the
    image."""

    id: str
    name: str
    hostname: str
    # Unpacked image layers, lowest first (the base layer is layers[0]).
    layers: tuple[Path, ...]
    # The full argv: entrypoint + cmd, already resolved against the image.
    args: tuple[str, ...]
    env: tuple[str, ...] = ()  # "K=V"
    workdir: str = "/"
    memory_bytes: int = 0  # 0: no limit
    nano_cpus: int = 0  # 0: no limit
    pids_limit: int = 0  # 0: no limit
    labels: dict[str, str] = field(default_factory=dict)
    # issue 3b: privileges, more cgroup limits, mounts (agent.runtime.security, .cgroups, .mounts).
    security: Security = field(default_factory=Security)
    memory_swap_bytes: int = 0  # memory + swap; 0: twice memory_bytes (Docker); -1: unlimited swap
    cpu_shares: int = 0  # 0: the kernel's default weight
    cpuset_cpus: str = ""  # "": every CPU
    mounts: tuple[Mount, ...] = ()
    # issue 3a: size-capped log rotation by the supervisor; 0: no cap. max_files counts the current file.
    log_max_size_bytes: int = 0
    log_max_files: int = 1
    # The network namespace (issue 5): "" a new one with only lo; "host" the host's own; else the path of a
    # namespace the agent has set up (agent.network) that the container joins instead of making its own.
    netns: str = ""


class ProcessState(enum.Enum):
    CREATED = "created"  # writable layer exists, no process
    RUNNING = "running"
    EXITED = "exited"


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    state: ProcessState
    pid: int = 0
    exit_code: int = 0
    started_at_ns: int = 0
    finished_at_ns: int = 0
    oom_killed: bool = False
    signal: int = 0  # issue 3a: the signal that ended the process (0: it exited by itself)
    paused: bool = False  # issue 3a: running, with its cgroup frozen


class Executor(Protocol):
    """What the worker needs from a runtime. Every method is idempotent."""

    async def create(self, config: ContainerConfig) -> None:
        """Prepare the container: state dir, writable layer. Keeps an existing writable layer."""

    async def start(self, container_id: str) -> ContainerInfo:
        """Start the container's process; returns once it has exec'd, or raises StartError."""

    async def stop(self, container_id: str, timeout_s: float) -> ContainerInfo:
        """SIGTERM, then SIGKILL after timeout_s; returns once the process is gone."""

    async def remove(self, container_id: str) -> None:
        """Kill if running, then delete the writable layer, cgroup and state. No-op if absent."""

    async def list(self) -> list[ContainerInfo]:
        """Every container this host has, running or not."""

    def exits(self) -> AsyncIterator[ContainerInfo]:
        """Each container exit, as it happens (also those seen after an agent restart)."""
        ...

    def log_path(self, container_id: str) -> Path:
        """The container's log: CRI format lines `<RFC3339Nano> <stdout|stderr> <F|P> <text>`."""
        ...
