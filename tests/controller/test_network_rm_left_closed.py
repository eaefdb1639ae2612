"""A `network rm` that does not finish (its caller went away, or etcd failed while it looked for users) leaves
the network open (issue 5, order): rm closes the network before it looks for users, and a close left behind
made every later `run --network` of that network fail ("does not exist or is being removed") until a
controller restarted. Real etcd."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from berth.api import types_pb2 as t
from controller.store import Store, StoreError, Unavailable, Versioned
from controller.user_networks import UserNetworks
from tests.controller.conftest import store_on

CIDR = "10.88.0.0/16"


def _on(network: str) -> t.Container:
    cid = secrets.token_hex(32)
    return t.Container(id=cid, spec=t.ContainerSpec(name=f"c{cid[:8]}", image="busybox", network=network),
                       desired_state=t.DESIRED_RUNNING, generation=1)


async def _still_usable(store: Store, nets: UserNetworks) -> None:
    """The network is still there and open: a container can be created on it, and rm then refuses."""
    assert (await nets.get("kept")).name == "kept"
    await store.create_container(_on("kept"))  # raised NetworkClosed with the close left behind


async def _etcd_fails_while_rm_looks(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with store_on(url) as (store, _):
        nets = UserNetworks(store, CIDR)
        await nets.create("kept")

        async def unavailable() -> list[Versioned]:
            raise Unavailable("etcd is unreachable: (the test)")

        monkeypatch.setattr(store, "list_containers", unavailable)
        with pytest.raises(StoreError, match="unreachable"):
            await nets.remove("kept")
        monkeypatch.undo()
        await _still_usable(store, nets)


def test_a_network_rm_failing_while_it_looks_for_users_leaves_the_network_open(
        etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_etcd_fails_while_rm_looks(etcd_url, monkeypatch))


async def _caller_gone_while_rm_looks(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with store_on(url) as (store, _):
        nets = UserNetworks(store, CIDR)
        await nets.create("kept")
        looking = asyncio.Event()
        list_containers = store.list_containers

        async def slow() -> list[Versioned]:
            looking.set()
            await asyncio.Event().wait()  # a big cluster's read: the caller gives up meanwhile
            return await list_containers()

        monkeypatch.setattr(store, "list_containers", slow)
        rm = asyncio.create_task(nets.remove("kept"))
        await asyncio.wait_for(looking.wait(), 10)
        rm.cancel()  # the NetworkRemove call cancelled (berthctl's deadline, ^C)
        with pytest.raises(asyncio.CancelledError):
            await rm
        monkeypatch.undo()
        await _still_usable(store, nets)


def test_a_network_rm_whose_caller_goes_away_leaves_the_network_open(
        etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_caller_gone_while_rm_looks(etcd_url, monkeypatch))
