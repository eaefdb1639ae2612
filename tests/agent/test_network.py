"""The agent's network bookkeeping (issue 5): addresses and ports on disk, the NAT table nft accepts, and
the -p flag. The wiring itself (namespaces, veths, rules in a host) is tested end to end in
tests/e2e/test_network.py on a dev cluster."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest

from agent.network import AddressesExhausted, NetworkError, PortInUse, nat
from agent.network.ipam import EPHEMERAL, Ipam, Port
from berthctl.client import CLIError
from berthctl.network import parse_publish


def test_addresses_are_allocated_kept_on_disk_and_released(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path)
    ipam.set_subnet("10.96.3.0/24")
    assert str(ipam.gateway) == "10.96.3.1/24"
    a = ipam.allocate("a" * 64, [])
    b = ipam.allocate("b" * 64, [])
    assert (a.address, b.address) == ("10.96.3.2", "10.96.3.3")
    assert ipam.allocate("a" * 64, []) is a  # idempotent
    again = Ipam(tmp_path)  # an agent restart
    assert {cid: x.address for cid, x in again.containers.items()} == {"a" * 64: a.address, "b" * 64: b.address}
    again.release("a" * 64)
    assert again.allocate("c" * 64, []).address == "10.96.3.2"  # the lowest free one, no leak
    assert set(Ipam(tmp_path).containers) == {"b" * 64, "c" * 64}


def test_subnet_runs_out(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path)
    ipam.set_subnet("10.96.3.0/30")  # .1 the bridge, .2 the only container address
    ipam.allocate("a", [])
    with pytest.raises(AddressesExhausted, match="no free address left"):
        ipam.allocate("b", [])


def test_port_clash_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path)
    ipam.set_subnet("10.96.3.0/24")
    ipam.allocate("a" * 64, [Port("", 8080, 80, "tcp")])
    with pytest.raises(PortInUse, match=r"port 8080/tcp is already published by container aaaaaaaaaaaa"):
        ipam.allocate("b" * 64, [Port("", 8080, 80, "tcp")])
    with pytest.raises(PortInUse):
        ipam.allocate("b" * 64, [Port("10.0.0.5", 8080, 80, "tcp")])  # one address vs every address
    assert "b" * 64 not in ipam.containers  # a refused container holds nothing
    ipam.allocate("c" * 64, [Port("", 8080, 80, "udp")])  # another protocol is another port


def test_a_free_host_port_is_chosen(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path)
    ipam.set_subnet("10.96.3.0/24")
    a = ipam.allocate("a", [Port("", 0, 80, "tcp"), Port("", 0, 81, "tcp")])
    ports = [p.host_port for p in a.ports]
    assert all(EPHEMERAL[0] <= p <= EPHEMERAL[1] for p in ports) and len(set(ports)) == 2
    assert Ipam(tmp_path).containers["a"].ports == a.ports


def test_changing_subnet_under_containers_is_refused(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path)
    ipam.set_subnet("10.96.3.0/24")
    ipam.allocate("a", [])
    with pytest.raises(NetworkError, match="remove them first"):
        ipam.set_subnet("10.96.4.0/24")


def test_nat_table_is_valid_nftables() -> None:
    rules = nat.ruleset("berth0", "10.96.3.0/24", [
        ("10.96.3.2", Port("", 8080, 80, "tcp")),
        ("10.96.3.3", Port("10.81.61.11", 5353, 53, "udp")),
    ])
    assert "fib daddr type local tcp dport 8080 dnat to 10.96.3.2:80" in rules
    assert "ip daddr 10.81.61.11 udp dport 5353 dnat to 10.96.3.3:53" in rules
    assert 'ip saddr 10.96.3.0/24 oifname != "berth0" masquerade' in rules
    out = subprocess.run(["nft", "-c", "-f", "-"], input=rules, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert nat.ruleset("berth0", None, []).count("dnat") == 0


@pytest.mark.parametrize(("flag", "want"), [
    ("8080:80", ("", 8080, 80, "tcp")),
    ("80", ("", 0, 80, "tcp")),
    ("53/udp", ("", 0, 53, "udp")),
    ("127.0.0.1:8080:80/tcp", ("127.0.0.1", 8080, 80, "tcp")),
])
def test_publish_flag(flag: str, want: tuple[str, int, int, str]) -> None:
    p = parse_publish(flag)
    assert (p.host_ip, p.host_port, p.container_port, p.protocol) == want


@pytest.mark.parametrize("flag", ["x:80", "8080:0", "8080:80/sctp", "1.2.3:8080:80", "70000:80"])
def test_bad_publish_flag(flag: str) -> None:
    with pytest.raises(CLIError, match="invalid -p"):
        parse_publish(flag)


def test_addresses_are_inside_the_subnet(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path)
    ipam.set_subnet("10.96.7.0/24")
    for i in range(20):
        assert ipaddress.IPv4Address(ipam.allocate(str(i), []).address) in ipaddress.IPv4Network("10.96.7.0/24")


def test_hosts_and_resolv_conf(tmp_path: Path) -> None:
    from agent.network import files

    hosts = files.hosts_text("web", "web", "10.96.3.2", ["db:10.96.9.9", "v6:fd00::1"])
    assert hosts.splitlines()[2:] == ["10.96.3.2\tweb", "10.96.9.9\tdb", "fd00::1\tv6"]
    with pytest.raises(NetworkError, match="invalid --add-host 'db'"):
        files.hosts_text("web", "web", "", ["db"])
    host_resolv = tmp_path / "resolv.conf"
    host_resolv.write_text("nameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch example.org\n")
    assert files.resolv_text([], host_resolv) == "nameserver 10.0.0.2\nsearch example.org\n"
    assert files.resolv_text(["10.96.0.53"], host_resolv) == "nameserver 10.96.0.53\nsearch example.org\n"
    with pytest.raises(NetworkError, match="invalid --dns"):
        files.resolv_text(["dns.example"], host_resolv)


def test_user_networks_get_an_isolating_forward_chain_only_while_present(tmp_path: Path) -> None:
    """issue 5: the forward chain nft accepts, present only with user networks; their allocations on disk."""
    from agent.network.usernet import Lease, Leases

    users = [("bnaaaaaaaaaaaa", "10.128.0.0/24"), ("bnbbbbbbbbbbbb", "10.128.1.0/24")]
    rules = nat.ruleset("berth0", "10.96.3.0/24", [], overlay="berth.vx", user_networks=users)
    for bridge, subnet in users:
        assert f'oifname "{bridge}" iifname != "{bridge}" drop' in rules
        assert f'iifname "{bridge}" oifname "berth0" drop' in rules
        assert f'iifname "{bridge}" oifname "berth.vx" drop' in rules
        assert f'ip saddr {subnet} oifname != "{bridge}" masquerade' in rules
    out = subprocess.run(["nft", "-c", "-f", "-"], input=rules, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "chain forward" not in nat.ruleset("berth0", "10.96.3.0/24", [], overlay="berth.vx")

    ipam = Ipam(tmp_path)
    ipam.set_subnet("10.96.3.0/24")
    a = ipam.allocate("a" * 64, [], "10.128.0.7", "f" * 64)
    assert (a.address, a.network) == ("10.128.0.7", "f" * 64)
    assert ipam.allocate("b" * 64, []).address == "10.96.3.2"  # the default network's own addresses
    assert Ipam(tmp_path).containers["a" * 64].network == "f" * 64
    leases = Leases(tmp_path)
    leases.put(Lease("f" * 64, "red", "10.128.0.0/24", 256, "10.128.0.1"))
    assert str(leases.by_id["f" * 64].interface) == "10.128.0.1/24"
    again = Leases(tmp_path)  # as saved, found by name or id
    assert again.find("red") == again.find("f" * 64) == leases.by_id["f" * 64]
    assert again.find("blue") is None
