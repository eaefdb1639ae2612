"""The StatusWaiter a `Run` opens on the cluster cache before it creates its container (issue 6) is closed
however the call ends: here while the container is being created, by the caller going away (gRPC cancels the
handler) or by an error that is not the store's. Left open, it stays among the cache's subscribers for
the controller's life, collecting every status of the container. Real etcd and cache; the orchestrator's
create_and_place is held so that the call is in it when it ends."""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

import pytest

from berth.api import control_pb2
from berth.api import types_pb2 as t
from controller.api import ControlAPI
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from tests.controller.conftest import cache_on


class _Context:
    async def abort(self, code: Any, details: str) -> NoReturn:
        raise AssertionError(f"aborted: {code} {details}")


async def _run_ended_in_create(url: str, how: str) -> None:
    async with cache_on(url) as (store, cache, _):
        orchestrator = Orchestrator(store, ControllerMetrics())
        orchestrator.cache = cache
        creating, fail = asyncio.Event(), asyncio.Event()

        async def create_and_place(c: t.Container) -> t.Container:
            creating.set()
            await fail.wait()  # held until the test lets it fail, or cancels the call
            raise RuntimeError("something unexpected")

        orchestrator.create_and_place = create_and_place  # type: ignore[method-assign]
        api = ControlAPI(store, orchestrator, ControllerMetrics())
        run = api.Run(control_pb2.RunRequest(spec=t.ContainerSpec(name="w", image="busybox")),
                      _Context())  # type: ignore[arg-type]
        call = asyncio.create_task(anext(run))  # type: ignore[arg-type]
        await asyncio.wait_for(creating.wait(), 10)
        assert len(cache._subscribers) == 1  # the Run's waiter, opened before the container exists
        if how == "cancel":
            call.cancel()
        else:
            fail.set()
        with pytest.raises(asyncio.CancelledError if how == "cancel" else RuntimeError):
            await call
        assert cache._subscribers == {}, "the Run's status waiter was left open"


@pytest.mark.parametrize("how", ["cancel", "error"])
def test_a_run_ended_while_creating_closes_its_status_waiter(etcd_url: str, how: str) -> None:
    asyncio.run(_run_ended_in_create(etcd_url, how))
