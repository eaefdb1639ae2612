"""User networks' objects and addresses (controller.user_networks, issue 5) over a real etcd: concurrent creates
never share a name, a subnet or a VNI; a host's gateway and a container's address are claimed once and kept;
a removed container leaves no claim and its address is free again; a removed host frees its gateways; a full
network says so; removing a network removes its claims.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from berth.api import types_pb2 as t
from controller.network import SubnetAllocator, SubnetsExhausted
from controller.store import Store
from controller.user_networks import AddressesExhausted, NetworkRequestError, UserNetworks
from tests.support import etcd_keys

CIDR = "10.88.0.0/16"


@pytest.fixture(autouse=True)
def _wipe_after(etcd_url: str) -> Iterator[None]:
    """The keys a test wrote go with it, also when it fails (the module shares one etcd)."""
    yield
    subprocess.run(["etcdctl", f"--endpoints={etcd_url}", "del", "--prefix", "/berth/"], capture_output=True,
                   check=True, env={**os.environ, "ETCDCTL_API": "3"})


def container(name: str, network: str) -> t.Container:
    return t.Container(id=secrets.token_hex(32), spec=t.ContainerSpec(name=name, image="busybox", network=network))


async def hosts(store: Store, *names: str) -> None:
    """Nodes as a join makes them: a gateway's host exists (else a full network may take its address)."""
    for name in names:
        await store.put_node(t.Node(id=name, name=name))


async def fresh(etcd_url: str) -> tuple[Store, UserNetworks]:
    store = Store(etcd_url)
    await store.connect()
    nets = UserNetworks(store, CIDR)
    for n in (await nets.list())[3:]:
        for v in await store.list_containers():
            await store.delete_container(v)
        await nets.remove(n.name)
    return store, nets


def test_concurrent_creates_never_share_a_name_subnet_or_vni(etcd_url: str) -> None:
    async def main() -> None:
        store, nets = await fresh(etcd_url)
        made = await asyncio.gather(*(nets.create(f"n{i}") for i in range(8)))
        subnets = [ipaddress.IPv4Network(n.subnet) for n in made]
        assert all(not a.overlaps(b) for i, a in enumerate(subnets) for b in subnets[i + 1:])
        assert len({n.vni for n in made}) == 8 and min(n.vni for n in made) >= 256
        same = await asyncio.gather(*(nets.create("twin") for _ in range(4)), return_exceptions=True)
        assert sum(isinstance(r, t.Network) for r in same) == 1
        assert all("already exists" in str(r) for r in same if not isinstance(r, t.Network))
        assert [n.name for n in await nets.list()] == ["bridge", "host", "none", *(f"n{i}" for i in range(8)), "twin"]
        for n in made:
            await nets.remove(n.name)
        await nets.remove("twin")
        await store.close()

    asyncio.run(main())


