"""The control API's image calls (issue 4), passed through to the agent of the host they concern.

A call names its host with `node` (name or id). Without it, pull and list go to every ready host (a pull
then places the image everywhere a container may land), and the other calls to the only ready host, or
fail asking for --node. commit goes to the container's host. Credentials in a pull or push request are
passed on to the agent and are neither stored nor logged here. Mixed into ControlAPI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import grpc.aio

from berth.api import agent_pb2
from berth.api import types_pb2 as t
from controller.store import StoreError

if TYPE_CHECKING:
    from controller.api import AgentLinks
    from controller.store import Store

Ctx = grpc.aio.ServicerContext[Any, Any]


async def _relay_error(context: Ctx, node: t.Node, exc: grpc.aio.AioRpcError) -> NoReturn:
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot reach host {node.name}: {exc.details()}")
    await context.abort(exc.code(), f"{exc.details()} (on host {node.name})")
    raise AssertionError


class ImageRoutes:
    """Needs `self.store` and `self.links` (ControlAPI's)."""

    store: Store
    links: AgentLinks

    async def _nodes(self, name: str, context: Ctx, *, all_ready: bool) -> list[t.Node]:
        try:
            nodes = await self.store.list_nodes()
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if name:
            found = [n for n in nodes if name in (n.name, n.id)]
            if not found:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no host {name!r} (berthctl node ls lists them)")
            return found
        ready = [n for n in nodes if n.state == t.NODE_READY]
        if not ready:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no host is ready")
        if len(ready) > 1 and not all_ready:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(ready)} hosts have image stores: choose one with --node "
                f"({', '.join(sorted(n.name for n in ready))})",
            )
        return ready

    async def _one(self, name: str, context: Ctx) -> tuple[t.Node, Any]:
        node = (await self._nodes(name, context, all_ready=False))[0]
        return node, self.links.agent(node.agent_address)

    async def ImagePull(
        self, request: agent_pb2.ImagePullRequest, context: Ctx
    ) -> AsyncIterator[agent_pb2.ImageProgress]:
        for node in await self._nodes(request.node, context, all_ready=True):
            try:
                async for item in self.links.agent(node.agent_address).ImagePull(request):
                    item.node = node.name
                    if item.HasField("image"):
                        item.image.node = node.name
                    yield item
            except grpc.aio.AioRpcError as exc:
                await _relay_error(context, node, exc)

    async def ImagePush(
        self, request: agent_pb2.ImagePushRequest, context: Ctx
    ) -> AsyncIterator[agent_pb2.ImageProgress]:
        node, agent = await self._one(request.node, context)
        try:
            async for item in agent.ImagePush(request):
                item.node = node.name
                yield item
        except grpc.aio.AioRpcError as exc:
            await _relay_error(context, node, exc)

    async def ImageList(self, request: agent_pb2.ImageListRequest, context: Ctx) -> agent_pb2.ImageListResponse:
        out = agent_pb2.ImageListResponse()
        for node in await self._nodes(request.node, context, all_ready=True):
            try:
                reply = await self.links.agent(node.agent_address).ImageList(request)
            except grpc.aio.AioRpcError as exc:
                await _relay_error(context, node, exc)
            for info in reply.images:
                info.node = node.name
                out.images.append(info)
        return out

    async def _unary(self, method: str, request: Any, context: Ctx) -> Any:
        node, agent = await self._one(request.node, context)
        try:
            reply = await getattr(agent, method)(request)
        except grpc.aio.AioRpcError as exc:
            await _relay_error(context, node, exc)
        if isinstance(reply, agent_pb2.ImageInfo):
            reply.node = node.name
        return reply

    async def ImageInspect(self, request: agent_pb2.ImageRef, context: Ctx) -> agent_pb2.ImageInfo:
        reply: agent_pb2.ImageInfo = await self._unary("ImageInspect", request, context)
        return reply

    async def ImageTag(self, request: agent_pb2.ImageTagRequest, context: Ctx) -> agent_pb2.ImageInfo:
        reply: agent_pb2.ImageInfo = await self._unary("ImageTag", request, context)
        return reply

    async def ImageRemove(self, request: agent_pb2.ImageRemoveRequest, context: Ctx) -> agent_pb2.ImageRemoved:
        reply: agent_pb2.ImageRemoved = await self._unary("ImageRemove", request, context)
        return reply

    async def ImagePrune(self, request: agent_pb2.ImagePruneRequest, context: Ctx) -> agent_pb2.ImageRemoved:
        reply: agent_pb2.ImageRemoved = await self._unary("ImagePrune", request, context)
        return reply

    async def ImageCommit(self, request: agent_pb2.ImageCommitRequest, context: Ctx) -> agent_pb2.ImageInfo:
        try:
            cid = await self.store.resolve(request.container_id)
            container = (await self.store.get_container(cid)).container
            node = await self.store.get_node(container.node_id) if container.node_id else None
        except StoreError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        if node is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the container has not been placed on a host")
        forwarded = agent_pb2.ImageCommitRequest(container_id=cid, reference=request.reference)
        try:
            reply: agent_pb2.ImageInfo = await self.links.agent(node.agent_address).ImageCommit(forwarded)
        except grpc.aio.AioRpcError as exc:
            await _relay_error(context, node, exc)
        reply.node = node.name
        return reply

    async def _stream_in(
        self, method: str, request_iterator: AsyncIterator[agent_pb2.ImageChunk], context: Ctx
    ) -> Any:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no data sent")
        node, agent = await self._one(first.node, context)

        async def chunks() -> AsyncIterator[agent_pb2.ImageChunk]:
            yield first
            async for chunk in request_iterator:
                yield chunk

        try:
            return await getattr(agent, method)(chunks()), node
        except grpc.aio.AioRpcError as exc:
            await _relay_error(context, node, exc)

    async def ImageImport(
        self, request_iterator: AsyncIterator[agent_pb2.ImageChunk], context: Ctx
    ) -> agent_pb2.ImageInfo:
        reply, node = await self._stream_in("ImageImport", request_iterator, context)
        reply.node = node.name
        info: agent_pb2.ImageInfo = reply
        return info

    async def ImageLoad(
        self, request_iterator: AsyncIterator[agent_pb2.ImageChunk], context: Ctx
    ) -> agent_pb2.ImageListResponse:
        reply, node = await self._stream_in("ImageLoad", request_iterator, context)
        for info in reply.images:
            info.node = node.name
        images: agent_pb2.ImageListResponse = reply
        return images

    async def ImageSave(self, request: agent_pb2.ImageRef, context: Ctx) -> AsyncIterator[agent_pb2.ImageChunk]:
        node, agent = await self._one(request.node, context)
        try:
            async for chunk in agent.ImageSave(request):
                yield chunk
        except grpc.aio.AioRpcError as exc:
            await _relay_error(context, node, exc)
