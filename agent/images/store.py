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
import builtins
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.images import ImageError, RegistryError, RegistryUnreachable, StoreError
from agent.images.reference import Reference, parse
from agent.images.registry import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    Descriptor,
    EventHook,
    RegistryClient,
    RegistryConfig,
    Resolved,
)
from agent.images.unpack import unpack_layer

Progress = Callable[[str, str, int, int], None]


def _no_progress(digest: str, phase: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image's config the runtime uses."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # "K=V"
    workdir: str = ""
    user: str = ""
    # issue 6: the image's HEALTHCHECK (Docker's config.Healthcheck), run when the container gives none:
    # ("CMD-SHELL", "...") or ("CMD", ...) or ("NONE",); durations in seconds, 0 for the default
    health_test: tuple[str, ...] = ()
    health_interval_s: float = 0.0
    health_timeout_s: float = 0.0
    health_start_period_s: float = 0.0
    health_retries: int = 0

    def record(self) -> dict[str, Any]:
        """As an image record keeps it (read back by `from_record`)."""
        return {"entrypoint": list(self.entrypoint), "cmd": list(self.cmd), "env": list(self.env),
                "workdir": self.workdir, "user": self.user,
                "healthcheck": {"test": list(self.health_test), "interval_s": self.health_interval_s,
                                "timeout_s": self.health_timeout_s, "start_period_s": self.health_start_period_s,
                                "retries": self.health_retries}}

    @classmethod
    def from_record(cls, config: Mapping[str, Any]) -> ImageConfig:
        hc = config.get("healthcheck") or {}  # none in records written before issue 6's image checks
        return cls(entrypoint=tuple(config["entrypoint"]), cmd=tuple(config["cmd"]), env=tuple(config["env"]),
                   workdir=config["workdir"], user=config["user"], health_test=tuple(hc.get("test", ())),
                   health_interval_s=float(hc.get("interval_s", 0.0)), health_timeout_s=float(hc.get("timeout_s", 0.0)),
                   health_start_period_s=float(hc.get("start_period_s", 0.0)), health_retries=int(hc.get("retries", 0)))


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
    hc = inner.get("Healthcheck") or {}
    if not isinstance(hc, dict):
        raise RegistryError("image config has a malformed 'Healthcheck' section")
    try:
        durations = {k: int(hc.get(k) or 0) / 1e9 for k in ("Interval", "Timeout", "StartPeriod")}  # Go ns
        retries = int(hc.get("Retries") or 0)
    except (TypeError, ValueError):
        raise RegistryError(f"image config has a malformed Healthcheck: {hc!r}") from None
    return ImageConfig(
        entrypoint=_strings(inner.get("Entrypoint"), "Entrypoint"),
        cmd=_strings(inner.get("Cmd"), "Cmd"),
        env=_strings(inner.get("Env"), "Env"),
        workdir=str(inner.get("WorkingDir") or ""),
        user=str(inner.get("User") or ""),
        health_test=_strings(hc.get("Test"), "Healthcheck.Test"),
        health_interval_s=durations["Interval"], health_timeout_s=durations["Timeout"],
        health_start_period_s=durations["StartPeriod"], health_retries=retries,
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
        self._links = root / "l"
        try:
            for directory in (self._blobs, self._layers, self._refs, self._links):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the image store in {root}: {err}") from err
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._inflight: dict[str, asyncio.Task[Image]] = {}
        # issue 6: images found by get(), by the reference as given; emptied whenever a record is written or
        # removed, or layers are collected (this object is the only writer of its records, see
        # _remove_temporaries), so a start does not read and parse a record from disk each time
        self._found: dict[str, Image] = {}
        self._writers = 0  # pulls, loads, imports, commits running: GC waits for them, and they for GC
        self._collecting = False
        self._gc_turn = asyncio.Condition()
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        """Drop what a crashed pull left: temporaries are never used again. (One store object per root: the
        agent's; a second one opened while a pull runs would delete that pull's temporaries.)"""
        try:
            for directory in (self._blobs, self._layers, self._refs, self._links):
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

    def layer_link(self, diff_id: str) -> Path:
        """A short name for the layer (l/<12 hex>, a symlink to its directory), made when missing. Images
        hand these to the runtime: overlayfs's mount options fit in one page, and with full layer paths
        only ~38 layers would fit; with these, over 100."""
        link = self._links / _hex(diff_id)[:12]
        if not link.is_symlink():
            tmp = self._links / f".tmp-{_hex(diff_id)[:12]}-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            os.symlink(self.layer_path(diff_id), tmp)
            os.rename(tmp, link)
        return link

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
            config = ImageConfig.from_record(record["config"])
            image = Image(
                reference=record["reference"],
                digest=record["digest"],
                config=config,
                layers=tuple(self.layer_link(d) for d in record["diff_ids"]),
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
        image = self._found.get(ref)
        if image is None:
            image = self._load(str(parse(ref)))
            if image is not None:
                if len(self._found) >= 256:
                    self._found.clear()
                self._found[ref] = image
        return image

    async def ensure(self, ref: str) -> Image:
        """The local image for `ref`, pulled first if it is not here."""
        return self.get(ref) or await self.pull(ref)

    async def pull(self, ref: str, progress: Progress | None = None) -> Image:
        """Resolve `ref` at its registry and fetch whatever of it is missing locally. `progress` is called
        with (layer digest, phase, bytes done, bytes total) as layers download and unpack (phases:
        "waiting", "downloading", "unpacking", "done", "exists"), only by the pull that does the work."""
        parsed = parse(ref)
        key = str(parsed)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._pull(parsed, progress or _no_progress))
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

    async def _pull(self, ref: Reference, progress: Progress) -> Image:
        async with self._writing():
            return await self._pull_locked(ref, progress)

    async def _pull_locked(self, ref: Reference, progress: Progress) -> Image:
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
                    for desc, diff_id in zip(manifest.layers, diff_ids, strict=True):
                        group.create_task(self._layer(client, resolved, desc, diff_id, downloads, progress))
            except BaseExceptionGroup as failed:
                raise _first_leaf(failed) from None
        links = tuple(self.layer_link(d) for d in diff_ids)
        image = Image(str(ref), resolved.digest, image_config, links)
        record = {
            "reference": image.reference,
            "digest": image.digest,
            "created_ns": time.time_ns(),
            "manifest": manifest.digest,
            "config_digest": manifest.config.digest,
            "diff_ids": diff_ids,
            "config": image_config.record(),
        }
        pinned = str(ref.with_digest(resolved.digest))
        for reference in {image.reference, pinned}:
            data = json.dumps({**record, "reference": reference}, indent=1).encode()
            await asyncio.to_thread(self._write_atomic, self._record_path(reference), data)
            self._found.clear()
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
        progress: Progress,
    ) -> Path:
        dest = self.layer_path(diff_id)
        blob = self.blob_path(desc.digest)
        if dest.is_dir() and blob.exists():
            progress(desc.digest, "exists", desc.size, desc.size)
            return dest
        progress(desc.digest, "waiting", 0, desc.size)
        async with self._locked(diff_id):
            async with self._locked(desc.digest):
                if not blob.exists():
                    await self._download(client, resolved, desc, blob, downloads, progress)
            if not dest.is_dir():
                progress(desc.digest, "unpacking", desc.size, desc.size)
                await asyncio.to_thread(unpack_layer, blob, dest, diff_id)
        progress(desc.digest, "done", desc.size, desc.size)
        return dest

    async def _download(
        self, client: RegistryClient, resolved: Resolved, desc: Descriptor, blob: Path, slots: asyncio.Semaphore,
        progress: Progress = lambda *_: None,
    ) -> None:
        delay = 0.5
        for attempt in range(1, self._attempts + 1):
            try:
                async with slots:
                    await client.download_blob(
                        resolved, desc, blob, lambda done: progress(desc.digest, "downloading", done, desc.size)
                    )
                return
            except RegistryUnreachable:
                if attempt == self._attempts:
                    raise
            await self._sleep(delay)
            delay *= 2

    # -- records, tags, removal, garbage collection (issue 4) ----------------------------------------------

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """Held by whatever adds blobs or layers: garbage collection never runs at the same time."""
        async with self._gc_turn:
            await self._gc_turn.wait_for(lambda: not self._collecting)
            self._writers += 1
        try:
            yield
        finally:
            async with self._gc_turn:
                self._writers -= 1
                self._gc_turn.notify_all()

    def record(self, ref: str) -> dict[str, Any] | None:
        """The store's JSON record for `ref` (a reference, or an image id: a config digest or a prefix of
        its hex of 12 or more characters), or None."""
        text = ref.removeprefix("sha256:")
        if len(text) >= 12 and all(c in "0123456789abcdef" for c in text):
            for record in self.records():
                if _hex(record["config_digest"]).startswith(text):
                    return record
        try:
            path = self._record_path(str(parse(ref)))
            return dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise StoreError(f"the store's record of {ref} is damaged: {err}") from err

    def records(self) -> builtins.list[dict[str, Any]]:
        found = []
        for path in sorted(self._refs.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                found.append(dict(json.loads(path.read_bytes())))
            except (OSError, ValueError) as err:
                raise StoreError(f"the store record {path} is damaged: {err}") from err
        return found

    def manifest_of(self, record: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return dict(json.loads(self.blob_path(record["manifest"]).read_bytes()))
        except (OSError, ValueError) as err:
            raise StoreError(f"the manifest of {record['reference']} is missing from the store: {err}") from err

    def image_size(self, record: Mapping[str, Any]) -> int:
        """Bytes of the image's blobs (compressed layers, config, manifest)."""
        manifest = self.manifest_of(record)
        return int(manifest["config"]["size"]) + sum(int(layer["size"]) for layer in manifest["layers"])

    def _put_record(self, record: Mapping[str, Any]) -> None:
        self._write_atomic(self._record_path(record["reference"]), json.dumps(record, indent=1).encode())

    def tag(self, source: str, target: str) -> str:
        """Give the image `source` the name `target` too; returns the normalised target."""
        record = self.record(source)
        if record is None:
            raise StoreError(f"no image {source} on this host: pull it first")
        name = parse(target)
        if name.digest is not None:
            raise StoreError(f"cannot tag with a digest ({target}): give NAME[:TAG]")
        self._put_record({**record, "reference": str(name), "created_ns": time.time_ns()})
        self._found.clear()
        return str(name)

    def remove(self, ref: str, in_use: set[str], *, force: bool = False) -> builtins.list[str]:
        """Remove the name `ref` (and, when no other tag names the same image, its name@digest record).
        An image that a container uses is kept unless `force` (the container keeps its layers: they are
        only collected once no container uses them). `in_use`: diff_ids of layers containers use.
        Returns the references removed; run collect() afterwards to free the disk."""
        record = self.record(ref)
        if record is None:
            raise StoreError(f"no image {ref} on this host (berthctl images lists them)")
        if not force and record["diff_ids"] and set(record["diff_ids"]) <= in_use:
            raise StoreError(
                f"image {record['reference']} is used by a container on this host: remove the container first, "
                "or force it (rmi -f)"
            )
        same = [r for r in self.records() if r["manifest"] == record["manifest"]]
        pinned = [r for r in same if "@" in r["reference"]]
        tagged = [r for r in same if "@" not in r["reference"]]
        victims = [record]
        if "@" in record["reference"]:
            victims = same  # removing by digest removes every name of the image
        elif len(tagged) == 1:
            victims += pinned
        removed = []
        for victim in victims:
            self._record_path(victim["reference"]).unlink(missing_ok=True)
            removed.append(victim["reference"])
        self._found.clear()
        return removed

    def usage(self) -> int:
        """Bytes of blobs in the store (unpacked layers take about as much again, uncompressed)."""
        return sum(p.stat().st_size for p in self._blobs.iterdir() if not p.name.startswith("."))

    async def collect(self, in_use: set[str], *, unused_images: bool = False) -> tuple[builtins.list[str], int]:
        """Garbage collection: drop blobs and layer directories that no image record and no container
        (`in_use`: diff_ids) needs. unused_images: first remove every image no container uses (prune -a).
        Waits for running pulls to finish, and pulls started meanwhile wait for it.
        Returns (references removed, bytes of blobs freed)."""
        async with self._gc_turn:
            await self._gc_turn.wait_for(lambda: not self._collecting and self._writers == 0)
            self._collecting = True
        try:
            return await asyncio.to_thread(self._collect, in_use, unused_images)
        finally:
            self._found.clear()  # records and layers may be gone
            async with self._gc_turn:
                self._collecting = False
                self._gc_turn.notify_all()

    def _collect(self, in_use: set[str], unused_images: bool) -> tuple[builtins.list[str], int]:
        removed: builtins.list[str] = []
        if unused_images:
            for record in self.records():
                if not (record["diff_ids"] and set(record["diff_ids"]) <= in_use):
                    self._record_path(record["reference"]).unlink(missing_ok=True)
                    removed.append(record["reference"])
        blobs: set[str] = set()
        layers: set[str] = {_hex(d) for d in in_use}
        for record in self.records():
            blobs |= {_hex(record["manifest"]), _hex(record["config_digest"])}
            layers |= {_hex(d) for d in record["diff_ids"]}
            try:
                manifest = self.manifest_of(record)
                blobs |= {_hex(layer["digest"]) for layer in manifest["layers"]}
            except StoreError:
                continue
        freed = 0
        for path in self._blobs.iterdir():
            if not path.name.startswith(".") and path.name not in blobs:
                freed += path.stat().st_size
                path.unlink()
        for path in self._layers.iterdir():
            if not path.name.startswith(".") and path.name not in layers:
                shutil.rmtree(path)
        for link in self._links.iterdir():
            if not link.name.startswith(".") and not link.exists():
                link.unlink()
        return removed, freed

    async def enforce_high_water(self, limit_bytes: int, in_use: set[str]) -> builtins.list[str]:
        """When the store's blobs take more than `limit_bytes`, remove the least recently pulled images no
        container uses until they fit (or nothing more can go). Returns the references removed."""
        if limit_bytes <= 0 or self.usage() <= limit_bytes:
            return []
        removed: builtins.list[str] = []
        candidates = sorted(self.records(), key=lambda r: int(r.get("created_ns", 0)))
        for record in candidates:
            if record["diff_ids"] and set(record["diff_ids"]) <= in_use:
                continue
            self._record_path(record["reference"]).unlink(missing_ok=True)
            self._found.clear()
            removed.append(record["reference"])
            await self.collect(in_use)
            if self.usage() <= limit_bytes:
                break
        return removed

    async def add_image(self, reference: str, manifest: bytes, config: bytes) -> Image:
        """Record an image whose blobs are already in the store (load, import, commit): its layers are
        unpacked when missing. `manifest` and `config` are written as blobs."""
        async with self._writing():
            return await self._add_image(reference, manifest, config)

    async def _add_image(self, reference: str, manifest_raw: bytes, config_raw: bytes) -> Image:
        ref = parse(reference)
        try:
            manifest = json.loads(manifest_raw)
            config = json.loads(config_raw)
            diff_ids = list(config["rootfs"]["diff_ids"])
            layers = list(manifest["layers"])
        except (ValueError, KeyError, TypeError) as err:
            raise RegistryError(f"image {reference} has a malformed manifest or config: {err}") from err
        if len(diff_ids) != len(layers):
            raise RegistryError(f"image {reference} has {len(layers)} layers but {len(diff_ids)} diff_ids")
        manifest_digest = "sha256:" + hashlib.sha256(manifest_raw).hexdigest()
        config_digest = "sha256:" + hashlib.sha256(config_raw).hexdigest()
        if manifest["config"]["digest"] != config_digest:
            raise RegistryError(f"image {reference}: the manifest names config {manifest['config']['digest']}")
        await asyncio.to_thread(self._write_atomic, self.blob_path(manifest_digest), manifest_raw)
        await asyncio.to_thread(self._write_atomic, self.blob_path(config_digest), config_raw)
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            dest = self.layer_path(diff_id)
            async with self._locked(diff_id):
                if not dest.is_dir():
                    blob = self.blob_path(layer["digest"])
                    if not blob.exists():
                        raise RegistryError(f"image {reference}: layer {layer['digest']} is missing")
                    await asyncio.to_thread(unpack_layer, blob, dest, diff_id)
        image_config = _image_config(config)
        pinned = str(ref.with_digest(manifest_digest))
        record = {
            "reference": str(ref), "digest": manifest_digest, "created_ns": time.time_ns(),
            "manifest": manifest_digest, "config_digest": config_digest, "diff_ids": diff_ids,
            "config": image_config.record(),
        }
        for name in {str(ref), pinned}:
            await asyncio.to_thread(self._put_record, {**record, "reference": name})
            self._found.clear()  # here, in the event loop, once the record is in place
        return Image(str(ref), manifest_digest, image_config, tuple(self.layer_link(d) for d in diff_ids))

    async def push(self, ref: str, target: str | None = None, progress: Progress | None = None) -> str:
        """Push the local image `ref` to its registry (or as `target`), blobs the registry lacks first,
        then the manifest, unchanged, so its digest is kept. Returns the manifest digest."""
        record = self.record(ref)
        if record is None:
            raise StoreError(f"no image {ref} on this host: pull, tag or commit it first")
        dest = parse(target or record["reference"])
        if "@" in record["reference"] and target is None:
            raise StoreError(f"{ref} has no tag to push to: tag it first (berthctl tag {ref} NAME:TAG)")
        manifest = self.manifest_of(record)
        raw = self.blob_path(record["manifest"]).read_bytes()
        media_type = str(manifest.get("mediaType") or OCI_MANIFEST)
        if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
            media_type = OCI_MANIFEST
        report = progress or _no_progress
        async with RegistryClient(self.config, event_hooks=self._event_hooks, push=True) as client:
            endpoint = client.push_endpoint(dest)
            blobs = [manifest["config"], *manifest["layers"]]
            for desc in blobs:
                digest, size = str(desc["digest"]), int(desc["size"])
                done = 0

                def step(n: int, digest: str = digest, size: int = size) -> None:
                    nonlocal done
                    done += n
                    report(digest, "pushing", min(done, size), size)

                await client.upload_blob(endpoint, dest, digest, self.blob_path(digest), step)
                report(digest, "done", size, size)
            await client.put_manifest(endpoint, dest, media_type, raw)
        return str(record["manifest"])
