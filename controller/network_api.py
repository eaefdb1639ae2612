"""The control API's user network RPCs (issue 5): NetworkCreate, NetworkList, NetworkInspect, NetworkRemove,
and the check that a container's --network exists; a mixin of controller.api.ControlAPI over
controller.user_networks.UserNetworks."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
import grpc.aio

from berth.api import control_pb2
from berth.api import types_pb2 as t
from controller.store import Store, StoreError
from controller.user_networks import NetworkRequestError, UserNetworks

Ctx = grpc.aio.ServicerContext[Any, Any]


async def abort(context: Ctx, exc: StoreError) -> NoReturn:
    """A request that cannot be done as asked is FAILED_PRECONDITION; the rest as every control RPC."""
    from controller.api import _abort  # here: controller.api imports this module

    if isinstance(exc, NetworkRequestError):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    await _abort(context, exc)


class NetworksAPI:
    store: Store
    networks: UserNetworks | None = None  # set by controller.main

    async def _networks(self, context: Ctx) -> UserNetworks:
        if self.networks is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this controller has no user networks")
            raise AssertionError
        return self.networks

    async def check_network(self, spec: t.ContainerSpec, context: Ctx) -> None:
        """Abort a run/create whose --network names no network."""
        if self.networks is None:
            return
        try:
            await self.networks.check_spec(spec)
        except StoreError as exc:
            await abort(context, exc)

    async def NetworkCreate(self, request: control_pb2.NetworkCreateRequest, context: Ctx) -> t.Network:
        networks = await self._networks(context)
        try:
            return await networks.create(request.name, request.subnet)
        except StoreError as exc:
            await abort(context, exc)

    async def NetworkList(self, request: control_pb2.NetworkListRequest, context: Ctx) -> control_pb2.NetworkListResponse:  # noqa: E501
        networks = await self._networks(context)
        try:
            return control_pb2.NetworkListResponse(networks=await networks.list())
        except StoreError as exc:
            await abort(context, exc)

    async def NetworkInspect(self, request: control_pb2.NetworkRef, context: Ctx) -> t.Network:
        networks = await self._networks(context)
        try:
            return await networks.inspect(request.name)
        except StoreError as exc:
            await abort(context, exc)

    async def NetworkRemove(self, request: control_pb2.NetworkRef, context: Ctx) -> t.Network:
        networks = await self._networks(context)
        try:
            return await networks.remove(request.name)
        except StoreError as exc:
            await abort(context, exc)
