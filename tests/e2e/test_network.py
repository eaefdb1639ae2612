"""Container networking end to end (issue 5) on dev clusters of this module's own: host subnets, published
ports reached from another host with the client's address kept, outbound masquerade, the scheduler's port
filter, cleanliness over create/rm cycles and an agent restart.

Clients run in the test hosts' network namespaces; traffic stays on the clusters' own addresses.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.network.host import in_netns, netns_dir
from berthctl.dev import cluster as dev_cluster
from berthctl.dev.cluster import ClusterInfo, HostInfo
from tests.conftest import SLOT, exclusive, run_berthctl, slot_name, slot_subnet
from tests.e2e.test_spine import wait_for

# Container CIDRs of this checkout's slot: 10.(88+2*SLOT).0.0/16 and the next /16.
CIDR = f"10.{88 + 2 * SLOT}.0.0/16"
CIDR_1HOST = f"10.{89 + 2 * SLOT}.0.0/16"

# busybox httpd with a CGI that answers the client's address as the server sees it.
WEB = (
    'mkdir -p /www/cgi-bin; printf "#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho \\$REMOTE_ADDR\\n" '
    "> /www/cgi-bin/ip; chmod +x /www/cgi-bin/ip; exec httpd -f -p 80 -h /www"
)

Ctl = Callable[..., "subprocess.CompletedProcess[str]"]


def _cluster(base: str, hosts: int, third: int, cidr: str, state: Path) -> Iterator[ClusterInfo]:
    name = slot_name(base)
    with exclusive(name):
        dev_cluster.down(name, state)
        info = dev_cluster.up(name, hosts, slot_subnet(f"10.77.{third}.0/24"), state, write_config=False,
                              container_cidr=cidr)
        try:
            yield info
        finally:
            dev_cluster.down(name, state)


@pytest.fixture(scope="module")
def net3(cluster_state_dir: Path) -> Iterator[ClusterInfo]:
    yield from _cluster("bnet", 3, 61, CIDR, cluster_state_dir)


@contextmanager
def berthctl_on(info: ClusterInfo) -> Iterator[Ctl]:
    """berthctl against the cluster's controller, for a test's ctl fixture; on leaving, every container of the
    cluster is removed, so that the next test on the module's cluster starts from none."""
    def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return run_berthctl(info.controller, *args, timeout=timeout)

    yield run
    ids = run("ps", "-a", "-q").stdout.split()
    if ids:
        run("rm", "-f", *ids)


@pytest.fixture
def ctl(net3: ClusterInfo) -> Iterator[Ctl]:
    with berthctl_on(net3) as run:
        yield run


def ps(ctl: Ctl) -> list[dict[str, Any]]:
    out = ctl("ps", "-a", "-o", "json")
    assert out.returncode == 0, out.stderr
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


def container(ctl: Ctl, name: str) -> dict[str, Any]:
    return next(c for c in ps(ctl) if c["name"] == name)


def running(ctl: Ctl, name: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        c = container(ctl, name)
        assert c["state"] not in ("failed", "exited"), c
        return c if c["state"] == "running" and c["ip_address"] else None

    result: dict[str, Any] = wait_for(ready, timeout=30, what=f"{name} running")
    return result


def host(info: ClusterInfo, name: str) -> HostInfo:
    return next(h for h in info.hosts if h.name == name)


def http_get(netns: str, url: str) -> str:
    """GET url from inside test host `netns` (a child process: setns moves the whole single-threaded child)."""
    code = (
        "import sys, urllib.request\n"
        "from pyroute2 import netns\n"
        "netns.setns(sys.argv[1], flags=0)\n"
        "print(urllib.request.urlopen(sys.argv[2], timeout=5).read().decode().strip())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, netns, url], capture_output=True, text=True, timeout=30,
                         check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def client_address(text: str) -> str:
    """busybox httpd writes REMOTE_ADDR as [::ffff:a.b.c.d]."""
    return text.strip("[]").removeprefix("::ffff:")


def host_state(netns: str) -> dict[str, Any]:
    """The host namespace's links, addresses, routes and NAT rules, as comparable values."""
    from pyroute2 import IPRoute

    def read() -> dict[str, Any]:
        with IPRoute() as ipr:
            links = sorted(str(link.get("ifname")) for link in ipr.get_links())
            addrs = sorted(f"{a.get('address')}/{a['prefixlen']}" for a in ipr.get_addr())
            routes = sorted(
                f"{r.get('dst')}/{r['dst_len']} via {r.get('gateway')} oif {r.get('oif')}"
                for r in ipr.get_routes(family=2)
            )
            neigh = sorted(f"{n.get('NDA_DST')} {n.get('NDA_LLADDR')} {n['ifindex']} {n['family']}"
                           for family in (socket.AF_INET, socket.AF_BRIDGE)
                           for n in ipr.get_neighbours(family=family) if n.get("state", 0) & 0x80)  # permanent
        return {"links": links, "addrs": addrs, "routes": routes, "neighbours": neigh}

    state = in_netns(Path("/var/run/netns") / netns, read)
    nft = subprocess.run(["nsenter", f"--net=/var/run/netns/{netns}", "nft", "list", "ruleset"],
                         capture_output=True, text=True, check=True)
    state["nft"] = nft.stdout
    return state


def test_hosts_get_disjoint_subnets_kept_across_restarts(net3: ClusterInfo, ctl: Ctl) -> None:
    nodes = json.loads(ctl("node", "ls", "-o", "json").stdout)
    etcd = subprocess.run(
        ["etcdctl", f"--endpoints={net3.etcd}", "get", "--prefix", "/berth/subnets/"],
        capture_output=True, text=True, check=True, env={**os.environ, "ETCDCTL_API": "3"},
    ).stdout.split()
    claims = dict(zip(etcd[1::2], [k.rsplit("/", 1)[1].replace("_", "/") for k in etcd[0::2]], strict=True))
    assert sorted(claims) == sorted(n["name"] for n in nodes)
    nets = [ipaddress.IPv4Network(s) for s in claims.values()]
    assert all(n.subnet_of(ipaddress.IPv4Network(CIDR)) for n in nets)
    assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])