def test_addresses_gateways_reuse_exhaustion_and_removal(etcd_url: str) -> None:
    async def main() -> None:
        store, nets = await fresh(etcd_url)
        net = await nets.create("small", "10.200.0.0/29")  # 6 addresses
        await hosts(store, "host1", "host2")
        a, b = container("a", "small"), container("b", "small")
        for c in (a, b):
            await store.create_container(c)
        first = await nets.attach("host1", a.id)
        assert (first.gateway, first.address, first.subnet, first.vni) == ("10.200.0.1", "10.200.0.2",
                                                                            net.subnet, net.vni)
        assert await nets.attach("host1", a.id) == first  # the same on every later call
        second = await nets.attach("host2", b.id)
        assert (second.gateway, second.address) == ("10.200.0.3", "10.200.0.4")
        doc = await nets.inspect("small")
        assert {(e.address, e.container_name, e.node_id) for e in doc.endpoints} == {
            ("10.200.0.1", "", "host1"), ("10.200.0.2", "a", ""), ("10.200.0.3", "", "host2"),
            ("10.200.0.4", "b", "")}
        # a removed: its address is free for the next container; the hosts keep their gateways.
        await store.delete_container(await store.get_container(a.id))
        c = container("c", "small")
        await store.create_container(c)
        assert (await nets.attach("host1", c.id)).address == "10.200.0.2"
        # Full: 10.200.0.5 and .6 left, then a clear error.
        for name in ("d", "e"):
            x = container(name, "small")
            await store.create_container(x)
            await nets.attach("host1", x.id)
        full = container("f", "small")
        await store.create_container(full)
        with pytest.raises(AddressesExhausted, match=r"no free address left in 10\.200\.0\.0/29"):
            await nets.attach("host1", full.id)
        with pytest.raises(NetworkRequestError, match=r"in use by 5 container\(s\) or service\(s\)"):
            await nets.remove("small")
        for v in await store.list_containers():
            await store.delete_container(v)
        await nets.remove("small")
        assert not [k for k in etcd_keys(etcd_url) if k.startswith(("/berth/networks/", "/berth/network-"))]
        await store.close()

    asyncio.run(main())


def test_container_rm_leaves_no_key_of_it_under_the_networks_prefixes(etcd_url: str) -> None:
    """The spec: removing a container leaves no etcd key behind, its address claim included."""
    async def main() -> None:
        store, nets = await fresh(etcd_url)
        await nets.create("tidy", "10.200.1.0/29")
        a = container("a", "tidy")
        await store.create_container(a)
        got = await nets.attach("host1", a.id)
        assert (await store.network_ips((await nets.get("tidy")).id))[got.address] == f"c/{a.id}"
        await store.delete_container(await store.get_container(a.id))
        net_id = (await nets.get("tidy")).id
        assert await store.network_ips(net_id) == {got.gateway: "gw/host1"}  # the host keeps its gateway
        assert not [k for k in etcd_keys(etcd_url) if a.id in k]
        await nets.remove("tidy")
        await store.close()

    asyncio.run(main())


def test_node_rm_frees_the_hosts_gateways(etcd_url: str) -> None:
    """A host keeps its gateway on a network while it exists; `node rm` (Store.delete_node) frees it on every
    network, so host churn does not use a network up. Another host's gateway stays where it was."""
    async def main() -> None:
        store, nets = await fresh(etcd_url)
        one = await nets.create("one", "10.200.2.0/29")
        two = await nets.create("two", "10.200.3.0/29")
        await hosts(store, "host1", "host2", "host3")
        made = []
        for host, net in (("host1", "one"), ("host1", "two"), ("host2", "one")):
            c = container(f"{host}-{net}", net)
            await store.create_container(c)
            made.append((host, c, await nets.attach(host, c.id)))
        gw1 = made[0][2].gateway
        assert (await store.network_ips(one.id))[gw1] == "gw/host1"
        for i, host in enumerate(("host1", "host2")):  # their subnets of the container CIDR, as joins claim them
            assert await store.claim_subnet(f"10.201.{i}.0/24", host)
        await store.delete_node("host1")
        assert await store.subnet_claims() == {"10.201.1.0/24": "host2"}  # host1's subnet is free again
        for net in (one, two):
            assert "gw/host1" not in (await store.network_ips(net.id)).values()
        assert (await store.network_ips(one.id))[made[2][2].gateway] == "gw/host2"
        # the freed address is the next host's
        c = container("host3-one", "one")
        await store.create_container(c)
        assert (await nets.attach("host3", c.id)).gateway == gw1
        for v in await store.list_containers():
            await store.delete_container(v)
        await nets.remove("one")
        await nets.remove("two")
        for host in ("host2", "host3"):
            await store.delete_node(host)
        assert await store.subnet_claims() == {}
        await store.close()

    asyncio.run(main())


