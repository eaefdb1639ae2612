"""The DNS records' feed fed by the cluster cache (controller.dns, session 6) is woken only for containers whose
change may change the records: one with no record and no status that could give it one (not running, or
running with no address, as hollow agents' containers and containers being prepared) costs it nothing, while the
records still follow every change that matters (a record appears, moves and goes). Real etcd and cache."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t
from controller.dns import NamesHub
from controller.store import Store
from tests.controller.conftest import cache_on


async def _report(store: Store, cid: str, status: t.ContainerStatus) -> None:
    v = await store.get_container(cid)
    assert await store.put_status(cid, status, v.mod_revision)


async def _quiet(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with cache_on(url) as (store, cache, _):
        woken: list[set[str]] = []
        publish = NamesHub._publish

        def seen(feed: object, dirty: set[str]) -> None:
            woken.append(set(dirty))
            publish(feed, dirty)  # type: ignore[arg-type]

        monkeypatch.setattr(NamesHub, "_publish", staticmethod(seen))
        hub = NamesHub(store, lambda: cache)
        names = hub.subscribe()
        try:
            assert (await asyncio.wait_for(anext(names), 10)).kind == d.NamesMessage.COMPLETE
            quiet, web = secrets.token_hex(32), secrets.token_hex(32)
            for cid, name in ((quiet, "quiet"), (web, "web")):
                await store.create_container(t.Container(id=cid, spec=t.ContainerSpec(name=name, image="busybox"),
                                                         desired_state=t.DESIRED_RUNNING, generation=1))
            await _report(store, quiet, t.ContainerStatus(state=t.STATE_PREPARING, generation=1))
            await _report(store, quiet, t.ContainerStatus(state=t.STATE_RUNNING, generation=1))  # no address
            await _report(store, web, t.ContainerStatus(state=t.STATE_RUNNING, generation=1, ip_address="10.88.1.2"))
            msg = await asyncio.wait_for(anext(names), 10)  # after every change of `quiet` in etcd's order
            assert [(r.name, r.address) for r in msg.records] == [("web", "10.88.1.2")]
            await _report(store, web, t.ContainerStatus(state=t.STATE_RUNNING, generation=1, ip_address="10.88.1.3"))
            msg = await asyncio.wait_for(anext(names), 10)
            assert [(r.name, r.address) for r in msg.records] == [("web", "10.88.1.3")]
            await _report(store, web, t.ContainerStatus(state=t.STATE_EXITED, generation=1))
            msg = await asyncio.wait_for(anext(names), 10)
            assert (list(msg.removed), list(msg.records)) == ([web], [])
            assert not any(quiet in dirty for dirty in woken), f"woken for a container with no record: {woken}"
            assert any(web in dirty for dirty in woken)
        finally:
            await names.aclose()


def test_containers_that_cannot_have_a_record_do_not_wake_the_dns_feed(etcd_url: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_quiet(etcd_url, monkeypatch))