def test_published_port_from_another_host_keeps_client_address(net3: ClusterInfo, ctl: Ctl) -> None:
    out = ctl("run", "-d", "--name", "web", "-p", "8080:80", "busybox", "sh", "-c", WEB)
    assert out.returncode == 0, out.stderr
    web = running(ctl, "web")
    assert web["ports"] == ["0.0.0.0:8080->80/tcp"]
    server = host(net3, web["node"])
    client = next(h for h in net3.hosts if h.name != web["node"])
    assert ctl("port", "web").stdout == "80/tcp -> 0.0.0.0:8080\n"
    # From another host: the server sees that host's own address (DNAT only, no proxy, no SNAT).
    seen = http_get(client.netns, f"http://{server.address}:8080/cgi-bin/ip")
    assert client_address(seen) == client.address
    # From the server's host itself, at its own address.
    seen = http_get(server.netns, f"http://{server.address}:8080/cgi-bin/ip")
    assert client_address(seen) == server.address
    # A container's address is in its host's subnet.
    nodes = {n["name"]: n for n in json.loads(ctl("node", "ls", "-o", "json").stdout)}
    assert nodes[web["node"]]["name"] == web["node"]
    assert ipaddress.IPv4Address(web["ip_address"]) in ipaddress.IPv4Network(CIDR)


def test_outbound_is_masqueraded_and_free_port_is_chosen(net3: ClusterInfo, ctl: Ctl) -> None:
    assert ctl("run", "-d", "--name", "web", "-p", "80", "busybox", "sh", "-c", WEB).returncode == 0
    web = running(ctl, "web")
    [mapping] = web["ports"]
    host_port = int(mapping.split("->")[0].rsplit(":", 1)[1])
    assert 32768 <= host_port <= 60999
    assert ctl("port", "web").stdout == f"80/tcp -> 0.0.0.0:{host_port}\n"
    server = host(net3, web["node"])
    # A container reaches the published port; the server sees the client's host address (masqueraded on
    # the way out), or the bridge's when both are on one host (hairpin NAT).
    for i in range(3):
        out = ctl("run", "-d", "--name", f"client{i}", "busybox", "sh", "-c",
                  f"wget -qO- http://{server.address}:{host_port}/cgi-bin/ip")
        assert out.returncode == 0, out.stderr
    for i in range(3):
        c = wait_for(lambda i=i: (c := container(ctl, f"client{i}"))["state"] == "exited" and c,  # type: ignore[misc]
                     timeout=30, what="client to finish")
        assert c["exit_code"] == 0, ctl("logs", f"client{i}").stderr
        seen = client_address(ctl("logs", f"client{i}").stdout.strip())
        gateway = str(ipaddress.IPv4Network(f"{web['ip_address']}/24", strict=False)[1])
        assert seen == (gateway if c["node"] == web["node"] else host(net3, c["node"]).address)


