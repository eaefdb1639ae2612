"""`berthctl kill` (and `pause`) of a --rm container answers the container as it ended even when its --rm removal
(done as its exit is recorded) comes before the answer is made: it answered UNAVAILABLE "no such container" for a
kill that worked (session 6's known-left; the race Stop lost until eef6e84). On the session's dev cluster: a real
container on a real host, its agent and controller, which record its exit and remove it; the Kill and Pause calls
go through a Control API of the test's own (over real gRPC, reading the cluster's etcd) whose answer waits until
the removal is done, which makes the race's bad order certain. For pause, another client unpauses and kills the
container meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from berthctl.dev.cluster import ClusterInfo
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import NotFound, Store
from tests.conftest import RunBerthctl
from tests.controller.conftest import served


def _ok(berthctl: RunBerthctl, *args: str) -> str:
    out = berthctl(*args)
    assert out.returncode == 0, f"berthctl {' '.join(args)}: {out.stderr}"
    return out.stdout


async def _removed(store: Store, cid: str) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        try:
            await store.get_container(cid)
        except NotFound:
            return
        assert asyncio.get_running_loop().time() < deadline, "the --rm container was never removed"
        await asyncio.sleep(0.05)


async def _answered_as_ended(cluster: ClusterInfo, berthctl: RunBerthctl, monkeypatch: pytest.MonkeyPatch,
                             verb: str) -> None:
    name = f"rm-{verb}-race"
    store = Store(cluster.etcd)
    await store.connect()
    metrics = ControllerMetrics()
    api = ControlAPI(store, Orchestrator(store, metrics), metrics)  # no cache: it reads the cluster's etcd
    try:
        cid = (await asyncio.to_thread(_ok, berthctl, "run", "-d", "--rm", "--name", name, "busybox", "sleep",
                                       "3600")).strip()
        view = api._view

        async def removed_first(ref: str) -> t.Container:  # the --rm removal wins the race with the answer
            if verb == "pause":  # paused; then another client unpauses and kills it
                for args in (("unpause", name), ("kill", name)):
                    await asyncio.to_thread(_ok, berthctl, *args)
            await _removed(store, cid)
            return await view(ref)

        monkeypatch.setattr(api, "_view", removed_first)
        async with served(lambda server: control_pb2_grpc.add_ControlServicer_to_server(api, server)) as (_, ch):
            stub = control_pb2_grpc.ControlStub(ch)
            if verb == "kill":
                answer = await stub.Kill(control_pb2.KillRequest(ref=name), timeout=120)
            else:  # before the fix (both): UNAVAILABLE, no such container
                answer = await stub.Pause(control_pb2.ContainerRef(ref=name), timeout=120)
        assert (answer.id, answer.spec.name, answer.spec.auto_remove) == (cid, name, True)
        assert (answer.status.state, answer.status.exit_code) == (t.STATE_EXITED, 137), answer.status
        assert answer.node_name.startswith("host"), answer.node_name
        assert name not in _ok(berthctl, "ps", "-a")  # removed (--rm)
    finally:
        await api.links.close()
        await store.close()
        await asyncio.to_thread(berthctl, "rm", "-f", name)


def test_kill_of_an_rm_container_removed_before_the_answer_answers_it_as_it_ended(
        cluster: ClusterInfo, berthctl: RunBerthctl, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_answered_as_ended(cluster, berthctl, monkeypatch, "kill"))


def test_pause_of_an_rm_container_removed_before_the_answer_answers_it_as_it_ended(
        cluster: ClusterInfo, berthctl: RunBerthctl, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_answered_as_ended(cluster, berthctl, monkeypatch, "pause"))
