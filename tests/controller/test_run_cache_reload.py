"""A Run waiting for its container to start when the controller's cluster cache is reloaded (its etcd watch
failed: an etcd restart, say) goes on waiting on etcd and answers with the container once it runs. It failed
with ABORTED ("container ...: the controller's copy of etcd is being reloaded") although the container was
created, placed and started: the caller was told it failed, and a retry found its name in use (RunStream's
requests, the same). A real gRPC server over a real etcd and cluster cache; one host in etcd, its report
written as its agent's would be."""

from __future__ import annotations

import asyncio

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from tests.controller.conftest import api_on, fail_cache_watch, until


async def _reloaded_while_waiting(url: str) -> None:
    async with api_on(url) as (store, cache, _, channel):
        follower: asyncio.Task[None] | None = None
        try:
            call = control_pb2_grpc.ControlStub(channel).Run(
                control_pb2.RunRequest(spec=t.ContainerSpec(name="through", image="busybox")))
            first = asyncio.ensure_future(call.read())
            await until(lambda: cache.waiters() == 1 and cache.containers, "the Run placed and waiting")
            [cid] = list(cache.containers)

            # The cache's watch fails: it drops its copy (its waiters fail) and loads it again, as cache.run does.
            await fail_cache_watch()
            follower = asyncio.create_task(cache.run())
            await asyncio.wait_for(cache.wait_ready(), 10)

            v = await store.get_container(cid)  # its agent reports it running
            assert v.container.node_id == "n1"
            assert await store.put_status(cid, t.ContainerStatus(state=t.STATE_RUNNING, generation=1, pid=7),
                                          v.mod_revision, 0)
            event = await asyncio.wait_for(first, 20)
            assert isinstance(event, control_pb2.RunEvent), event
            assert (event.started.id, event.started.status.state) == (cid, t.STATE_RUNNING)
        finally:
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)


def test_a_run_waiting_when_the_cache_reloads_is_answered_when_its_container_runs(etcd_url: str) -> None:
    asyncio.run(_reloaded_while_waiting(etcd_url))