def test_node_rm_keeps_a_gateway_its_containers_need_and_it_is_reused_once_they_are_gone(etcd_url: str) -> None:
    """A host removed while a container of it is still on a network (lost there; its agent, if it comes back,
    puts the old gateway on the bridge again) keeps that gateway; once no container names the host, the
    address is taken when the network has no other free one."""
    async def main() -> None:
        store, nets = await fresh(etcd_url)
        net = await nets.create("churn", "10.200.4.0/29")  # 6 addresses
        await hosts(store, "host1", "host2")
        a = container("a", "churn")
        a.node_id = "host1"
        await store.create_container(a)
        got = await nets.attach("host1", a.id)
        assert (got.gateway, got.address) == ("10.200.4.1", "10.200.4.2")
        assert await store.claim_subnet("10.201.9.0/24", "host1")
        await store.delete_node("host1")
        assert (await store.network_ips(net.id))["10.200.4.1"] == "gw/host1"  # a is still host1's
        assert (await store.subnet_claims())["10.201.9.0/24"] == "removed/host1"  # and so is its subnet
        await store.delete_container(await store.get_container(a.id))
        assert (await store.network_ips(net.id))["10.200.4.1"] == "gw/host1"  # still there, free only when needed
        others = []
        for name in ("b", "c", "d", "e"):  # gw/host2 takes .2, then b..e .3-.6: full but for host1's gateway
            x = container(name, "churn")
            await store.create_container(x)
            others.append((await nets.attach("host2", x.id)).address)
        assert others == ["10.200.4.3", "10.200.4.4", "10.200.4.5", "10.200.4.6"]
        f = container("f", "churn")
        await store.create_container(f)
        assert (await nets.attach("host2", f.id)).address == "10.200.4.1"
        g = container("g", "churn")
        await store.create_container(g)
        with pytest.raises(AddressesExhausted):
            await nets.attach("host2", g.id)
        for v in await store.list_containers():
            await store.delete_container(v)
        await nets.remove("churn")
        await store.close()

    asyncio.run(main())


def test_a_removed_nodes_subnet_goes_to_a_new_node_once_none_of_its_containers_is_left(etcd_url: str) -> None:
    """`node rm` of a host that still has containers keeps its subnet of the container CIDR (they hold addresses
    in it); when the CIDR is full, a joining host is given a subnet whose node is gone and that no container
    names, and never one that a container still names."""
    async def claims(store: Store) -> dict[str, str]:  # in this test's CIDR (another test leaves one outside it)
        return {k: v for k, v in (await store.subnet_claims()).items() if k.startswith("10.202.")}

    async def main() -> None:
        store, _ = await fresh(etcd_url)
        subnets = SubnetAllocator(store, "10.202.0.0/23", 24)  # two subnets
        await hosts(store, "old1", "old2")
        got = {h: await subnets.subnet_for(h) for h in ("old1", "old2")}
        assert await subnets.subnet_for("old1") == got["old1"]  # a node that joins again keeps its own
        assert got == {"old1": "10.202.0.0/24", "old2": "10.202.1.0/24"}
        kept = container("kept", "")
        kept.node_id = "old2"
        await store.create_container(kept)
        await store.delete_node("old1")  # nothing of it left: freed at once
        await store.delete_node("old2")  # `kept` still names it: kept
        assert await claims(store) == {"10.202.1.0/24": "removed/old2"}
        assert await subnets.subnet_for("new1") == "10.202.0.0/24"
        with pytest.raises(SubnetsExhausted):
            await subnets.subnet_for("new2")
        await store.delete_container(await store.get_container(kept.id))
        assert await subnets.subnet_for("new2") == "10.202.1.0/24"  # orphaned now: reclaimed for the new host
        assert await claims(store) == {"10.202.0.0/24": "new1", "10.202.1.0/24": "new2"}
        for host in ("new1", "new2"):
            await store.delete_node(host)
        assert await claims(store) == {}
        await store.close()

    asyncio.run(main())
