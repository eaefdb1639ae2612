"""The scheduler's published-ports filter (issue 5), as pure functions."""

from __future__ import annotations

from berth.api import types_pb2 as t
from controller import scheduler
from controller.scheduler import Demand, HostView


def host(name: str, ports: frozenset[tuple[str, int]] = frozenset()) -> HostView:
    return HostView(name, name, True, 1 << 32, 2_000_000_000, ports=ports)


def spec(*ports: tuple[int, str]) -> t.ContainerSpec:
    return t.ContainerSpec(
        image="busybox", ports=[t.PortMapping(host_port=p, container_port=80, protocol=proto) for p, proto in ports]
    )


def test_host_port_taken_on_every_host_says_so() -> None:
    hosts = [host("a", frozenset({("tcp", 8080)})), host("b", frozenset({("tcp", 8080), ("udp", 53)}))]
    decision = scheduler.place("x", Demand.of(spec((8080, "tcp"))), hosts)
    assert decision.host is None
    assert decision.reason == "0/2 hosts: 2 port 8080 in use"


def test_free_host_is_chosen_and_protocols_are_apart() -> None:
    hosts = [host("a", frozenset({("tcp", 8080)})), host("b")]
    assert scheduler.place("x", Demand.of(spec((8080, "tcp"))), hosts).host == hosts[1]
    assert scheduler.place("x", Demand.of(spec((8080, "udp"))), hosts[:1]).host == hosts[0]


def test_a_chosen_port_and_no_port_never_clash() -> None:
    hosts = [host("a", frozenset({("tcp", 8080)}))]
    assert scheduler.place("x", Demand.of(spec((0, "tcp"))), hosts).host == hosts[0]
    assert scheduler.place("x", Demand.of(t.ContainerSpec(image="busybox")), hosts).host == hosts[0]


def test_placing_adds_the_ports_to_the_host() -> None:
    demand = Demand.of(spec((8080, ""), (9000, "udp")))
    assert demand.ports == frozenset({("tcp", 8080), ("udp", 9000)})
    after = scheduler.with_container(host("a"), demand)
    assert scheduler.ports_free(after, demand) == "port 8080 in use"
