"""User networks end to end (issue 5) on a 3-host dev cluster of this module's own: `network
create|ls|inspect|rm` and their errors, containers of one network reaching each other across hosts (TCP and
UDP, by address), containers of two networks (and of the default network) never reaching each other on one
host or across hosts, and a network's links, addresses, routes, FDB entries and NAT rules made when needed
and gone when its last container goes, over 100 create/rm cycles and an agent restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.network.host import in_netns
from agent.network.usernet import Leases
from berthctl.dev.cluster import ClusterInfo, HostInfo
from tests.conftest import SLOT
from tests.e2e.test_network import (
    CIDR,
    WEB,
    Ctl,
    _cluster,
    berthctl_on,
    client_address,
    container,
    container_netns,
    host_state,
    ps,
    running,
    udp_exchange,
)
from tests.support import etcd_keys, kill_9_keeping_command, respawn, wait_for

BLUE_SUBNET = f"10.{150 + SLOT}.7.0/24"  # given with --subnet; red gets one of the controller's pool


@pytest.fixture(scope="module")
def unet(cluster_state_dir: Path) -> Iterator[ClusterInfo]:
    yield from _cluster("bunet", 3, 20, CIDR, cluster_state_dir)


@pytest.fixture
def ctl(unet: ClusterInfo) -> Iterator[Ctl]:
    with berthctl_on(unet) as run:
        yield run
    for name in run("network", "ls", "-q").stdout.split():
        if name not in ("bridge", "host", "none"):
            run("network", "rm", name)


def host(info: ClusterInfo, name: str) -> HostInfo:
    return next(h for h in info.hosts if h.name == name)


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr
    return out.stdout


def refused(out: subprocess.CompletedProcess[str], *words: str) -> None:
    """A one-line error naming the problem and what to do."""
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for w in words:
        assert w in lines[0], lines[0]


def networks(ctl: Ctl) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in json.loads(ok(ctl("network", "ls", "-o", "json")))}


def inspect_network(ctl: Ctl, name: str) -> dict[str, Any]:
    [doc] = json.loads(ok(ctl("network", "inspect", name)))
    result: dict[str, Any] = doc
    return result


def start(ctl: Ctl, name: str, network: str, node: str, *command: str) -> dict[str, Any]:
    args = ["run", "-d", "--name", name, "--constraint", f"node.name=={node}"]
    if network:
        args += ["--network", network]
    ok(ctl(*args, "busybox", *(command or ("sh", "-c", WEB))))
    return running(ctl, name)


def reaches(ctl: Ctl, client: str, address: str) -> str | None:
    """What the web server at `address` answers to container `client` (the client address it saw), None when
    no answer comes within 3 s."""
    return probe(ctl, client, [address])[address]


def probe(ctl: Ctl, client: str, addresses: list[str]) -> dict[str, str | None]:
    """reaches() for several servers at once, from one container (in parallel, so a blocked one costs 3 s once).
    busybox wget -T crashes, hence timeout(1)."""
    script = "".join(f"(echo {a} $(timeout 3 wget -qO- http://{a}/cgi-bin/ip || echo -)) & " for a in addresses)
    out = ctl("exec", client, "sh", "-c", script + "wait")
    assert out.returncode == 0, out.stderr
    seen = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    return {a: (None if seen[a] == "-" else client_address(seen[a])) for a in addresses}


def pings(ctl: Ctl, client: str, address: str) -> bool:
    return ctl("exec", client, "ping", "-c", "1", "-W", "2", address).returncode == 0


def link_addresses(h: HostInfo, ifname: str) -> list[str] | None:
    """The IPv4 addresses on a link of a test host, None when there is no such link."""
    from pyroute2 import IPRoute

    def read() -> list[str] | None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return None
            return sorted(f"{a.get('address')}/{a['prefixlen']}" for a in ipr.get_addr(index=found[0], family=2))

    result: list[str] | None = in_netns(Path("/var/run/netns") / h.netns, read)
    return result


def test_network_verbs_and_bad_input(unet: ClusterInfo, ctl: Ctl) -> None:
    red_id = ok(ctl("network", "create", "red")).strip()
    ok(ctl("network", "create", "--subnet", BLUE_SUBNET, "blue"))
    nets = networks(ctl)
    assert set(nets) == {"bridge", "host", "none", "red", "blue"}
    assert nets["red"]["id"] == red_id and nets["red"]["driver"] == "overlay"
    assert nets["blue"]["subnet"] == BLUE_SUBNET
    assert nets["bridge"]["subnet"] == CIDR
    assert nets["red"]["vni"] != nets["blue"]["vni"] and 1 not in (nets["red"]["vni"], nets["blue"]["vni"])
    table = ok(ctl("network", "ls"))
    assert table.splitlines()[0].split() == ["NETWORK", "ID", "NAME", "DRIVER", "SUBNET"]
    assert any(line.split()[1:] == ["blue", "overlay", BLUE_SUBNET] for line in table.splitlines())
    doc = inspect_network(ctl, red_id[:10])  # by id prefix too
    assert (doc["name"], doc["containers"], doc["gateways"]) == ("red", [], {})
    keys_before = etcd_keys(unet.etcd)

    # Each bad request: one line saying what to do, and nothing left behind.
    refused(ctl("network", "create", "--subnet", "10.1.2.3/24", "x"), "invalid --subnet", "give a CIDR")
    refused(ctl("network", "create", "--subnet", "banana", "x"), "invalid --subnet 'banana'")
    refused(ctl("network", "create", "--subnet", BLUE_SUBNET.replace(".0/24", ".128/25"), "x"),
            "overlaps network 'blue'", "choose another --subnet")
    refused(ctl("network", "create", "--subnet", CIDR.replace(".0.0/16", ".4.0/24"), "x"),
            "overlaps the cluster's container CIDR")
    refused(ctl("network", "create", "red"), "network 'red' already exists", "choose another name")
    refused(ctl("network", "create", "host"), "built in")
    refused(ctl("network", "create", "bad/name"), "invalid network name")
    refused(ctl("network", "inspect", "nosuch"), "no such network: nosuch", "network ls")
    refused(ctl("network", "rm", "nosuch"), "no such network: nosuch")
    refused(ctl("network", "rm", "bridge"), "built in and cannot be removed")
    refused(ctl("run", "-d", "--network", "nosuch", "busybox", "true"), "network 'nosuch' not found",
            "berthctl network create nosuch")
    refused(ctl("create", "--network", "nosuch", "busybox", "true"), "network 'nosuch' not found")
    assert ps(ctl) == []
    assert set(networks(ctl)) == {"bridge", "host", "none", "red", "blue"}
    assert etcd_keys(unet.etcd) == keys_before

    # In use (even by a stopped container): refused; once it is gone, removed with its address claims.
    start(ctl, "r1", "red", "host1", "sleep", "1000")
    ok(ctl("stop", "-t", "1", "r1"))
    refused(ctl("network", "rm", "red"), "network 'red' is in use by 1 container(s) or service(s) (r1)",
            "remove them first")
    assert any(k.startswith(f"/berth/network-ips/{red_id}/") for k in etcd_keys(unet.etcd))
    ok(ctl("rm", "r1"))
    assert ok(ctl("network", "rm", "red", "blue")).split() == ["red", "blue"]
    assert set(networks(ctl)) == {"bridge", "host", "none"}
    assert not [k for k in etcd_keys(unet.etcd) if k.startswith(("/berth/networks/", "/berth/network-"))]


def saved_gateway(h: HostInfo, network: str) -> str | None:
    """A host's gateway on a user network (by name or id) as its agent saved it, None while not there."""
    lease = Leases(Path(h.state_dir)).find(network)
    return lease.gateway if lease is not None else None


