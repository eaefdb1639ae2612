"""A small asyncio HTTP server for Prometheus's /metrics, shared by controller and agent.

prometheus-client's own server binds through http.server, which resolves the listening address's fully
qualified name at start: on a host without reverse DNS (a test host in a network namespace) that alone
takes 10 s. This one runs on the daemon's event loop, with no thread and no lookup.
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

_MAX_REQUEST = 8192


async def serve_metrics(registry: CollectorRegistry, address: str) -> asyncio.Server:
    """Serve GET /metrics on host:port; raises OSError when the address cannot be bound."""
    host, _, port = address.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        request_line = head.split(b"\r\n", 1)[0].split()
        if len(request_line) >= 2 and request_line[0] == b"GET" and request_line[1].split(b"?")[0] in (
            b"/metrics", b"/"
        ):
            status, ctype, body = b"200 OK", CONTENT_TYPE_LATEST.encode(), generate_latest(registry)
        else:
            status, ctype, body = b"404 Not Found", b"text/plain", b"only /metrics is served here\n"
        writer.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host or "0.0.0.0", int(port), limit=_MAX_REQUEST)