def test_none_and_host_networks(net3: ClusterInfo, ctl: Ctl) -> None:
    out = ctl("run", "--rm", "--network", "none", "busybox", "sh", "-c", "ls /sys/class/net")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["lo"]
    out = ctl("run", "--rm", "--network", "host", "busybox", "sh", "-c", "ls /sys/class/net")
    assert out.returncode == 0, out.stderr
    assert "berth0" in out.stdout.split() and "eth0" in out.stdout.split()
    out = ctl("run", "--rm", "busybox", "sh", "-c", "ls /sys/class/net")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["eth0", "lo"]
    bad = ctl("run", "--rm", "--network", "host", "-p", "80", "busybox", "true")
    assert bad.returncode != 0 and "-p needs the bridge network" in bad.stderr


def test_create_rm_cycles_leave_hosts_as_they_were(net3: ClusterInfo, ctl: Ctl) -> None:
    before = {h.name: host_state(h.netns) for h in net3.hosts}
    for batch in range(10):
        names = [f"c{batch}x{i}" for i in range(10)]
        for n in names:
            out = ctl("run", "-d", "--name", n, "-p", "80", "busybox", "sleep", "1000")
            assert out.returncode == 0, out.stderr
        if batch == 0:
            wait_for(lambda: all(c["state"] == "running" for c in ps(ctl)), timeout=60, what="10 running")
            during = {h.name: host_state(h.netns) for h in net3.hosts}
            assert during != before  # the check below can see veths and rules
        assert ctl("rm", "-f", *names).returncode == 0
    wait_for(lambda: {h.name: host_state(h.netns) for h in net3.hosts} == before, timeout=60,
             what="links, addresses, routes and NAT rules as before")
    for h in net3.hosts:
        nsdir = netns_dir(Path(h.state_dir))
        assert not nsdir.exists() or not list(nsdir.iterdir())
        ipam = json.loads((Path(h.state_dir) / "network" / "ipam.json").read_text())
        assert ipam["containers"] == {}


def test_agent_restart_neither_loses_nor_duplicates(net3: ClusterInfo, ctl: Ctl) -> None:
    assert ctl("run", "-d", "--name", "web", "-p", "8080:80", "busybox", "sh", "-c", WEB).returncode == 0
    web = running(ctl, "web")
    server = host(net3, web["node"])
    client = next(h for h in net3.hosts if h.name != web["node"])
    before = host_state(server.netns)
    agent = net3.process(f"agent-{server.name}")
    assert agent is not None
    pid = agent.pid
    for proc in Path("/proc").iterdir():  # the agent now running for that host (an earlier test may restart it)
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"agent" in cmd and server.state_dir.encode() in cmd:
                pid = int(proc.name)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    environ = dict(
        item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item
    )
    os.kill(pid, signal.SIGKILL)
    with open(server.log, "ab") as log:
        subprocess.Popen(cmdline, env=environ, stdin=subprocess.DEVNULL, stdout=log, stderr=log,  # type: ignore[arg-type]
                         start_new_session=True)

    def rejoined() -> bool:
        nodes = json.loads(ctl("node", "ls", "-o", "json").stdout)
        return any(n["name"] == server.name and n["state"] == "ready" for n in nodes)

    wait_for(rejoined, timeout=30, what="agent back")
    # The agent rewrote the same rules and kept the veth: nothing lost, nothing doubled.
    wait_for(lambda: host_state(server.netns) == before, timeout=15, what="host state as before the restart")
    assert client_address(http_get(client.netns, f"http://{server.address}:8080/cgi-bin/ip")) == client.address
    assert container(ctl, "web")["ip_address"] == web["ip_address"]


@pytest.fixture(scope="module")
def net1(cluster_state_dir: Path) -> Iterator[ClusterInfo]:
    yield from _cluster("bnetone", 1, 62, CIDR_1HOST, cluster_state_dir)


def test_same_host_port_twice_leaves_the_second_pending(net1: ClusterInfo) -> None:
    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return run_berthctl(net1.controller, *args)

    try:
        assert ctl("run", "-d", "--name", "one", "-p", "8080:80", "busybox", "sh", "-c", WEB).returncode == 0
        out = ctl("run", "-d", "--name", "two", "-p", "8080:80", "busybox", "sh", "-c", WEB)
        assert out.returncode == 0, out.stderr
        [doc] = json.loads(ctl("inspect", "two").stdout)
        assert doc["State"]["state"] == "pending"
        assert doc["pending_reason"] == "0/1 hosts: 1 port 8080 in use"
        # Another protocol on the same port number, or another port, is placed.
        assert ctl("run", "-d", "--name", "three", "-p", "8080:80/udp", "busybox", "sleep", "100").returncode == 0
        [doc] = json.loads(ctl("inspect", "three").stdout)
        assert doc["State"]["state"] != "pending"
        # Once the first is removed, the second gets the port.
        assert ctl("rm", "-f", "one").returncode == 0
        wait_for(lambda: json.loads(ctl("inspect", "two").stdout)[0]["State"]["state"] == "running", timeout=30,
                 what="the second to run once the port is free")
    finally:
        ids = ctl("ps", "-a", "-q").stdout.split()
        if ids:
            ctl("rm", "-f", *ids)


