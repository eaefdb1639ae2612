"""The DNS records' feed (controller.dns, issue 5) over a real etcd: the whole table to each new subscriber, then
one delta per change, following status changes (running, exited, running again at a new address) and removal;
services' tasks carry the service's name; host/none networks and containers without an address have no record;
the last subscriber gone, the feed stops. The same fed by the controller's cluster cache (issue 6), without an
etcd watch of its own."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from controller import dns
from controller.cache import ClusterCache
from controller.dns import NamesHub
from controller.store import Store, StoreError

RUNNING = t.STATE_RUNNING


@pytest.fixture(autouse=True)
def _wipe_after(etcd_url: str) -> Iterator[None]:
    """The keys a test wrote go with it, also when it fails (the module shares one etcd)."""
    yield
    subprocess.run(["etcdctl", f"--endpoints={etcd_url}", "del", "--prefix", "/berth/"], capture_output=True,
                   check=True, env={**os.environ, "ETCDCTL_API": "3"})


def container(cid: str, name: str, **kw: object) -> t.Container:
    c = t.Container(id=cid * 32, spec=t.ContainerSpec(name=name, image="busybox"))
    for k, v in kw.items():
        if k == "network":
            c.spec.network = str(v)
        elif k == "service":
            c.service_id, c.slot = "svc1", "1"
            c.spec.labels["berth.service"] = str(v)
    return c


async def _report(store: Store, cid: str, status: t.ContainerStatus) -> None:
    """An agent's report, written as the controller writes one: against the container's current revision."""
    v = await store.get_container(cid)
    assert await store.put_status(cid, status, v.mod_revision)


def records(msg: d.NamesMessage) -> list[tuple[str, str, str, str]]:
    return sorted((r.name, r.network, r.address, r.service) for r in msg.records)


def etcd_watchers(url: str) -> int:
    """The watchers etcd has now (its /metrics)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("etcd_debugging_mvcc_watcher_total "))


@pytest.mark.parametrize("fed", ["etcd", "cache"])
def test_whole_table_then_deltas_that_follow_status_and_removal(etcd_url: str, monkeypatch: pytest.MonkeyPatch,
                                                                fed: str) -> None:
    async def main() -> None:
        store = Store(etcd_url)
        await store.connect()
        cache = ClusterCache(store) if fed == "cache" else None
        follower = asyncio.create_task(cache.run()) if cache is not None else None
        if cache is not None:
            await asyncio.wait_for(cache.wait_ready(), 10)
            deadline = time.monotonic() + 10
            while etcd_watchers(etcd_url) < 1:  # the cache's own watch
                assert time.monotonic() < deadline, "the cache's etcd watch never came"
                await asyncio.sleep(0.02)
        hub = NamesHub(store, lambda: cache)
        watchers = etcd_watchers(etcd_url)
        web, db = container("a1", "web"), container("b2", "db")
        for c in (web, db):
            await store.create_container(c)
        await _report(store, web.id, t.ContainerStatus(state=RUNNING, ip_address="10.88.1.2"))
        await _report(store, db.id, t.ContainerStatus(state=t.STATE_PREPARING))  # no address yet
        first = hub.subscribe()
        try:
            msg = await asyncio.wait_for(anext(first), 10)
            assert msg.kind == d.NamesMessage.COMPLETE
            assert records(msg) == [("web", "bridge", "10.88.1.2", "")]

            async def next_delta() -> d.NamesMessage:
                m = await asyncio.wait_for(anext(first), 10)
                assert m.kind == d.NamesMessage.INCREMENTAL
                return m

            await _report(store, db.id, t.ContainerStatus(state=RUNNING, ip_address="10.88.2.2"))
            assert records(await next_delta()) == [("db", "bridge", "10.88.2.2", "")]
            # fed by etcd: a watch on the containers and one on the statuses; by the cache: none of its own
            assert etcd_watchers(etcd_url) - watchers == (0 if cache is not None else 2)
            # A second subscriber (an agent that restarts) gets the whole table as it is now.
            second = hub.subscribe()
            msg = await asyncio.wait_for(anext(second), 10)
            assert msg.kind == d.NamesMessage.COMPLETE
            assert records(msg) == [("db", "bridge", "10.88.2.2", ""), ("web", "bridge", "10.88.1.2", "")]
            await second.aclose()

            await _report(store, web.id, t.ContainerStatus(state=t.STATE_EXITED))  # stop
            m = await next_delta()
            assert (list(m.removed), list(m.records)) == ([web.id], [])
            await _report(store, web.id, t.ContainerStatus(state=RUNNING, ip_address="10.88.3.7"))  # elsewhere
            assert records(await next_delta()) == [("web", "bridge", "10.88.3.7", "")]

            task = container("c3", "api.1.abcdef", service="api")
            hostnet = container("d4", "hostnet", network="host")
            for c in (task, hostnet):
                await store.create_container(c)
            await _report(store, hostnet.id, t.ContainerStatus(state=RUNNING, ip_address="10.88.9.9"))
            await _report(store, task.id, t.ContainerStatus(state=RUNNING, ip_address="10.88.1.3"))
            assert records(await next_delta()) == [("api.1.abcdef", "bridge", "10.88.1.3", "api")]

            await _report(store, task.id, t.ContainerStatus(state=t.STATE_LOST, ip_address="10.88.1.3"))  # host died
            m = await next_delta()
            assert (list(m.removed), list(m.records)) == ([task.id], [])

            await store.delete_container(await store.get_container(db.id))
            m = await next_delta()
            assert (list(m.removed), list(m.records)) == ([db.id], [])
            # A subscriber that does not read is ended after MAX_BEHIND changes, not kept forever.
            stuck = hub.subscribe()
            await asyncio.wait_for(anext(stuck), 10)
            monkeypatch.setattr(dns, "MAX_BEHIND", 2)
            for i in range(3):
                await _report(store, web.id, t.ContainerStatus(state=RUNNING, ip_address=f"10.88.4.{i + 1}"))
                await next_delta()
            with pytest.raises(StoreError, match="DNS changes behind"):
                while True:
                    await asyncio.wait_for(anext(stuck), 10)
        finally:
            await first.aclose()
            # The last subscriber gone, the feed and its watches stop.
            assert hub._feed is None
            if cache is not None:
                await asyncio.sleep(0)  # the cancelled feed's clean-up
                assert cache._followers == []
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            await store.close()

    asyncio.run(main())
