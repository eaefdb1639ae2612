"""The one place where berth makes gRPC servers and channels.

Every server (controller, agent) and every channel (berthctl -> controller, agent -> controller,
controller -> agent) comes from here, so that transport security is one change in this module.
"""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

# Keepalives let both sides notice a dead peer (a killed agent, a cut link) within seconds instead of
# waiting for TCP's own timeouts; agent sessions rely on this.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]
_SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


def aio_server() -> grpc.aio.Server:
    """A new asyncio gRPC server; add servicers, then `bind` it.

    Its methods are served by the generic handlers alone (issue 6): grpcio's asyncio server keeps one
    pending future per *registered* method and, for every call that comes in, waits on all of them at once
    (asyncio.wait over ~50 futures for the controller's services, ~10% of its CPU under load), while the
    generic handler that each generated add_*_to_server also adds finds the same method in a dict."""
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    server.add_registered_method_handlers = _serve_generically  # type: ignore[attr-defined]
    return server


def _serve_generically(service_name: str, method_handlers: dict[str, Any]) -> None:
    """Registers nothing: the service's generic handler (added with it by generated code) serves it."""


def bind(server: grpc.aio.Server, address: str) -> int:
    """Listen on host:port; returns the port (useful with port 0)."""
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}: address in use or not on this host")
    return port


def aio_channel(address: str) -> grpc.aio.Channel:
    """An asyncio channel to host:port (controller or agent)."""
    return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)


def sync_channel(address: str) -> grpc.Channel:
    """A blocking channel, for the CLI, whose start-up must stay lean."""
    return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
