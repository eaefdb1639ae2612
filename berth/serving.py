"""Starting a daemon's gRPC server the same way in controller and agent: health checking, the listening
address, /metrics, and one-line errors. Kept apart from berth.rpc so that the CLI does not import the health
service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from berth.rpc import bind


async def start(
    server: grpc.aio.Server, address: str, prog: str, serve_metrics: Callable[[], Awaitable[object]]
) -> Any:
    """Add grpc.health.v1 to a server whose servicers are in place, listen on `address`, start /metrics
    with `serve_metrics`, start serving, and report SERVING. Returns the health servicer (for a graceful
    shutdown). A port in use ends the process with a one-line message naming `prog`."""
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        bind(server, address)
        await serve_metrics()
    except OSError as exc:
        raise SystemExit(f"{prog}: {exc}") from None
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return health
