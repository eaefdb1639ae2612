"""`network rm` racing the creation of a container (or service) on that network (issue 5, order): rm closes the
network (/berth/network-open/<name>), then looks for users, then deletes it or opens it again and refuses;
every creation compares that the network is open. So a creation either comes first (and rm refuses) or fails
with one clear line and leaves nothing behind; never a container on a network removed under it. Real etcd
(the store and the orchestrator's group commit), and a real controller process for `run --network` against
`network rm` over gRPC."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import grpc
import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import NetworkClosed, Store, network_open_key
from controller.user_networks import NetworkRequestError, UserNetworks
from tests.controller.conftest import Controller, cache_on, etcd_keys, store_on

CIDR = "10.88.0.0/16"


def _container(name: str, network: str) -> t.Container:
    return t.Container(id=secrets.token_hex(32), spec=t.ContainerSpec(name=name, image="busybox", network=network),
                       desired_state=t.DESIRED_RUNNING, generation=1)


def _service(name: str, network: str) -> t.Service:
    return t.Service(id=secrets.token_hex(16), spec=t.ServiceSpec(
        name=name, replicas=1, template=t.ContainerSpec(image="busybox", network=network)))


async def _rm_racing(store: Store, create: Callable[[], Awaitable[object]]) -> object:
    """Run `network rm race` with `create` run after rm has looked for users, right before it deletes the
    network (the window the old check-then-delete left open); returns what `create` returned or raised. rm
    must succeed (nothing used the network when it looked)."""
    nets = UserNetworks(store, CIDR)
    await nets.create("race")
    delete_network = store.delete_network
    got: list[object] = []

    async def create_first(net: t.Network, rev: int, closed_at: int) -> bool:
        try:
            got.append(await create())
        except Exception as exc:  # noqa: BLE001 - what the creation got, checked by the caller
            got.append(exc)
        return await delete_network(net, rev, closed_at)

    store.delete_network = create_first  # type: ignore[method-assign]
    try:
        await nets.remove("race")
    finally:
        store.delete_network = delete_network  # type: ignore[method-assign]
    assert len(got) == 1
    return got[0]


def _closed(got: object) -> None:
    assert isinstance(got, NetworkClosed), f"created on a network being removed: {got}"
    assert "'race' does not exist or is being removed" in str(got) and "\n" not in str(got)


def _nothing_left(url: str, *prefixes: str) -> None:
    left = [k for k in etcd_keys(url) if k.startswith((*prefixes, "/berth/networks/", "/berth/network-"))]
    assert not left, f"left behind: {left}"


def test_a_container_created_while_rm_looks_for_users_fails_cleanly(etcd_url: str) -> None:
    async def main() -> None:
        async with store_on(etcd_url) as (store, _):
            _closed(await _rm_racing(store, lambda: store.create_container(_container("late", "race"))))
            _nothing_left(etcd_url, "/berth/containers/", "/berth/names/", "/berth/status/")

    asyncio.run(main())


def test_a_service_created_while_rm_looks_for_users_fails_cleanly(etcd_url: str) -> None:
    async def main() -> None:
        async with store_on(etcd_url) as (store, _):
            _closed(await _rm_racing(store, lambda: store.create_service(_service("late", "race"))))
            _nothing_left(etcd_url, "/berth/services/", "/berth/service-names/")

    asyncio.run(main())


def test_a_run_group_committed_while_rm_looks_for_users_fails_cleanly(etcd_url: str) -> None:
    """The leader's path: the Runs in flight created already placed in one transaction (Store.create_placed),
    then one by one (create_container) when it fails: the Run on the closed network gets NetworkClosed, the
    other Run of the batch is created."""
    async def main() -> None:
        async with cache_on(etcd_url) as (store, cache, _):
            orchestrator = Orchestrator(store, ControllerMetrics())
            orchestrator.cache, orchestrator.kick = cache, asyncio.Event()  # as the leader: group commits
            leader = asyncio.create_task(orchestrator.run_leader_loop(orchestrator.kick))  # places what is alone
            bystander = _container("bystander", "")
            try:
                got = await _rm_racing(store, lambda: asyncio.gather(
                    orchestrator.create_and_place(_container("late", "race")),
                    orchestrator.create_and_place(bystander), return_exceptions=True))
            finally:
                for task in (leader, orchestrator._admitter):
                    if task is not None:
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
            assert isinstance(got, list)
            late, other = got
            _closed(late)
            assert isinstance(other, t.Container) and other.id == bystander.id
            assert etcd_keys(etcd_url, "/berth/names/") == ["/berth/names/bystander"]
            _nothing_left(etcd_url)

    asyncio.run(main())


def test_rm_refused_for_a_user_reopens_the_network(etcd_url: str) -> None:
    """A container created before the close is seen: rm refuses as before, and the network is open again."""
    async def main() -> None:
        async with store_on(etcd_url) as (store, _):
            nets = UserNetworks(store, CIDR)
            await nets.create("kept")
            await store.create_container(_container("first", "kept"))
            with pytest.raises(NetworkRequestError, match=r"in use by 1 container\(s\) or service\(s\) \(first\)"):
                await nets.remove("kept")
            await store.create_container(_container("second", "kept"))  # open again
            await store.create_service(_service("svc", "kept"))

    asyncio.run(main())


def test_networks_without_an_open_key_get_one_at_controller_start(etcd_url: str) -> None:
    """Networks made before the open key existed (or left closed by an rm that died between its close and its
    delete) are opened by Store.open_networks, which the controller runs at start; an open one is left as is."""
    async def main() -> None:
        async with store_on(etcd_url) as (store, client):
            nets = UserNetworks(store, CIDR)
            old, closed, fine = [await nets.create(n) for n in ("old", "closed", "fine")]
            await client.delete(network_open_key(old.name))
            assert await store.close_network(closed)
            with pytest.raises(NetworkClosed):
                await store.create_container(_container("early", "old"))
            with pytest.raises(NetworkClosed):
                await store.create_container(_container("early", "closed"))
            assert await store.open_networks() == 2
            assert await store.open_networks() == 0
            for net in (old, closed, fine):
                await store.create_container(_container(f"on-{net.name}", net.name))

    asyncio.run(main())


def test_run_against_network_rm_over_the_api(controller: Controller) -> None:
    """A real controller: `run --network x` calls in flight while `network rm x` runs, the Runs a little later
    each round. Each Run is created or fails with one line (NOT_FOUND), rm removes or refuses, and afterwards
    no container is on a network that does not exist. (Without the open key, Runs landed between rm's look
    for users and its delete in most runs of this test: containers on a removed network.)"""
    async def main() -> None:
        async with grpc.aio.insecure_channel(controller.address) as channel:
            control = control_pb2_grpc.ControlStub(channel)
            try:
                for round_ in range(16):
                    await _round(control, f"churn{round_}", round_ * 4)
            finally:
                for c in (await control.List(control_pb2.ListRequest(all=True))).containers:
                    await control.Remove(control_pb2.RemoveRequest(ref=c.id, force=True))
                for net in (await control.NetworkList(control_pb2.NetworkListRequest())).networks:
                    if net.name.startswith("churn"):
                        await control.NetworkRemove(control_pb2.NetworkRef(name=net.name))

    asyncio.run(main())


async def _round(control: control_pb2_grpc.ControlStub, name: str, turns: int) -> None:
    await control.NetworkCreate(control_pb2.NetworkCreateRequest(name=name))

    async def run(i: int) -> bool:
        spec = t.ContainerSpec(name=f"{name}-{i}", image="busybox", network=name)
        try:
            async for _ in control.Run(control_pb2.RunRequest(spec=spec)):
                pass
            return True
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND and "\n" not in (exc.details() or ""), exc
            return False

    async def rm() -> bool:
        try:
            await control.NetworkRemove(control_pb2.NetworkRef(name=name))
            return True
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
            return False

    removing = asyncio.create_task(rm())
    for _ in range(turns):  # the Runs a few turns of the loop later each round (an order, not a timing)
        await asyncio.sleep(0)
    created = await asyncio.gather(*(run(i) for i in range(10)))
    removed = await removing
    exists = name in {n.name for n in (await control.NetworkList(control_pb2.NetworkListRequest())).networks}
    on_it = [c.spec.name for c in (await control.List(control_pb2.ListRequest(all=True))).containers
             if c.spec.network == name]
    assert exists or not on_it, f"containers {on_it} on network {name}, removed under them"
    assert removed != exists and sorted(on_it) == sorted(f"{name}-{i}" for i, ok in enumerate(created) if ok)
    for c in (await control.List(control_pb2.ListRequest(all=True))).containers:
        await control.Remove(control_pb2.RemoveRequest(ref=c.id, force=True))
    if exists:
        await control.NetworkRemove(control_pb2.NetworkRef(name=name))
