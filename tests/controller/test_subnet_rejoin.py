"""Container subnets at join (controller.network.SubnetAllocator, issue 6) on a real etcd: a host that joins again
with the subnet its node record names gets it back from one read of that claim, never a subnet that is not its
own; claims of another size still keep new hosts off the subnets they overlap."""

from __future__ import annotations

import asyncio

import pytest

from controller.network import SubnetAllocator, SubnetsExhausted
from controller.store import SUBNETS
from tests.controller.conftest import store_on


async def _rejoin(url: str) -> None:
    async with store_on(url) as (store, client):
        subnets = SubnetAllocator(store, "10.203.0.0/22", 24)  # four subnets
        a, b = await subnets.subnet_for("a"), await subnets.subnet_for("b")
        assert (a, b) == ("10.203.0.0/24", "10.203.1.0/24")
        assert await subnets.subnet_for("a", known=a) == a
        for wrong in (b, "10.99.0.0/24", "not a subnet", "10.203.2.0/24"):  # another's, outside, junk, unclaimed
            assert await subnets.subnet_for("a", known=wrong) == a, wrong
        assert await store.subnet_owner("10.203.2.0/24") == ""  # the unclaimed one was not taken by the rejoin

        # A /23 claim (the node subnet size was once /23) covers the last two /24s: no new host gets them.
        await client.put(SUBNETS + b"10.203.2.0_23", b"x")
        with pytest.raises(SubnetsExhausted):
            await subnets.subnet_for("c")


def test_a_rejoining_host_gets_its_own_subnet_back(etcd_url: str) -> None:
    asyncio.run(_rejoin(etcd_url))
