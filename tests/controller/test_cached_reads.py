"""The API's reads from the controller's cluster cache (issue 6) on a real controller and etcd: ps and inspect
answer from the cache only once it holds every change committed before the call, so a change another
controller (here: a store of the test's own) committed just before is always seen, and a removal too."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import grpc
import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.store import Store
from tests.controller.conftest import Controller


@pytest.fixture
def control(controller: Controller) -> Iterator[control_pb2_grpc.ControlStub]:
    with grpc.insecure_channel(controller.address) as channel:
        yield control_pb2_grpc.ControlStub(channel)


def test_reads_see_what_another_writer_committed_just_before(control: control_pb2_grpc.ControlStub,
                                                            controller: Controller) -> None:
    async def main() -> None:
        store = Store(controller.etcd_url)
        await store.connect()
        created: list[str] = []
        try:
            for i in range(20):
                c = t.Container(id=secrets.token_hex(32), spec=t.ContainerSpec(name=f"other{i}", image="busybox"),
                                desired_state=t.DESIRED_STOPPED, created_at_ns=i + 1)
                await store.create_container(c)  # committed by someone else: the controller learns it by watch
                created.append(c.id)
                seen = control.Inspect(control_pb2.ContainerRef(ref=c.id), timeout=10)
                assert (seen.id, seen.spec.name, seen.status.state) == (c.id, f"other{i}", t.STATE_CREATED)
                listed = control.List(control_pb2.ListRequest(all=True), timeout=10).containers
                assert [x.id for x in listed] == list(reversed(created))  # newest first
                if i % 2:
                    await store.delete_container(await store.get_container(c.id))
                    created.pop()
                    assert c.id not in {x.id for x in control.List(control_pb2.ListRequest(all=True),
                                                                   timeout=10).containers}
        finally:
            for cid in created:
                await store.delete_container(await store.get_container(cid))
            await store.close()

    asyncio.run(main())
