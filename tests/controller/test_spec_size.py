"""A container's settings are stored in etcd with it, and etcd refuses a request over 1.5 MiB: a spec bigger than
that failed deep in the store (ABORTED "etcdserver: request is too large"; past 2 MiB, "grpc: received message
larger than max"). Run, RunStream and Create now refuse a spec over 1 MiB (MAX_SPEC_BYTES) up front, in one line
that says what to do, and store nothing of it; one just under the limit is created. Real etcd and gRPC."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from controller.api import MAX_SPEC_BYTES
from tests.controller.conftest import api_on, etcd_keys


def _spec(name: str, env_bytes: int) -> t.ContainerSpec:
    return t.ContainerSpec(name=name, image="busybox", env=[f"BLOB={'x' * env_bytes}"])


def _says_what_to_do(message: str) -> None:
    assert message.startswith("the container's settings take 1.") and "volume or the image" in message, message


async def _refused(url: str) -> None:
    async with api_on(url) as (store, _cache, _, channel):
        stub = control_pb2_grpc.ControlStub(channel)
        big = _spec("big", MAX_SPEC_BYTES + 1000)
        with pytest.raises(grpc.aio.AioRpcError) as run:
            async for _ in stub.Run(control_pb2.RunRequest(spec=big), timeout=20):
                pass
        assert run.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _says_what_to_do(run.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as create:
            await stub.Create(control_pb2.RunRequest(spec=big), timeout=20)
        assert create.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _says_what_to_do(create.value.details() or "")
        call = stub.RunStream()
        await call.write(control_pb2.RunBatch(requests=[control_pb2.RunRequest(spec=big)]))
        message = await asyncio.wait_for(call.read(), 20)
        assert isinstance(message, control_pb2.RunStreamEvents)
        (refused,) = message.events
        assert refused.WhichOneof("result") == "error"
        assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        _says_what_to_do(refused.error.message)
        call.cancel()
        assert not [k for k in etcd_keys(url) if "/containers/" in k or "/names/" in k]  # nothing of it stored

        fits = _spec("fits", MAX_SPEC_BYTES - 1000)
        assert fits.ByteSize() <= MAX_SPEC_BYTES
        created = await stub.Create(control_pb2.RunRequest(spec=fits), timeout=20)
        assert (await store.get_container(created.id)).container.spec.env == fits.env


def test_a_spec_over_the_limit_is_refused_and_nothing_stored(etcd_url: str) -> None:
    asyncio.run(_refused(etcd_url))
