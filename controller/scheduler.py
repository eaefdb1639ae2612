"""Placement decisions as pure functions over a snapshot of the cluster.

A container goes through a pipeline of filters, cheapest first. Each filter says whether a host fits and,
when it does not, why; the reasons are counted so that a container that cannot be placed says so in words
("0/3 hosts: 2 insufficient memory, 1 not ready"). Among the hosts that pass, the one with the fewest
containers wins (spread); ties are broken by a hash of the container id, so a decision can be replayed.

Nothing here does I/O: controller.orchestrator reads the snapshot, calls `place` and commits the decision
in one etcd transaction.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from berth.api import types_pb2 as t


@dataclass(frozen=True)
class HostView:
    """What the scheduler knows of one host."""

    id: str
    name: str
    ready: bool
    memory_bytes: int
    nano_cpus: int
    allocated_memory: int = 0
    allocated_cpus: int = 0
    containers: int = 0


@dataclass(frozen=True)
class Demand:
    memory_bytes: int
    nano_cpus: int

    @staticmethod
    def of(spec: t.ContainerSpec) -> Demand:
        return Demand(spec.memory_bytes, spec.nano_cpus)


# A filter returns None when the host fits, else the reason it does not (counted across hosts).
Filter = Callable[[HostView, Demand], str | None]


def host_ready(host: HostView, _: Demand) -> str | None:
    return None if host.ready else "not ready"


def enough_memory(host: HostView, demand: Demand) -> str | None:
    if demand.memory_bytes and host.allocated_memory + demand.memory_bytes > host.memory_bytes:
        return "insufficient memory"
    return None


def enough_cpu(host: HostView, demand: Demand) -> str | None:
    if demand.nano_cpus and host.allocated_cpus + demand.nano_cpus > host.nano_cpus:
        return "insufficient cpu"
    return None


FILTERS: tuple[Filter, ...] = (host_ready, enough_memory, enough_cpu)


@dataclass(frozen=True)
class Decision:
    host: HostView | None
    reason: str  # empty when placed


def explain(total: int, rejections: Counter[str]) -> str:
    """`0/3 hosts: 2 insufficient memory, 1 not ready`."""
    if total == 0:
        return "no hosts: start an agent (berth-agent) or a dev cluster (berthctl dev up)"
    parts = ", ".join(f"{n} {why}" for why, n in sorted(rejections.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"0/{total} hosts: {parts}"


def place(container_id: str, demand: Demand, hosts: Sequence[HostView],
          filters: Iterable[Filter] = FILTERS) -> Decision:
    """Choose a host for one container, or say why none fits."""
    chain = tuple(filters)
    fits: list[HostView] = []
    rejections: Counter[str] = Counter()
    for host in hosts:
        for check in chain:
            why = check(host, demand)
            if why is not None:
                rejections[why] += 1
                break
        else:
            fits.append(host)
    if not fits:
        return Decision(None, explain(len(hosts), rejections))

    def score(host: HostView) -> tuple[int, bytes]:
        return host.containers, hashlib.blake2s((container_id + host.id).encode(), digest_size=8).digest()

    return Decision(min(fits, key=score), "")


def with_container(host: HostView, demand: Demand) -> HostView:
    """The host after one more container of this demand was placed on it."""
    return HostView(
        host.id, host.name, host.ready, host.memory_bytes, host.nano_cpus,
        host.allocated_memory + demand.memory_bytes, host.allocated_cpus + demand.nano_cpus,
        host.containers + 1,
    )
