"""The control API's exec and volume calls (issue 3b), mixed into controller.api.ControlAPI.

exec: the controller resolves the container, checks that it runs, and relays the bidirectional stream to
the agent of its host (which enters the container's namespaces); gRPC errors of the agent come back as they
are.

Volumes live on one host each, with Docker's local-driver semantics; the agent's disk is the only record
of them (nothing in etcd), so `ls` asks every ready host. A volume is addressed by its name and, when that
is ambiguous, its host (`--node`): `create` without --node goes to the host that already has it, else to
the only host; `inspect` and `rm` to the one host that has it. `run -v NAME:/path` of a volume that exists
on a host places the container on that host (a node.name constraint is added to its spec); a volume that
exists nowhere is created where the container lands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from berth.api import types_pb2 as t

if TYPE_CHECKING:
    from controller.api import AgentLinks
    from controller.store import Store

log = logging.getLogger(__name__)
Ctx = grpc.aio.ServicerContext[Any, Any]
AGENT_CALL_TIMEOUT_S = 10.0


class ExecVolumesMixin:
    store: Store
    links: AgentLinks
    _resolve: Callable[[str, Ctx], Awaitable[str]]

    # ---- exec ---------------------------------------------------------------------------------------

    async def Exec(self, request_iterator: AsyncIterator[t.ExecInput], context: Ctx) -> AsyncIterator[t.ExecOutput]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("input") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an exec stream starts with its command")
            return
        cid = await self._resolve(first.start.container, context)
        from controller.store import StoreError

        try:
            v = await self.store.get_container(cid)
            status, _ = await self.store.get_status(cid)
            node = await self.store.get_node(v.container.node_id) if v.container.node_id else None
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            return
        name = v.container.spec.name
        if node is None or status.state != t.STATE_RUNNING:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"container {name} is not running: start it first (berthctl start {name})",
            )
            return
        start = t.ExecStart()
        start.CopyFrom(first.start)
        start.container = cid

        async def upstream() -> AsyncIterator[t.ExecInput]:
            yield t.ExecInput(start=start)
            async for msg in request_iterator:
                yield msg

        call = self.links.agent(node.agent_address).Exec(upstream())
        try:
            async for out in call:
                yield out
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                await context.abort(code, f"cannot reach host {node.name} of container {name}: {exc.details()}")
            await context.abort(code, exc.details() or "exec failed")

    # ---- volumes ------------------------------------------------------------------------------------

    async def _ready_nodes(self, context: Ctx) -> list[t.Node]:
        from controller.store import StoreError

        try:
            return [n for n in await self.store.list_nodes() if n.state == t.NODE_READY]
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise AssertionError from exc

    async def _volumes_on(self, nodes: list[t.Node]) -> list[t.Volume]:
        """Every volume of these hosts, with its host filled in; an unreachable host is skipped."""

        async def one(n: t.Node) -> list[t.Volume]:
            try:
                reply = await self.links.agent(n.agent_address).VolumeList(
                    t.VolumeListRequest(), timeout=AGENT_CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("volumes of host %s: %s", n.name, exc.details())
                return []
            for vol in reply.volumes:
                vol.node_id, vol.node_name = n.id, n.name
            return list(reply.volumes)

        lists = await asyncio.gather(*(one(n) for n in nodes))
        return sorted((v for vs in lists for v in vs), key=lambda v: (v.name, v.node_name))

    async def _volume_host(self, request: t.VolumeRequest, context: Ctx, creating: bool) -> t.Node:
        nodes = await self._ready_nodes(context)
        if request.node:
            node = next((n for n in nodes if request.node in (n.name, n.id)), None)
            if node is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no ready host {request.node} (see berthctl node ls)")
            assert node is not None
            return node
        having = {v.node_id for v in await self._volumes_on(nodes) if v.name == request.name}
        candidates = [n for n in nodes if n.id in having]
        if not candidates and creating:
            candidates = nodes
        if not candidates:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no such volume: {request.name}")
        if len(candidates) > 1:
            names = ", ".join(sorted(n.name for n in candidates))
            what = "there are several hosts" if creating and not having else f"volume {request.name} is on hosts"
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{what} ({names}): say which one with --node HOST"
            )
        return candidates[0]

    async def _volume_rpc(self, op: str, request: t.VolumeRequest, context: Ctx) -> t.Volume:
        node = await self._volume_host(request, context, creating=op == "create")
        stub = self.links.agent(node.agent_address)
        agent_req = t.VolumeRequest(name=request.name, labels=request.labels)
        call = {"create": stub.VolumeCreate, "inspect": stub.VolumeInspect, "remove": stub.VolumeRemove}[op]
        try:
            vol = await call(agent_req, timeout=AGENT_CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or f"volume {op} failed on host {node.name}")
            raise AssertionError from exc
        vol.node_id, vol.node_name = node.id, node.name
        return vol

    async def VolumeCreate(self, request: t.VolumeRequest, context: Ctx) -> t.Volume:
        return await self._volume_rpc("create", request, context)

    async def VolumeInspect(self, request: t.VolumeRequest, context: Ctx) -> t.Volume:
        return await self._volume_rpc("inspect", request, context)

    async def VolumeRemove(self, request: t.VolumeRequest, context: Ctx) -> t.Volume:
        return await self._volume_rpc("remove", request, context)

    async def VolumeList(self, request: t.VolumeListRequest, context: Ctx) -> t.VolumeListResponse:
        nodes = [n for n in await self._ready_nodes(context) if not request.node or n.name == request.node]
        return t.VolumeListResponse(volumes=await self._volumes_on(nodes))

    async def pin_to_volumes(self, spec: t.ContainerSpec, context: Ctx) -> None:
        """A container using named volumes that exist goes to their host: adds node.name==HOST to its
        constraints (nothing when it uses none, or they exist nowhere yet)."""
        names = {v.split(":", 1)[0] for v in spec.volumes if not v.startswith("/")}
        if not names:
            return
        hosts = {v.node_name for v in await self._volumes_on(await self._ready_nodes(context)) if v.name in names}
        if len(hosts) > 1:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"its volumes are on different hosts ({', '.join(sorted(hosts))}): one container runs on one host",
            )
        if hosts:
            spec.constraints.append(f"node.name=={hosts.pop()}")
