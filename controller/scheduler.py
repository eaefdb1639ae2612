"""Placement decisions as pure functions over a snapshot of the cluster.

A container goes through a pipeline of filters, cheapest first. Each filter says whether a host fits and,
when it does not, why; the reasons are counted so that a container that cannot be placed says so in words
("0/3 hosts: 2 insufficient memory, 1 not ready"). Among the hosts that pass, the one with the fewest
containers wins (spread, the default) or the fullest one (binpack); ties are broken by a hash of the container
id, so a decision can be replayed. With `sample`, only that many fitting hosts are looked at, from an offset
given by the container id (Nomad's limit iterator), which keeps a decision cheap on a thousand hosts.

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
    # issue 6: what constraints and availability look at
    labels: tuple[tuple[str, str], ...] = ()
    platform: str = ""
    schedulable: bool = True  # availability active (not paused or drained)
    # issue 5: (protocol, host port) published by containers placed on the host.
    ports: frozenset[tuple[str, int]] = frozenset()


@dataclass(frozen=True)
class Constraint:
    """`node.labels.disk==ssd`, `node.name!=host1`, `node.platform==linux/amd64`."""

    field: str  # name, id, platform, or labels.<key>
    equal: bool
    value: str

    @staticmethod
    def parse(text: str) -> Constraint:
        for op, equal in (("==", True), ("!=", False)):
            if op in text:
                left, value = (part.strip() for part in text.split(op, 1))
                if left.startswith("node."):
                    name = left[len("node."):]
                    if name in ("name", "id", "platform", "platform.os", "platform.arch") or (  # .os/.arch: issue 6
                            name.startswith("labels.") and len(name) > 7):
                        return Constraint(name, equal, value)
                break
        raise ValueError(
            f"bad constraint {text!r}: use node.labels.KEY==VALUE, node.name==NAME, node.platform==OS/ARCH, "
            "node.platform.os==OS or node.platform.arch==ARCH "
            "(or != )"
        )

    def holds(self, host: HostView) -> bool:
        if self.field in ("name", "id"):
            actual: str | None = host.name if self.field == "name" else host.id
        elif self.field == "platform":
            actual = host.platform
        elif self.field in ("platform.os", "platform.arch"):  # issue 6: Swarm's node.platform.os/arch
            os_, _, arch = host.platform.partition("/")
            actual = os_ if self.field == "platform.os" else arch
        else:
            actual = dict(host.labels).get(self.field[len("labels."):])
        return (actual == self.value) == self.equal

    def __str__(self) -> str:
        return f"node.{self.field}{'==' if self.equal else '!='}{self.value}"


@dataclass(frozen=True)
class Demand:
    memory_bytes: int
    nano_cpus: int
    constraints: tuple[Constraint, ...] = ()
    ports: frozenset[tuple[str, int]] = frozenset()  # issue 5: fixed host ports asked for

    @staticmethod
    def of(spec: t.ContainerSpec) -> Demand:
        return Demand(spec.memory_bytes, spec.nano_cpus, tuple(Constraint.parse(c) for c in spec.constraints),
                      host_ports(spec))


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


def schedulable(host: HostView, _: Demand) -> str | None:
    return None if host.schedulable else "paused or drained"


def constraints(host: HostView, demand: Demand) -> str | None:
    for c in demand.constraints:
        if not c.holds(host):
            return f"not matching {c}"
    return None


FILTERS: tuple[Filter, ...] = (host_ready, schedulable, constraints, enough_memory, enough_cpu)

STRATEGIES = ("spread", "binpack")


def host_view(n: t.Node, ready: bool, used: Sequence[int], ports: frozenset[tuple[str, int]]) -> HostView:
    """The scheduler's view of a stored node: `used` is (memory, CPUs, containers) placed on it; operator labels
    win over the agent's. The one place both controller.orchestrator and controller.cache build it from a node
    (the cache then puts a container's coming or going into the view it holds: ClusterCache._usage_changed)."""
    return HostView(
        n.id, n.name, ready, n.capacity.memory_bytes, n.capacity.nano_cpus, used[0], used[1], used[2],
        labels=tuple(sorted({**n.labels, **n.user_labels}.items())), platform=n.platform,
        schedulable=n.availability == t.AVAILABILITY_ACTIVE, ports=ports,
    )


def host_ports(spec: t.ContainerSpec) -> frozenset[tuple[str, int]]:
    """(protocol, host port) of the spec's -p flags with a fixed host port (issue 5)."""
    return frozenset((p.protocol or "tcp", p.host_port) for p in spec.ports if p.host_port)


def ports_free(host: HostView, demand: Demand) -> str | None:
    """issue 5: a host port can be published by one container per host only."""
    taken = sorted(demand.ports & host.ports)
    if taken:
        return f"port {taken[0][1]} in use"
    return None


FILTERS += (ports_free,)


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
          filters: Iterable[Filter] = FILTERS, *, strategy: str = "spread", sample: int = 0) -> Decision:
    """Choose a host for one container, or say why none fits. With sample > 0, stop after that many
    fitting hosts, visited from an offset that the container id gives."""
    chain = tuple(filters)
    fits: list[HostView] = []
    rejections: Counter[str] = Counter()
    n = len(hosts)
    start = int.from_bytes(hashlib.blake2s(container_id.encode(), digest_size=4).digest()) % n if sample and n else 0
    for i in range(n):
        host = hosts[(start + i) % n]
        for check in chain:
            why = check(host, demand)
            if why is not None:
                rejections[why] += 1
                break
        else:
            fits.append(host)
            if sample and len(fits) >= sample:
                break
    if not fits:
        return Decision(None, explain(len(hosts), rejections))

    sign = -1 if strategy == "binpack" else 1

    def score(host: HostView) -> tuple[int, int, bytes]:
        return (sign * host.containers, sign * host.allocated_memory,
                hashlib.blake2s((container_id + host.id).encode(), digest_size=8).digest())

    return Decision(min(fits, key=score), "")


def with_container(host: HostView, demand: Demand) -> HostView:
    """The host after one more container of this demand was placed on it."""
    return HostView(
        host.id, host.name, host.ready, host.memory_bytes, host.nano_cpus,
        host.allocated_memory + demand.memory_bytes, host.allocated_cpus + demand.nano_cpus,
        host.containers + 1, host.labels, host.platform, host.schedulable, host.ports | demand.ports,
    )
