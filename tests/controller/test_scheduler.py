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


# ---- issue 6: constraints, availability, binpack, sampling ------------------------------------------


def labelled(name: str, containers: int = 0, **labels: str) -> HostView:
    return HostView(name, name, True, 4 * GIB, 2_000_000_000, 0, 0, containers,
                    labels=tuple(sorted(labels.items())), platform="linux/amd64")


def test_constraints_on_labels_name_and_platform_filter_and_explain() -> None:
    hosts = [labelled("a", disk="hdd"), labelled("b", disk="ssd"), labelled("c")]
    demand = Demand(0, 0, (scheduler.Constraint.parse("node.labels.disk==ssd"),))
    assert scheduler.place("x", demand, hosts).host == hosts[1]
    parse = scheduler.Constraint.parse
    demand = Demand(0, 0, (parse("node.name!=b"), parse("node.labels.disk==ssd")))
    decision = scheduler.place("x", demand, hosts)
    assert decision.host is None
    assert decision.reason == "0/3 hosts: 2 not matching node.labels.disk==ssd, 1 not matching node.name!=b"
    demand = Demand(0, 0, (scheduler.Constraint.parse("node.platform==linux/arm64"),))
    assert scheduler.place("x", demand, hosts).reason == "0/3 hosts: 3 not matching node.platform==linux/arm64"


def test_bad_constraints_are_refused_with_the_syntax() -> None:
    for bad in ("disk==ssd", "node.labels.==x", "node.cpu==4", "node.name=x"):
        try:
            scheduler.Constraint.parse(bad)
        except ValueError as exc:
            assert "node.labels.KEY==VALUE" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_paused_or_drained_hosts_take_nothing_new() -> None:
    hosts = [HostView("a", "a", True, GIB, 10**9, schedulable=False), labelled("b", containers=5)]
    assert scheduler.place("x", Demand(0, 0), hosts).host == hosts[1]
    assert scheduler.place("x", Demand(0, 0), hosts[:1]).reason == "0/1 hosts: 1 paused or drained"


def test_binpack_fills_the_fullest_host_spread_the_emptiest() -> None:
    hosts = [labelled("a", containers=1), labelled("b", containers=4), labelled("c", containers=2)]
    assert scheduler.place("x", Demand(0, 0), hosts, strategy="binpack").host == hosts[1]
    assert scheduler.place("x", Demand(0, 0), hosts).host == hosts[0]


def test_sampling_looks_at_few_hosts_but_still_explains_over_all() -> None:
    hosts = [labelled(f"h{i}", containers=i) for i in range(1000)]
    chosen = {scheduler.place(f"c{i}", Demand(0, 0), hosts, sample=10).host for i in range(50)}
    assert len(chosen) > 10, "different containers start from different offsets"
    assert all(h is not None and h.containers < 1000 for h in chosen)
    demand = Demand(0, 0, (scheduler.Constraint.parse("node.labels.x==y"),))
    assert scheduler.place("c", demand, hosts, sample=10).reason == "0/1000 hosts: 1000 not matching node.labels.x==y"


def test_only_containers_with_a_restart_policy_and_no_named_volume_move() -> None:
    from controller.orchestrator import movable

    assert movable(t.ContainerSpec(restart_policy="always", volumes=["/srv/data:/data"]))
    assert not movable(t.ContainerSpec(restart_policy="always", volumes=["pgdata:/var/lib/pg"]))
    assert not movable(t.ContainerSpec(restart_policy="no"))
    assert not movable(t.ContainerSpec())


def test_a_container_or_service_may_choose_its_own_strategy_over_the_clusters() -> None:
    from typing import Any, cast

    from controller.metrics import ControllerMetrics
    from controller.orchestrator import Orchestrator

    o = Orchestrator(cast(Any, None), ControllerMetrics())
    hosts = [labelled("a", containers=1), labelled("b", containers=4)]
    spread = t.Container(id="x", spec=t.ContainerSpec(image="busybox"))
    packed = t.Container(id="x", spec=t.ContainerSpec(image="busybox", placement_strategy="binpack"))
    assert o.decide(spread, hosts).host == hosts[0]
    assert o.decide(packed, hosts).host == hosts[1]
    o.strategy = "binpack"
    assert o.decide(spread, hosts).host == hosts[1]
    assert o.decide(t.Container(id="x", spec=t.ContainerSpec(placement_strategy="spread")), hosts).host == hosts[0]


def test_host_view_of_a_node_operator_labels_win_and_drained_is_unschedulable() -> None:
    n = t.Node(id="n1", name="h1", platform="linux/amd64", availability=t.AVAILABILITY_DRAIN,
               capacity=t.Resources(memory_bytes=GIB, nano_cpus=10**9),
               labels={"disk": "hdd", "rack": "r1"}, user_labels={"disk": "ssd"})
    view = scheduler.host_view(n, True, (GIB // 2, 10**8, 3), frozenset({("tcp", 80)}))
    assert view == HostView("n1", "h1", True, GIB, 10**9, GIB // 2, 10**8, 3,
                            labels=(("disk", "ssd"), ("rack", "r1")), platform="linux/amd64",
                            schedulable=False, ports=frozenset({("tcp", 80)}))