def test_one_network_across_hosts_tcp_udp_and_gateways(unet: ClusterInfo, ctl: Ctl) -> None:
    net_id = ok(ctl("network", "create", "red")).strip()
    srv = start(ctl, "srv", "red", "host1")
    peer = start(ctl, "peer", "red", "host2", "sleep", "1000")
    nets = networks(ctl)
    import ipaddress

    subnet = ipaddress.IPv4Network(nets["red"]["subnet"])
    assert ipaddress.IPv4Address(srv["ip_address"]) in subnet and ipaddress.IPv4Address(peer["ip_address"]) in subnet
    # TCP by address across hosts; no NAT on the way: the server sees the client container's own address.
    assert reaches(ctl, "peer", srv["ip_address"]) == peer["ip_address"]
    # UDP both ways.
    got, echoed = udp_exchange(container_netns(unet, srv), container_netns(unet, peer), srv["ip_address"])
    assert (got, echoed) == (f"hello-udp {peer['ip_address']}", "HELLO-UDP")
    # The attachment is in the container's status; each host has its own gateway on the network's bridge,
    # and the agent keeps it in its networks.json (agent.network.usernet.Leases, which the DNS server reads).
    [doc] = json.loads(ok(ctl("inspect", "srv")))
    assert (doc["status"]["network"], doc["State"]["network"]) == ("red", "red")
    net = inspect_network(ctl, "red")
    assert {c["name"]: (c["address"], c["node"]) for c in net["containers"]} == {
        "srv": (srv["ip_address"], "host1"), "peer": (peer["ip_address"], "host2")}
    assert sorted(net["gateways"]) == ["host1", "host2"]
    for name in ("host1", "host2"):
        h = host(unet, name)
        gw = net["gateways"][name]
        assert saved_gateway(h, "red") == gw == saved_gateway(h, net_id)
        assert link_addresses(h, "bn" + net_id[:12]) == [f"{gw}/{subnet.prefixlen}"]
    assert saved_gateway(host(unet, "host3"), "red") is None
    # Stopped, a container keeps its address but does not answer for it (it could be in use on another host
    # by the same container moved there); started again, it does.
    assert pings(ctl, "peer", srv["ip_address"])
    ok(ctl("stop", "-t", "1", "srv"))
    assert not pings(ctl, "peer", srv["ip_address"])
    ok(ctl("start", "srv"))
    assert running(ctl, "srv")["ip_address"] == srv["ip_address"]
    assert reaches(ctl, "peer", srv["ip_address"]) == peer["ip_address"]
    assert link_addresses(host(unet, "host3"), "bn" + net_id[:12]) is None  # not there until needed
    # The default network still works as before beside it.
    d1 = start(ctl, "d1", "", "host3")
    d2 = start(ctl, "d2", "", "host2", "sleep", "1000")
    assert reaches(ctl, "d2", d1["ip_address"]) == d2["ip_address"]


