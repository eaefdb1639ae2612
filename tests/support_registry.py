"""A real docker-registry for tests: started on 127.0.0.1:<free port> in a temporary directory, seeded with
busybox, stopped even when the test fails. Import `running_registry` and wrap it in a fixture.

Also small helpers to push extra images and to count the HTTP requests an ImageStore makes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import secrets
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from agent.images.registry import EventHook
from berthctl.dev.registry import TokenAuth, start_registry, stop_registry, storage_dir
from berthctl.dev.seed import Entry, busybox_entries, push_layout, seed_registry, tar_layer, write_image


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RegistryHandle:
    address: str  # 127.0.0.1:PORT
    root: Path
    log_path: Path
    work: Path  # scratch space for layouts

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def blob_data_path(self, digest: str) -> Path:
        """Where Distribution's filesystem driver keeps a blob."""
        hex_ = digest.split(":", 1)[1]
        return storage_dir(self.root) / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def push(
        self, image: str, tag: str, layers: list[list[Entry]], config: dict[str, object] | None = None
    ) -> Path:
        """Build an image from `layers` (each a list of tar entries, lowest first) and push it as
        <image>:<tag>. Returns the OCI layout it was built in."""
        layout = self.work / f"{image.replace('/', '_')}-{tag}"
        write_image(layout, tag, [tar_layer(entries) for entries in layers], config or {"Cmd": ["sh"]})
        push_layout(layout, tag, self.address, image)
        return layout


@contextlib.contextmanager
def running_registry(tmp: Path) -> Iterator[RegistryHandle]:
    """A registry on a free loopback port, seeded with library/busybox:latest."""
    address = f"127.0.0.1:{free_port()}"
    log_path = tmp / "registry.log"
    proc = start_registry(tmp / "registry", address, log_path)
    try:
        registry = RegistryHandle(address, tmp / "registry", log_path, tmp / "work")
        seed_registry(address, registry.work)
        yield registry
    finally:
        stop_registry(proc)


def busybox_base() -> list[Entry]:
    """The seed image's base layer entries (deterministic: same bytes as the seeded layer)."""
    return busybox_entries()


@dataclass
class RequestLog:
    """An httpx request hook that records the path of every request."""

    paths: list[str] = field(default_factory=list)

    async def __call__(self, request: httpx.Request) -> None:
        self.paths.append(request.url.path)

    def hooks(self) -> dict[str, list[EventHook]]:
        return {"request": [self]}

    def blobs(self) -> list[str]:
        return [p for p in self.paths if "/blobs/" in p]

    def clear(self) -> None:
        self.paths.clear()


# -- a registry behind Distribution's token authentication ---------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A token service for Distribution's token auth: hands an RS256 JWT, signed with openssl by a
    self-signed certificate (sent in the x5c header), to anyone for whatever scope they ask. Records the
    scopes asked for."""

    def __init__(self, tmp: Path, service: str, issuer: str) -> None:
        self.service, self.issuer = service, issuer
        tmp.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = tmp / "token.key", tmp / "token.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
             "-out", str(self.cert), "-days", "1", "-subj", "/CN=berth-test-token"],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True, capture_output=True
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self.scopes: list[str] = []
        self.authorizations: list[str] = []  # the Authorization header of each token request ("" if none)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                scopes = query.get("scope", [])
                server.scopes.extend(scopes)
                server.authorizations.append(self.headers.get("Authorization", ""))
                body = json.dumps({"token": server.token(scopes), "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # keep test output quiet; scopes are recorded above

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._httpd.server_address[1]}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer, "sub": "", "aud": self.service, "exp": now + 300, "nbf": now - 60,
            "iat": now, "jti": secrets.token_hex(8), "access": access,
        }  # fmt: skip
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing_input}.{_b64url(signature)}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@contextlib.contextmanager
def running_token_registry(tmp: Path) -> Iterator[tuple[RegistryHandle, TokenServer]]:
    """A registry that demands bearer tokens from a TokenServer, seeded with library/busybox:latest."""
    tokens = TokenServer(tmp, service="berth-test-registry", issuer="berth-test-issuer")
    try:
        auth = TokenAuth(tokens.realm, tokens.service, tokens.issuer, tokens.cert)
        address = f"127.0.0.1:{free_port()}"
        log_path = tmp / "registry.log"
        proc = start_registry(tmp / "registry", address, log_path, auth)
        try:
            registry = RegistryHandle(address, tmp / "registry", log_path, tmp / "work")
            seed_registry(address, registry.work)
            yield registry, tokens
        finally:
            stop_registry(proc)
    finally:
        tokens.close()


class FlakyProxy:
    """A TCP proxy in front of a registry that cuts off the response to a request containing `marker`
    after `cut_after` bytes, the first `times` times: a real connection dropped mid-download."""

    def __init__(self, target: str, marker: bytes, cut_after: int, times: int) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._marker, self._cut_after, self.cuts_left = marker, cut_after, times
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_r, upstream_w = await asyncio.open_connection(*self._target)
        armed = asyncio.Event()

        async def requests() -> None:
            while data := await client_r.read(65536):
                if self._marker in data and self.cuts_left > 0:
                    self.cuts_left -= 1
                    armed.set()
                upstream_w.write(data)
                await upstream_w.drain()

        async def responses() -> None:
            sent = 0
            while data := await upstream_r.read(65536):
                if armed.is_set():
                    if sent + len(data) >= self._cut_after:
                        client_w.write(data[: self._cut_after - sent])
                        await client_w.drain()
                        return  # cut: both connections are closed below
                    sent += len(data)
                client_w.write(data)
                await client_w.drain()

        try:
            pumps = [asyncio.create_task(requests()), asyncio.create_task(responses())]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            client_w.close()
            upstream_w.close()
            self._tasks.discard(task)
