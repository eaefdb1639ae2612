"""The agent's image store: pull images from registries and keep them on local disk, each layer unpacked
once and shared by every image that uses it.

On-disk layout under the store root (one filesystem, so every rename is atomic):

    blobs/sha256/<hex>            compressed layers, configs and manifests, as the registry served them
    layers/sha256/<hex>/          a layer unpacked, keyed by its diff_id (sha256 of the uncompressed tar);
                                  an overlayfs lower dir, read-only by convention
    refs/<sha256 of reference>    one JSON record per normalised reference (tagged, and name@digest)

A blob, a layer directory or a record appears complete or not at all (temporary file/dir + rename), so a
crash mid-pull leaves only temporaries (named .download-* / .unpack-*), never a half layer.

Concurrent pulls in one process share the work: pulls of the same reference share one task, and a blob or
layer is fetched/unpacked under an asyncio lock keyed by its digest, so an image pulled twice at once, or two
images sharing a base layer, download and unpack it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.images import ImageError, RegistryError, RegistryUnreachable, StoreError
from agent.images.reference import Reference, parse
from agent.images.registry import Descriptor, EventHook, RegistryClient, RegistryConfig, Resolved
from agent.images.unpack import unpack_layer


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image's config the runtime uses."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # "K=V"
    workdir: str = ""
    user: str = ""


@dataclass(frozen=True)
class Image:
    """A pulled image, ready to run."""

    reference: str  # normalised, e.g. docker.io/library/busybox:latest
    digest: str  # what the reference resolved to: the manifest's (or the multi-platform index's) digest
    config: ImageConfig
    layers: tuple[Path, ...]  # unpacked layer dirs, lowest first


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RegistryError(f"image config field {what} is not a list of strings: {value!r}")
    return tuple(value)


def _image_config(config: Mapping[str, Any]) -> ImageConfig:
    inner = config.get("config") or {}
    if not isinstance(inner, dict):
        raise RegistryError("image config has a malformed 'config' section")
    return ImageConfig(
        entrypoint=_strings(inner.get("Entrypoint"), "Entrypoint"),
        cmd=_strings(inner.get("Cmd"), "Cmd"),
        env=_strings(inner.get("Env"), "Env"),
        workdir=str(inner.get("WorkingDir") or ""),
        user=str(inner.get("User") or ""),
    )


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a (possibly nested) group, preferring an ImageError."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return next((e for e in leaves if isinstance(e, ImageError)), leaves[0])


class ImageStore:
    """Local images under `root`, pulled through `config`'s registries. See the module docstring."""

    def __init__(
        self,
        root: Path,
        config: RegistryConfig,
        *,
        event_hooks: Mapping[str, list[EventHook]] | None = None,
        max_concurrent_downloads: int = 3,
        download_attempts: int = 3,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """event_hooks: httpx hooks for every registry request (tests count requests with them).
        A blob download cut off by the network is retried `download_attempts` times in all, after 0.5 s,
        1 s, ... (through `sleep`, injectable)."""
        self.root = root
        self.config = config
        self._event_hooks = event_hooks
        self._max_downloads = max_concurrent_downloads
        self._attempts = max(1, download_attempts)
        self._sleep = sleep
        self._blobs = root / "blobs" / "sha256"
        self._layers = root / "layers" / "sha256"
        self._refs = root / "refs"
        try:
            for directory in (self._blobs, self._layers, self._refs):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the image store in {root}: {err}") from err
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._inflight: dict[str, asyncio.Task[Image]] = {}
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        """Drop what a crashed pull left: temporaries are never used again. (One store object per root: the
        agent's; a second one opened while a pull runs would delete that pull's temporaries.)"""
        try:
            for directory in (self._blobs, self._layers, self._refs):
                for leftover in directory.glob(".*"):
                    if leftover.name.startswith((".download-", ".unpack-", ".tmp-")):
                        if leftover.is_dir() and not leftover.is_symlink():
                            shutil.rmtree(leftover)
                        else:
                            leftover.unlink()
        except OSError as err:
            raise StoreError(f"cannot clean the image store {self.root}: {err}") from err

    # -- paths and records ---------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self._blobs / _hex(digest)

    def layer_path(self, diff_id: str) -> Path:
        return self._layers / _hex(diff_id)

    def _record_path(self, reference: str) -> Path:
        return self._refs / hashlib.sha256(reference.encode()).hexdigest()

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with open(fd, "wb") as out:
                out.write(data)
            os.rename(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self, reference: str) -> Image | None:
        path = self._record_path(reference)
        try:
            record = json.loads(path.read_bytes())
            config = ImageConfig(
                entrypoint=tuple(record["config"]["entrypoint"]),
                cmd=tuple(record["config"]["cmd"]),
                env=tuple(record["config"]["env"]),
                workdir=record["config"]["workdir"],
                user=record["config"]["user"],
            )
            image = Image(
                reference=record["reference"],
                digest=record["digest"],
                config=config,
                layers=tuple(self.layer_path(d) for d in record["diff_ids"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(f"the store's record of {reference} ({path}) is damaged: {err}") from err
        if not all(layer.is_dir() for layer in image.layers):
            return None  # a layer was removed behind our back: pull again
        return image

    # -- public API ----------------------------------------------------------------------------------------

    def get(self, ref: str) -> Image | None:
        """The local image for `ref`, or None; never touches the network."""
        return self._load(str(parse(ref)))

    async def ensure(self, ref: str) -> Image:
        """The local image for `ref`, pulled first if it is not here."""
        return self.get(ref) or await self.pull(ref)

    async def pull(self, ref: str) -> Image:
        """Resolve `ref` at its registry and fetch whatever of it is missing locally."""
        parsed = parse(ref)
        key = str(parsed)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._pull(parsed))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._pulled(key, done))
        return await asyncio.shield(task)

    def _pulled(self, key: str, task: asyncio.Task[Image]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have been cancelled; the error reached any other

    def list(self) -> list[Image]:
        """Every image recorded in the store (tagged and by-digest references alike)."""
        images = []
        for path in sorted(self._refs.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                reference = json.loads(path.read_bytes())["reference"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise StoreError(f"the store record {path} is damaged: {err}") from err
            image = self._load(reference)
            if image is not None:
                images.append(image)
        return images

    # -- pulling -------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        async with lock:
            yield

    async def _pull(self, ref: Reference) -> Image:
        hooks = self._event_hooks
        async with RegistryClient(self.config, event_hooks=hooks) as client:
            resolved = await client.resolve(ref)
            manifest = resolved.manifest
            config_data = await self._config(client, resolved)
            try:
                config = json.loads(config_data)
                diff_ids = config["rootfs"]["diff_ids"]
            except (ValueError, KeyError, TypeError) as err:
                raise RegistryError(f"image config of {ref} is malformed: {err}") from err
            if not isinstance(diff_ids, list) or not all(
                isinstance(d, str) and d.startswith("sha256:") and len(d) == 71 for d in diff_ids
            ):
                raise RegistryError(f"image config of {ref} has malformed rootfs.diff_ids: {diff_ids!r}")
            if len(diff_ids) != len(manifest.layers):
                raise RegistryError(
                    f"image {ref} is inconsistent: {len(manifest.layers)} layers in the manifest but "
                    f"{len(diff_ids)} diff_ids in the config"
                )
            image_config = _image_config(config)
            await asyncio.to_thread(self._write_atomic, self.blob_path(manifest.digest), manifest.raw)

            downloads = asyncio.Semaphore(self._max_downloads)
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(self._layer(client, resolved, desc, diff_id, downloads))
                        for desc, diff_id in zip(manifest.layers, diff_ids, strict=True)
                    ]
            except BaseExceptionGroup as failed:
                raise _first_leaf(failed) from None
        image = Image(str(ref), resolved.digest, image_config, tuple(t.result() for t in tasks))
        record = {
            "reference": image.reference,
            "digest": image.digest,
            "manifest": manifest.digest,
            "config_digest": manifest.config.digest,
            "diff_ids": diff_ids,
            "config": {
                "entrypoint": list(image_config.entrypoint),
                "cmd": list(image_config.cmd),
                "env": list(image_config.env),
                "workdir": image_config.workdir,
                "user": image_config.user,
            },
        }
        pinned = str(ref.with_digest(resolved.digest))
        for reference in {image.reference, pinned}:
            data = json.dumps({**record, "reference": reference}, indent=1).encode()
            await asyncio.to_thread(self._write_atomic, self._record_path(reference), data)
        return image

    async def _config(self, client: RegistryClient, resolved: Resolved) -> bytes:
        desc = resolved.manifest.config
        path = self.blob_path(desc.digest)
        async with self._locked(desc.digest):
            try:
                return path.read_bytes()  # verified when it was written
            except FileNotFoundError:
                pass
            data = await client.fetch_blob(resolved, desc)
            await asyncio.to_thread(self._write_atomic, path, data)
            return data

    async def _layer(
        self,
        client: RegistryClient,
        resolved: Resolved,
        desc: Descriptor,
        diff_id: str,
        downloads: asyncio.Semaphore,
    ) -> Path:
        dest = self.layer_path(diff_id)
        if dest.is_dir():
            return dest
        async with self._locked(diff_id):
            if dest.is_dir():
                return dest
            blob = self.blob_path(desc.digest)
            async with self._locked(desc.digest):
                if not blob.exists():
                    await self._download(client, resolved, desc, blob, downloads)
            await asyncio.to_thread(unpack_layer, blob, dest, diff_id)
        return dest

    async def _download(
        self, client: RegistryClient, resolved: Resolved, desc: Descriptor, blob: Path, slots: asyncio.Semaphore
    ) -> None:
        delay = 0.5
        for attempt in range(1, self._attempts + 1):
            try:
                async with slots:
                    await client.download_blob(resolved, desc, blob)
                return
            except RegistryUnreachable:
                if attempt == self._attempts:
                    raise
            await self._sleep(delay)
            delay *= 2