def test_a_service_on_a_user_network(unet: ClusterInfo, ctl: Ctl) -> None:
    ok(ctl("network", "create", "--subnet", BLUE_SUBNET, "blue"))
    refused(ctl("service", "create", "--name", "x", "--network", "nosuch", "busybox", "true"),
            "network 'nosuch' not found")
    try:
        ok(ctl("service", "create", "--name", "web", "--network", "blue", "--replicas", "2",
               "--constraint", "node.name!=host3", "busybox", "sh", "-c", WEB))
        tasks = [running(ctl, n) for n in sorted(x["name"] for x in ps(ctl))]
        assert len(tasks) == 2 and {x["network"] for x in tasks} == {"blue"}
        assert {x["node"] for x in tasks} == {"host1", "host2"}
        import ipaddress

        assert all(ipaddress.IPv4Address(x["ip_address"]) in ipaddress.IPv4Network(BLUE_SUBNET) for x in tasks)
        assert reaches(ctl, tasks[0]["name"], tasks[1]["ip_address"]) == tasks[0]["ip_address"]
        refused(ctl("network", "rm", "blue"), "service web", "remove them first")
    finally:
        ctl("service", "rm", "web")


def test_two_networks_cannot_reach_each_other(unet: ClusterInfo, ctl: Ctl) -> None:
    ok(ctl("network", "create", "red"))
    blue_id = ok(ctl("network", "create", "--subnet", BLUE_SUBNET, "blue")).strip()
    c = {
        "r1": start(ctl, "r1", "red", "host1"), "r2": start(ctl, "r2", "red", "host2"),
        "b1": start(ctl, "b1", "blue", "host1"), "b2": start(ctl, "b2", "blue", "host2"),
        "d1": start(ctl, "d1", "", "host1"), "r3": start(ctl, "r3", "red", "host3"),
    }
    ip = {name: x["ip_address"] for name, x in c.items()}
    # From each client, in one go: within its network (across hosts) it works, so that a failure is the
    # isolation and not the server; between networks never, on one host or across hosts, both directions,
    # and the default network (d1) neither.
    expect = {
        "r1": {"r3": "r1", "b1": None, "b2": None, "d1": None},
        "r2": {"r1": "r2", "b1": None},
        "b1": {"b2": "b1", "r1": None, "r2": None},
        "b2": {"r1": None},
        "d1": {"r1": None, "b2": None},
    }
    for client, servers in expect.items():
        got = probe(ctl, client, [ip[s] for s in servers])
        assert got == {ip[s]: (ip[who] if who else None) for s, who in servers.items()}, client
    # A host where blue is not present routes a red container's packets to blue's addresses to host2 (a
    # route added here, as a router of the hosts' network could); host2 delivers them to its own gateway on
    # blue but never into blue's bridge.
    h2, h3 = host(unet, "host2"), host(unet, "host3")
    gw2 = inspect_network(ctl, "blue")["gateways"]["host2"]
    assert link_addresses(h3, "bn" + blue_id[:12]) is None
    from pyroute2 import IPRoute

    def route(action: str) -> None:
        with IPRoute() as ipr:
            ipr.route(action, dst=BLUE_SUBNET, gateway=h2.address)

    in_netns(Path("/var/run/netns") / h3.netns, lambda: route("add"))
    try:
        assert pings(ctl, "r3", gw2)
        assert not pings(ctl, "r3", ip["b2"])
        assert reaches(ctl, "r3", ip["b2"]) is None
    finally:
        in_netns(Path("/var/run/netns") / h3.netns, lambda: route("del"))


