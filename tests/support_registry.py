"""A real docker-registry for tests: started on 127.0.0.1:<free port> in a temporary directory, seeded with
busybox, stopped even when the test fails. Import `running_registry` and wrap it in a fixture.

Also small helpers to push extra images and to count the HTTP requests an ImageStore makes.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from agent.images.registry import EventHook
from berthctl.dev.registry import start_registry, stop_registry, storage_dir
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
