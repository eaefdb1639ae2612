"""Placement decisions as pure functions over a snapshot of the cluster.

A container goes through a pipeline of filters, cheapest first. Each filter says whether a host fits and,
when it does not, why; the reasons are counted so that a container that cannot be placed says so in words
("0/3 hosts: 2 insufficient memory, 1 not ready"). Among the hosts that pass, the one with the fewest
containers wins (spread, the default) or the fullest one (binpack); ties are broken by a hash of the container
id, so a decision can be replayed. With `sample`, only that many fitting hosts are looked at, from an offset
given by the container id (Nomad's limit iterator), which keeps a decision cheap on a thousand hosts.

A decision is on the controller's hot path (every Run, session 6): with the default filters the hosts are
checked in one pass without a call per filter, the reasons are counted only when no host fits (a second pass
over the same hosts, so the words are the same), and the hash that breaks ties is computed only for the hosts
that tie; a host's view and a demand are named tuples (cheap to build: one per placement).

Nothing here does I/O: controller.orchestrator reads the snapshot, calls `place` and commits the decision
in one etcd transaction.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from berth.api import types_pb2 as t

NO_PORTS: frozenset[tuple[str, int]] = frozenset()


class HostView(NamedTuple):
    """What the scheduler knows of one host (immutable; a named tuple rather than a frozen dataclass, as one is
    built for every placement: session 6)."""

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
    ports: frozenset[tuple[str, int]] = NO_PORTS


@dataclass(frozen=True)
class Constraint:
    """`node.labels.disk==ssd`, `node.name!=host1`, `node.platform==linux/amd64`."""

    field: str  # name, id, platform, or labels.<key>
    equal: bool
    value: str

    @staticmethod
    @functools.lru_cache(maxsize=1024)  # a spec's constraints are parsed for each of its containers (immutable)
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


class Demand(NamedTuple):
    """What one container asks of a host (immutable)."""

    memory_bytes: int
    nano_cpus: int
    constraints: tuple[Constraint, ...] = ()
    ports: frozenset[tuple[str, int]] = NO_PORTS  # issue 5: fixed host ports asked for

    @staticmethod
    def of(spec: t.ContainerSpec) -> Demand:
        """Raises ValueError for a constraint that does not parse."""
        constraints = spec.constraints
        return Demand(spec.memory_bytes, spec.nano_cpus,
                      tuple(Constraint.parse(c) for c in constraints) if constraints else (),
                      host_ports(spec) if spec.ports else NO_PORTS)


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


class Decision(NamedTuple):
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
    n = len(hosts)
    start = int.from_bytes(hashlib.blake2s(container_id.encode(), digest_size=4).digest()) % n if sample and n else 0
    chain = FILTERS if filters is FILTERS else tuple(filters)
    if chain is FILTERS:
        fits = _fitting(demand, hosts, start, sample)
    else:
        fits = []
        for i in range(n):
            host = hosts[(start + i) % n]
            if all(check(host, demand) is None for check in chain):
                fits.append(host)
                if sample and len(fits) >= sample:
                    break
    if not fits:  # every host was looked at: say why each does not fit
        return Decision(None, explain(n, _rejections(demand, hosts, chain)))
    return Decision(_best(container_id, fits, strategy), "")


def _fitting(demand: Demand, hosts: Sequence[HostView], start: int, sample: int) -> list[HostView]:
    """The hosts that pass every one of FILTERS (the same answers, in one pass and no call per filter), visited
    from `start` round the list, at most `sample` of them (0: all)."""
    memory, cpus, wanted, ports = demand
    fits: list[HostView] = []
    n = len(hosts)
    i = start
    for _ in range(n):
        host = hosts[i]
        i += 1
        if i == n:
            i = 0
        _, _, ready, capacity, ncpus, used_memory, used_cpus, _, _, _, free, taken = host
        if not (ready and free):
            continue
        if memory and used_memory + memory > capacity:
            continue
        if cpus and used_cpus + cpus > ncpus:
            continue
        if wanted and not all(c.holds(host) for c in wanted):
            continue
        if ports and not ports.isdisjoint(taken):
            continue
        fits.append(host)
        if len(fits) == sample:
            break
    return fits


def _rejections(demand: Demand, hosts: Sequence[HostView], chain: Sequence[Filter]) -> Counter[str]:
    """Why each host does not fit: the first filter of the chain that refuses it, counted."""
    rejections: Counter[str] = Counter()
    for host in hosts:
        for check in chain:
            why = check(host, demand)
            if why is not None:
                rejections[why] += 1
                break
    return rejections


def _best(container_id: str, fits: list[HostView], strategy: str) -> HostView:
    """The fewest containers (then the least memory placed) for spread, the most for binpack; among hosts that
    tie, the lowest hash of the container and host ids (the first of those in `fits` when hashes tie)."""
    if len(fits) == 1:
        return fits[0]
    if strategy == "binpack":
        keys = [(-h.containers, -h.allocated_memory) for h in fits]
    else:
        keys = [(h.containers, h.allocated_memory) for h in fits]
    low = min(keys)
    tied = [h for h, key in zip(fits, keys, strict=True) if key == low]
    if len(tied) == 1:
        return tied[0]
    return min(tied, key=lambda h: hashlib.blake2s((container_id + h.id).encode(), digest_size=8).digest())


def with_container(host: HostView, demand: Demand) -> HostView:
    """The host after one more container of this demand was placed on it."""
    return HostView(
        host.id, host.name, host.ready, host.memory_bytes, host.nano_cpus,
        host.allocated_memory + demand.memory_bytes, host.allocated_cpus + demand.nano_cpus,
        host.containers + 1, host.labels, host.platform, host.schedulable,
        host.ports | demand.ports if demand.ports else host.ports,
    )
