"""A rollback done by the services reconciler (an update whose new task failed, --update-failure-action
rollback) compares that the network the previous spec goes back to is open (/berth/network-open/<name>), as
`service update` does since dddb65d: `network rm` looks only at the services' current templates, so it could
find no user, a rollback onto that network land between its look and its delete, and the service's tasks never
be created again. When the network is closed the update is paused instead, saying why. The reconciler over a
real etcd, `network rm` (UserNetworks.remove) racing with it."""

from __future__ import annotations

import asyncio

from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.services import ServiceReconciler
from controller.store import Store
from controller.user_networks import UserNetworks
from tests.controller.conftest import store_on
from tests.controller.test_network_race import CIDR


async def _updated_and_failed(store: Store, network: str) -> t.Service:
    """Service `back` made on `network`, updated off it (version 2, failure action rollback), and its version 2
    task failed."""
    spec = t.ServiceSpec(name="back", replicas=1, template=t.ContainerSpec(image="busybox", network=network),
                         update=t.UpdateConfig(failure_action="rollback"))
    await store.create_service(t.Service(id="s" * 16, spec=spec, version=1))
    svc, rev = await store.get_service("back")
    svc.previous_spec.CopyFrom(svc.spec)
    svc.previous_version, svc.version, svc.update_state = 1, 2, "updating"
    svc.spec.template.network = ""
    await store.put_service(svc, rev)
    task = t.Container(id=f"{9:064x}", spec=t.ContainerSpec(name="back.1.aaaaaa", image="busybox"), node_id="n1",
                       desired_state=t.DESIRED_RUNNING, generation=1, service_id=svc.id, slot="1",
                       service_version=2)
    await store.create_container(task)
    v = await store.get_container(task.id)
    _, held = await store.held_status(task.id)
    assert await store.put_status(task.id, t.ContainerStatus(state=t.STATE_FAILED, generation=1, message="no such "
                                                             "image", seq=1 << 32 | 1), v.mod_revision, held)
    return svc


def test_a_rollback_while_rm_looks_for_users_is_paused_and_rm_goes_on(etcd_url: str) -> None:
    async def main() -> None:
        async with store_on(etcd_url) as (store, _):
            nets = UserNetworks(store, CIDR)
            await nets.create("away")
            await _updated_and_failed(store, "away")
            reconciler = ServiceReconciler(store, Orchestrator(store, ControllerMetrics()))
            delete_network = store.delete_network
            swept: list[bool] = []

            async def reconciled_first(net: t.Network, rev: int, closed_at: int) -> bool:
                # rm looked (the current template is off `away`: no user); the reconciler's sweep rolls back now
                swept.append(await reconciler.reconcile(await store.list_containers()))
                return await delete_network(net, rev, closed_at)

            store.delete_network = reconciled_first  # type: ignore[method-assign]
            try:
                await asyncio.wait_for(nets.remove("away"), 30)
            finally:
                store.delete_network = delete_network  # type: ignore[method-assign]
            assert swept == [True]
            assert [n.name for n in (await store.list_networks())[1]] == []  # rm went on

            svc, _ = await store.get_service("back")
            assert svc.spec.template.network == "", "rolled back onto a network being removed"
            assert (svc.version, svc.update_state) == (2, "paused"), svc
            assert svc.update_message == ("task back.1.aaaaaa failed: no such image; not rolled back: network "
                                          "'away' does not exist or is being removed"), svc.update_message

    asyncio.run(main())


def test_a_rollback_onto_an_open_network_goes_through(etcd_url: str) -> None:
    async def main() -> None:
        async with store_on(etcd_url) as (store, _):
            await UserNetworks(store, CIDR).create("still")
            await _updated_and_failed(store, "still")
            await ServiceReconciler(store, Orchestrator(store, ControllerMetrics())).reconcile(
                await store.list_containers())
            svc, _ = await store.get_service("back")
            assert (svc.spec.template.network, svc.version, svc.update_state) == ("still", 1, "rolling_back"), svc

    asyncio.run(main())
