"""A controller loads its cluster cache from etcd in one read per prefix at one revision. Past 4 MiB of container
keys (~15,000 containers of bench/schedule.py's size, fewer with bigger specs) that read was larger than grpc
lets a client channel receive by default, so a controller that started (or took over as leader) with that many
containers in etcd failed to load and tried again for ever ("received message larger than max"). Now the
controller's etcd client takes replies up to 64 MiB, and the load reads in pages. Real etcd."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from aetcd import rpc as etcdrpc

from berth.api import types_pb2 as t
from controller import store as store_module
from controller.cache import ClusterCache
from controller.store import container_key
from tests.controller.conftest import store_on

CONTAINERS = 1_500
ENV_BYTES = 4_000  # 1,500 x ~4 KiB: ~6 MiB of container keys


async def _load(url: str) -> None:
    async with store_on(url) as (store, client):
        ids = [secrets.token_hex(32) for _ in range(CONTAINERS)]
        for start in range(0, CONTAINERS, 100):  # written straight to etcd, 100 a transaction
            ops = [etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=container_key(cid), value=t.Container(
                id=cid, spec=t.ContainerSpec(name=f"l{cid[:12]}", image="busybox", env=[f"BLOB={'x' * ENV_BYTES}"]),
                desired_state=t.DESIRED_RUNNING, generation=1).SerializeToString())) for cid in ids[start:start + 100]]
            await client.kvstub.Txn(etcdrpc.TxnRequest(success=ops), timeout=10)
        cache = ClusterCache(store)
        follower = asyncio.create_task(cache.run())
        try:
            await asyncio.wait_for(cache.wait_ready(), 30)
            assert set(cache.containers) == set(ids) and len(cache.containers) == CONTAINERS
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)


@pytest.mark.parametrize("page", [store_module.READ_PAGE_KEYS, 100, 1])
def test_cache_loads_more_than_4_mib_of_containers(etcd_url: str, page: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read in pages of `page` keys (the default's one page here; 100: 15 pages; 1: a reply per key), at one
    revision: every container is loaded once."""
    monkeypatch.setattr(store_module, "READ_PAGE_KEYS", page)
    asyncio.run(_load(etcd_url))
