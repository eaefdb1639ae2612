"""`service update` onto a user network checks it as `service create` does (issue 5, order): the network must
exist (NOT_FOUND, one line, the service unchanged), and the update compares that the network is open
(/berth/network-open/<name>), so that it cannot land between `network rm`'s look for users and its delete. Both
were missing: an update onto a network that did not exist, or that `network rm` was removing, was written, and
the service's tasks could then never be created. The Control API over real gRPC on a real etcd."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import Store
from controller.user_networks import UserNetworks
from tests.controller.conftest import served, store_on
from tests.controller.test_network_race import CIDR, _rm_racing


@asynccontextmanager
async def _control(url: str) -> AsyncIterator[tuple[Store, control_pb2_grpc.ControlStub]]:
    """The Control API with user networks on a real etcd, served over gRPC, and a service `web` on network
    `home`."""
    async with store_on(url) as (store, _):
        api = ControlAPI(store, Orchestrator(store, ControllerMetrics()), ControllerMetrics())
        api.networks = UserNetworks(store, CIDR)
        await api.networks.create("home")
        async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, channel):
            stub = control_pb2_grpc.ControlStub(channel)
            await stub.CreateService(_spec("home"))
            yield store, stub


def _spec(network: str) -> t.ServiceSpec:
    return t.ServiceSpec(name="web", replicas=1, template=t.ContainerSpec(image="busybox", network=network))


async def _unchanged(store: Store) -> None:
    svc, _ = await store.get_service("web")
    assert (svc.spec.template.network, svc.version, svc.update_state) == ("home", 1, ""), svc


def test_an_update_onto_a_network_that_does_not_exist_is_refused(etcd_url: str) -> None:
    async def main() -> None:
        async with _control(etcd_url) as (store, stub):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.UpdateService(control_pb2.UpdateServiceRequest(ref="web", spec=_spec("nowhere")))
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            details = refused.value.details() or ""
            assert "network 'nowhere' not found" in details and "\n" not in details, details
            await _unchanged(store)

    asyncio.run(main())


def test_an_update_while_rm_looks_for_users_is_refused_and_rm_goes_on(etcd_url: str) -> None:
    async def main() -> None:
        async with _control(etcd_url) as (store, stub):
            got = await _rm_racing(store, lambda: stub.UpdateService(
                control_pb2.UpdateServiceRequest(ref="web", spec=_spec("race"))))
            assert isinstance(got, grpc.aio.AioRpcError), f"updated onto a network being removed: {got}"
            assert got.code() == grpc.StatusCode.NOT_FOUND
            details = got.details() or ""
            assert "'race' does not exist or is being removed, so nothing was changed" in details, details
            await _unchanged(store)
            assert [n.name for n in (await store.list_networks())[1]] == ["home"]  # rm went on

            # and an update onto an open network goes through
            updated = await stub.UpdateService(control_pb2.UpdateServiceRequest(ref="web", spec=_spec("")))
            assert updated.version == 2 and not updated.spec.template.network

    asyncio.run(main())