def container_netns(info: ClusterInfo, c: dict[str, Any]) -> str:
    return str(netns_dir(Path(host(info, c["node"]).state_dir)) / c["id"])


def udp_exchange(server_ns: str, client_ns: str, server_ip: str) -> tuple[str, str]:
    """A UDP datagram from the client's namespace to the server's and its echo back: (what the server got and
    from where, what the client got back)."""
    server = (
        "import socket, sys\n"
        "from pyroute2 import netns\n"
        "netns.setns(sys.argv[1], flags=0)\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 9000)); s.settimeout(20)\n"
        "print('ready', flush=True)\n"
        "data, peer = s.recvfrom(100); s.sendto(data.upper(), peer)\n"
        "print(data.decode(), peer[0], flush=True)\n"
    )
    client = (
        "import socket, sys\n"
        "from pyroute2 import netns\n"
        "netns.setns(sys.argv[1], flags=0)\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)\n"
        "s.sendto(b'hello-udp', (sys.argv[2], 9000)); print(s.recvfrom(100)[0].decode())\n"
    )
    srv = subprocess.Popen([sys.executable, "-c", server, server_ns], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        out = subprocess.run([sys.executable, "-c", client, client_ns, server_ip], capture_output=True, text=True,
                             timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        got, _ = srv.communicate(timeout=20)
        return got.strip(), out.stdout.strip()
    finally:
        srv.kill()
        srv.wait()


def test_containers_on_different_hosts_reach_each_other_by_address(net3: ClusterInfo, ctl: Ctl) -> None:
    assert ctl("run", "-d", "--name", "srv", "--constraint", "node.name==host1", "busybox", "sh", "-c",
               WEB).returncode == 0
    assert ctl("run", "-d", "--name", "peer", "--constraint", "node.name==host2", "busybox", "sleep",
               "1000").returncode == 0
    srv, peer = running(ctl, "srv"), running(ctl, "peer")
    assert (srv["node"], peer["node"]) == ("host1", "host2")
    # TCP over the overlay, by the container's own address; the server sees the client container's address.
    out = ctl("exec", "peer", "wget", "-qO-", f"http://{srv['ip_address']}/cgi-bin/ip")
    assert out.returncode == 0, out.stderr
    assert client_address(out.stdout.strip()) == peer["ip_address"]
    # UDP both ways between the two running containers' namespaces.
    got, echoed = udp_exchange(container_netns(net3, srv), container_netns(net3, peer), srv["ip_address"])
    assert got == f"hello-udp {peer['ip_address']}"
    assert echoed == "HELLO-UDP"


def test_hosts_resolv_conf_dns_and_add_host(net3: ClusterInfo, ctl: Ctl) -> None:
    out = ctl("run", "--name", "files", "--add-host", "db:10.1.2.3", "--dns", "10.1.2.53", "busybox", "sh", "-c",
              "cat /etc/hosts; echo ---; cat /etc/resolv.conf; echo ---; ip -o -4 addr show eth0")
    assert out.returncode == 0, out.stderr
    hosts, resolv, addr = out.stdout.split("---\n")
    own = addr.split()[3].split("/")[0]
    assert f"{own}\tfiles" in hosts.splitlines()
    assert "10.1.2.3\tdb" in hosts.splitlines()
    # The nameserver is the host's DNS server on the gateway; --dns became its upstream (tests/e2e/test_dns.py).
    gateway = ipaddress.IPv4Interface(addr.split()[3]).network[1]
    assert resolv.splitlines()[0] == f"nameserver {gateway}"
    bad = ctl("run", "--rm", "--add-host", "db", "busybox", "true")
    assert bad.returncode != 0 and "invalid --add-host 'db'" in bad.stderr
    # Removing the container removes its files on the host.
    c = container(ctl, "files")
    assert ctl("rm", "files").returncode == 0
    files_dir = Path(host(net3, c["node"]).state_dir) / "network" / "files" / c["id"]
    wait_for(lambda: not files_dir.exists(), what="the container's network files to go")
