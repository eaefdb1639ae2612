"""A call's containers join the leader's admission batch as one group with one future (session 6): each gets its
own outcome, in the call's order, whether it was created with the batch or alone (a name in use, a name twice),
and the other calls of the batch are not disturbed. Real etcd, real cluster cache."""

from __future__ import annotations

import asyncio
import secrets

from berth.api import types_pb2 as t
from controller.cache import ClusterCache
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import NameInUse, Store
from tests.controller.conftest import until, wipe_etcd


def _container(name: str) -> t.Container:
    return t.Container(id=secrets.token_hex(32), spec=t.ContainerSpec(name=name, image="busybox"),
                       desired_state=t.DESIRED_RUNNING, generation=1)


async def _groups(url: str) -> None:
    store = Store(url)
    await store.connect()
    orchestrator = Orchestrator(store, ControllerMetrics())
    orchestrator.cache = ClusterCache(store)
    tasks = [asyncio.create_task(orchestrator.cache.run())]
    try:
        lease = await store.grant_lease(60)
        await store.put_node(t.Node(id="g1", name="g1", lease_id=lease,
                                    capacity=t.Resources(memory_bytes=1 << 40, nano_cpus=64 * 10**9)))
        taken = _container("taken")
        await store.create_container(taken)
        await asyncio.wait_for(orchestrator.cache.wait_ready(), 10)
        tasks.append(asyncio.create_task(orchestrator.lead(period_s=0.05)))
        await until(lambda: orchestrator.kick is not None, "leading")
        await until(lambda: orchestrator.cache is not None and orchestrator.cache.ready
                    and "g1" in orchestrator.cache.alive, "the host in the cache")

        group = [_container("a"), _container("taken"), _container("b"), _container("twin"), _container("twin")]
        alone = _container("c")
        many, single, other = await asyncio.gather(
            orchestrator.create_and_place_many(group), orchestrator.create_and_place(alone),
            orchestrator.create_and_place_many([_container("d"), _container("e")]))
        assert len(many) == 5
        a, clash, b, *twins = many
        assert isinstance(a, t.Container) and (a.spec.name, a.node_id) == ("a", "g1")
        assert isinstance(clash, NameInUse) and clash.owner == taken.id
        assert isinstance(b, t.Container) and (b.spec.name, b.node_id) == ("b", "g1")
        assert sorted(type(r).__name__ for r in twins) == ["Container", "NameInUse"], twins
        [twin] = [r for r in twins if isinstance(r, t.Container)]
        assert twin.id in (group[3].id, group[4].id) and twin.spec.name == "twin"
        assert isinstance(single, t.Container) and single.node_id == "g1" and single.id == alone.id
        assert [r.spec.name for r in other if isinstance(r, t.Container)] == ["d", "e"]
        stored = {v.container.spec.name: v.container for v in await store.list_containers()}
        assert sorted(stored) == ["a", "b", "c", "d", "e", "taken", "twin"]
        assert stored["twin"].id == twin.id and stored["taken"].id == taken.id
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wipe_etcd(url)
        await store.close()


def test_a_calls_containers_get_their_own_outcomes_in_order(etcd_url: str) -> None:
    asyncio.run(_groups(etcd_url))
