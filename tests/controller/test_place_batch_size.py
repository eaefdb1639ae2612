"""Placement transactions hold no more bytes than one etcd request takes. A container's spec can be large (its
environment, labels, command): 64 pending containers of 32 KiB each, placed by one sweep, made one transaction
of ~2 MiB (64 fit under --max-txn-ops: 2 operations each) that etcd refused whole (--max-request-bytes, 1.5 MiB by
default), at every sweep, for ever: none of them was placed. Runs group-committed on the leader (_admit) are cut
the same way. Real etcd and cluster cache; one host in etcd, alive under a lease, that no agent serves."""

from __future__ import annotations

import asyncio
import secrets

from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import container_key
from tests.controller.conftest import cache_on, until

CONTAINERS = 64  # one transaction's worth by count (the orchestrator's default --max-txn-ops 128, 2 ops each)
SPEC_BYTES = 32 * 1024


def _large(name: str) -> t.Container:
    spec = t.ContainerSpec(name=name, image="busybox", env=[f"BLOB={'x' * SPEC_BYTES}"])
    return t.Container(id=secrets.token_hex(32), spec=spec, desired_state=t.DESIRED_RUNNING, generation=1)


async def _large_specs_placed(url: str) -> None:
    async with cache_on(url) as (store, cache, client):
        orchestrator = Orchestrator(store, ControllerMetrics())
        orchestrator.cache = cache
        lease = await store.grant_lease(60)
        try:
            await store.put_node(t.Node(id="n1", name="n1", lease_id=lease,
                                        capacity=t.Resources(memory_bytes=1 << 30, nano_cpus=10**9)))
            pending = [_large(f"big{i}") for i in range(CONTAINERS)]
            for c in pending:
                await store.create_container(c)
            await until(lambda: all(c.id in cache.pending for c in pending) and "n1" in cache.alive
                        and "n1" in cache.nodes, "the pending containers and the host in the cache")
            assert sum(c.ByteSize() for c in pending) > 3 * 1024 * 1024 // 2  # more than etcd takes in one request

            # one sweep places them all (before: etcd refused the one transaction, StoreError, every sweep)
            assert await asyncio.wait_for(orchestrator.place_pending(), 30) == CONTAINERS
            for c in pending:
                assert (await store.get_container(c.id)).container.node_id == "n1", c.spec.name

            # Runs in flight on the leader are created placed together, cut the same way: with etcd allowing 1,024
            # operations (as the dev cluster's), the 64 made one transaction that etcd refused, and each was then
            # created alone (64 transactions, then placed by the sweep); now a few transactions of up to 1 MiB
            orchestrator.max_txn_ops = 1024
            leader = asyncio.create_task(orchestrator.lead(period_s=0.2))  # places what is created alone
            try:
                await until(lambda: orchestrator.kick is not None, "the leader loop")
                runs = [_large(f"run{i}") for i in range(CONTAINERS)]
                placed = await asyncio.wait_for(asyncio.gather(*(orchestrator.create_and_place(c) for c in runs)), 60)
            finally:
                leader.cancel()
                await asyncio.gather(leader, return_exceptions=True)
            assert [p.node_id for p in placed] == ["n1"] * CONTAINERS
            created = {(await client.get(container_key(c.id))).create_revision for c in runs}
            assert len(created) <= 3, f"the {CONTAINERS} Runs were created in {len(created)} transactions"
        finally:
            await store.revoke_lease(lease)


def test_a_sweep_of_large_specs_is_placed_in_transactions_etcd_takes(etcd_url: str) -> None:
    asyncio.run(_large_specs_placed(etcd_url))
