"""A container left on a host that `node rm` removed (it could not move: no restart policy) shows as lost, as it
did while the host was down (docs/networking.md: "a container of the host (lost there, ...)"): it showed its
last status again, `running`, on a host that no longer exists, for ever. A real controller process on a real
etcd; the host and the container's keys are put as the host's agent and the controller left them."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import aetcd
import grpc
import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.store import container_key, name_key, node_key, status_key
from tests.controller.conftest import Controller, wait_for


@pytest.fixture
def control(controller: Controller) -> Iterator[control_pb2_grpc.ControlStub]:
    with grpc.insecure_channel(controller.address) as channel:
        yield control_pb2_grpc.ControlStub(channel)


async def _put(url: str, puts: dict[bytes, bytes], deletes: tuple[bytes, ...] = ()) -> None:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    try:
        for key, value in puts.items():
            await client.put(key, value)
        for key in deletes:
            await client.delete(key)
    finally:
        await client.close()


def test_a_container_left_on_a_removed_host_shows_lost(
        control: control_pb2_grpc.ControlStub, controller: Controller) -> None:
    cid = secrets.token_hex(32)
    name = f"pet-{cid[:6]}"
    keys = {
        node_key("gone"): t.Node(id="gone", name="gone").SerializeToString(),  # no alive key: down
        container_key(cid): t.Container(id=cid, spec=t.ContainerSpec(name=name, image="busybox"), generation=1,
                                        desired_state=t.DESIRED_RUNNING, node_id="gone").SerializeToString(),
        status_key(cid): t.ContainerStatus(state=t.STATE_RUNNING, generation=1, pid=42, seq=7).SerializeToString(),
        name_key(name): cid.encode(),
    }
    asyncio.run(_put(controller.etcd_url, keys))
    try:
        def state() -> int:
            listed = {c.id: c for c in control.List(control_pb2.ListRequest(all=True), timeout=10).containers}
            return listed[cid].status.state if cid in listed else 0

        wait_for(lambda: state() == t.STATE_LOST, 20, "the container of a down host shown lost")
        control.RemoveNode(control_pb2.RemoveNodeRequest(ref="gone"), timeout=10)  # List reads after it
        assert all(n.id != "gone" for n in control.ListNodes(control_pb2.ListNodesRequest(), timeout=10).nodes)
        assert state() == t.STATE_LOST, f"shown {t.ContainerState.Name(state())} on a host that no longer exists"
        seen = control.Inspect(control_pb2.ContainerRef(ref=name), timeout=10)
        assert seen.status.state == t.STATE_LOST and "gone" in seen.status.message, seen.status
    finally:
        asyncio.run(_put(controller.etcd_url, {}, tuple(keys)))
