"""The scheduler's filters and choice, as pure functions."""

from __future__ import annotations

from berth.api import types_pb2 as t
from controller import scheduler
from controller.scheduler import Demand, HostView

GIB = 1 << 30


def host(name: str, *, ready: bool = True, mem: int = 4 * GIB, used_mem: int = 0, containers: int = 0) -> HostView:
    return HostView(name, name, ready, mem, 2_000_000_000, used_mem, 0, containers)


def test_fewest_containers_wins() -> None:
    hosts = [host("a", containers=3), host("b", containers=1), host("c", containers=2)]
    assert scheduler.place("x", Demand(0, 0), hosts).host == hosts[1]


def test_tie_break_is_stable_for_a_container_and_spreads_across_containers() -> None:
    hosts = [host("a"), host("b"), host("c")]
    first = scheduler.place("container-1", Demand(0, 0), hosts).host
    assert first == scheduler.place("container-1", Demand(0, 0), list(reversed(hosts))).host
    chosen = {scheduler.place(f"container-{i}", Demand(0, 0), hosts).host for i in range(30)}
    assert len(chosen) > 1


def test_reasons_are_counted_and_explained() -> None:
    hosts = [host("a", ready=False), host("b", used_mem=4 * GIB), host("c", mem=GIB)]
    decision = scheduler.place("x", Demand(2 * GIB, 0), hosts)
    assert decision.host is None
    assert decision.reason == "0/3 hosts: 2 insufficient memory, 1 not ready"


def test_cpu_filter() -> None:
    decision = scheduler.place("x", Demand(0, 3_000_000_000), [host("a")])
    assert decision.reason == "0/1 hosts: 1 insufficient cpu"


def test_no_hosts_says_what_to_do() -> None:
    assert "berthctl dev up" in scheduler.place("x", Demand(0, 0), []).reason


def test_with_container_accounts_for_the_placement() -> None:
    h = scheduler.with_container(host("a", mem=GIB), Demand(GIB, 0))
    assert (h.allocated_memory, h.containers) == (GIB, 1)
    assert scheduler.place("y", Demand(1, 0), [h]).reason == "0/1 hosts: 1 insufficient memory"


def test_demand_of_spec() -> None:
    assert Demand.of(t.ContainerSpec(memory_bytes=5, nano_cpus=7)) == Demand(5, 7)