def test_create_rm_cycles_on_a_user_network_leave_hosts_as_they_were(unet: ClusterInfo, ctl: Ctl) -> None:
    before = {h.name: host_state(h.netns) for h in unet.hosts}
    net_id = ok(ctl("network", "create", "cyc")).strip()
    bridge, vxlan = "bn" + net_id[:12], "bx" + net_id[:12]
    for batch in range(10):
        names = [f"u{batch}x{i}" for i in range(10)]
        runs = [subprocess.Popen([sys.executable, "-m", "berthctl", "run", "-d", "--name", n, "--network", "cyc",
                                  "-p", "80", "busybox", "sleep", "1000"], env={**os.environ,
                                 "BERTH_CONTROLLER": unet.controller}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n in names]
        for r in runs:
            _, err = r.communicate(timeout=120)
            assert r.returncode == 0, err
        if batch == 0:
            wait_for(lambda: all(x["state"] == "running" for x in ps(ctl)), timeout=60, what="10 running")
            for h in unet.hosts:
                during = host_state(h.netns)
                assert {bridge, vxlan} <= set(during["links"])
                assert f'oifname "{bridge}" iifname != "{bridge}" drop' in during["nft"]
                peers = {x.address for x in unet.hosts} - {h.address}
                zero = {n.split()[0] for n in _flood_entries(h, vxlan)}
                assert zero == peers
        ok(ctl("rm", "-f", *names))
    wait_for(lambda: {h.name: host_state(h.netns) for h in unet.hosts} == before, timeout=60,
             what="links, addresses, routes, FDB entries and NAT rules as before")
    for h in unet.hosts:
        ipam = json.loads((Path(h.state_dir) / "network" / "ipam.json").read_text())
        assert ipam["containers"] == {}
        assert json.loads((Path(h.state_dir) / "network" / "networks.json").read_text()) == {}
    ok(ctl("network", "rm", "cyc"))


def _flood_entries(h: HostInfo, vxlan: str) -> list[str]:
    """`<dst>` of each all-zeros FDB entry on a vxlan device of a test host."""
    import socket

    from pyroute2 import IPRoute

    def read() -> list[str]:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=vxlan)
            if not found:
                return []
            return [str(f.get("NDA_DST")) for f in ipr.get_neighbours(ifindex=found[0], family=socket.AF_BRIDGE)
                    if f.get("NDA_LLADDR") == "00:00:00:00:00:00" and f.get("ifindex") == found[0]]

    result: list[str] = in_netns(Path("/var/run/netns") / h.netns, read)
    return result


def test_agent_restart_neither_loses_nor_duplicates_a_user_network(unet: ClusterInfo, ctl: Ctl) -> None:
    ok(ctl("network", "create", "red"))
    srv = start(ctl, "srv", "red", "host1")
    start(ctl, "peer", "red", "host2", "sleep", "1000")
    server = host(unet, "host1")
    before = host_state(server.netns)
    pid = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_agent(p, server))
    cmdline, environ = kill_9_keeping_command(pid)
    respawn(cmdline, environ, str(server.log))

    def rejoined() -> bool:
        nodes = json.loads(ok(ctl("node", "ls", "-o", "json")))
        return any(n["name"] == server.name and n["state"] == "ready" for n in nodes)

    wait_for(rejoined, timeout=30, what="agent back")
    wait_for(lambda: host_state(server.netns) == before, timeout=15, what="host state as before the restart")
    assert reaches(ctl, "peer", srv["ip_address"]) == container(ctl, "peer")["ip_address"]
    assert container(ctl, "srv")["ip_address"] == srv["ip_address"]


def _is_agent(proc: Path, h: HostInfo) -> bool:
    try:
        cmd = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"agent" in cmd and h.state_dir.encode() in cmd
