"""Images in and out of the store without a registry: OCI image-layout archives (save / load), a root
filesystem tarball made an image (import), and a container's writable layer made a new layer (commit).

    save_archive(store, refs, out)        one OCI image layout, as a tar, holding the images `refs`
    load_archive(store, archive, name)    every image of an OCI layout tar (skopeo's oci-archive, ours)
    import_tarball(store, tarball, name)  a rootfs tar (plain, gzip or zstd) as a one-layer image
    commit(store, upper, base, name)      an overlay upper dir on top of the image `base`

Archives are never trusted: only `oci-layout`, `index.json` and `blobs/sha256/<hex>` regular files are read,
each blob's content must match its name, and layers are unpacked by unpack.py's safe unpacker (and their
diff_ids checked). Image names come from the `io.containerd.image.name` annotation, else from
`org.opencontainers.image.ref.name` when it is a full reference, else from `name`.

commit turns overlayfs's form back into OCI's: a 0:0 character device is a `.wh.<name>` whiteout, a
directory with trusted.overlay.opaque=y gets a `.wh..wh..opq` entry.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from agent.images import InvalidLayer, RegistryError, StoreError
from agent.images.reference import parse
from agent.images.registry import INDEX_TYPES, OCI_INDEX, OCI_MANIFEST, host_platform
from agent.images.store import Image, ImageStore
from agent.images.unpack import OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX, diff_id_of, layer_media_type

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MAX_JSON_BYTES = 4 << 20
_CHUNK = 1 << 20


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- save --------------------------------------------------------------------------------------------------


def save_archive(store: ImageStore, refs: list[str], out: IO[bytes]) -> None:
    """Write the images `refs` as one OCI image-layout tar to `out` (a file or a pipe: it is streamed)."""
    entries: list[dict[str, Any]] = []
    blobs: dict[str, int] = {}
    for ref in refs:
        record = store.record(ref)
        if record is None:
            raise StoreError(f"no image {ref} on this host: pull it first")
        manifest = store.manifest_of(record)
        media_type = str(manifest.get("mediaType") or OCI_MANIFEST)
        raw_size = store.blob_path(record["manifest"]).stat().st_size
        name = parse(record["reference"])
        annotations = {CONTAINERD_NAME: str(name)}
        if name.tag is not None:
            annotations[REF_NAME] = name.tag
        entries.append(
            {"mediaType": media_type, "digest": record["manifest"], "size": raw_size, "annotations": annotations}
        )
        blobs[record["manifest"]] = raw_size
        for desc in [manifest["config"], *manifest["layers"]]:
            blobs[str(desc["digest"])] = int(desc["size"])
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_bytes(tar, "index.json", _canonical(index))
        info = tarfile.TarInfo("blobs")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        info = tarfile.TarInfo("blobs/sha256")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        for digest in blobs:
            path = store.blob_path(digest)
            info = tarfile.TarInfo(f"blobs/sha256/{digest.split(':', 1)[1]}")
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with open(path, "rb") as source:
                tar.addfile(info, source)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


# -- load --------------------------------------------------------------------------------------------------


def _read_layout(store: ImageStore, archive: IO[bytes]) -> tuple[dict[str, Any], set[str]]:
    """Stream the archive: blobs into the store (verified), index.json into memory."""
    index: dict[str, Any] | None = None
    blobs: set[str] = set()
    try:
        with tarfile.open(fileobj=archive, mode="r|*") as tar:
            for member in tar:
                name = member.name.removeprefix("./").strip("/")
                if member.isdir() or name in ("oci-layout", "blobs", "blobs/sha256", ""):
                    continue
                if not member.isfile():
                    continue  # links and devices have no place in a layout: ignored, never extracted
                source = tar.extractfile(member)
                assert source is not None
                if name == "index.json":
                    if member.size > MAX_JSON_BYTES:
                        raise RegistryError("the archive's index.json is too large")
                    index = json.loads(source.read())
                    continue
                parts = name.split("/")
                if len(parts) != 3 or parts[:2] != ["blobs", "sha256"] or len(parts[2]) != 64:
                    continue
                digest = "sha256:" + parts[2]
                _copy_blob(store, source, digest)
                blobs.add(digest)
    except (tarfile.TarError, EOFError, ValueError) as err:
        raise InvalidLayer(f"the archive is not an OCI image layout tar: {err}") from err
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise InvalidLayer("the archive has no index.json: it is not an OCI image layout (save with oci-archive)")
    return index, blobs


def _copy_blob(store: ImageStore, source: IO[bytes], digest: str) -> None:
    dest = store.blob_path(digest)
    fd, tmp = tempfile.mkstemp(prefix=".download-", dir=dest.parent)
    try:
        hasher = hashlib.sha256()
        with open(fd, "wb") as out:
            while chunk := source.read(_CHUNK):
                hasher.update(chunk)
                out.write(chunk)
        if "sha256:" + hasher.hexdigest() != digest:
            raise InvalidLayer(f"blob {digest} in the archive does not match its digest: the archive is corrupt")
        os.rename(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _blob_json(store: ImageStore, digest: str) -> tuple[dict[str, Any], bytes]:
    try:
        raw = store.blob_path(digest).read_bytes()
        return dict(json.loads(raw)), raw
    except (OSError, ValueError) as err:
        raise InvalidLayer(f"the archive lacks or has a malformed blob {digest}: {err}") from err


def _pick_manifest(store: ImageStore, entry: dict[str, Any]) -> str:
    """The image manifest digest an index entry leads to on this host."""
    want = host_platform()
    for _ in range(3):
        if entry.get("mediaType") not in INDEX_TYPES:
            return str(entry["digest"])
        index, _raw = _blob_json(store, str(entry["digest"]))
        matches = [
            m for m in index.get("manifests", [])
            if (m.get("platform") or {}).get("architecture") == want.architecture
            and (m.get("platform") or {}).get("os") == want.os
        ]
        if not matches:
            raise RegistryError(f"the archive has no image for this host's platform {want}")
        entry = matches[0]
    raise RegistryError("the archive's indexes are nested too deeply")


def _name_of(entry: dict[str, Any], name: str | None) -> str:
    annotations = entry.get("annotations") or {}
    if annotations.get(CONTAINERD_NAME):
        return str(annotations[CONTAINERD_NAME])
    ref_name = str(annotations.get(REF_NAME) or "")
    if ("/" in ref_name or ":" in ref_name) and not ref_name.startswith(":"):
        return ref_name
    if name:
        parsed = parse(name)
        if ref_name and parsed.tag == "latest" and ":" not in name.rsplit("/", 1)[-1]:
            return f"{parsed.name}:{ref_name}"
        return str(parsed)
    raise RegistryError(
        f"the archive names an image only {ref_name!r}" if ref_name else "the archive does not name its image"
    ) from None


async def load_archive(store: ImageStore, archive: IO[bytes], name: str | None = None) -> list[Image]:
    """Load every image of an OCI image-layout tar. `name` names an image the archive names only by tag
    (skopeo's oci-archive:FILE:TAG) or not at all."""
    import asyncio

    index, _blobs = await asyncio.to_thread(_read_layout, store, archive)
    images = []
    for entry in index["manifests"]:
        if not isinstance(entry, dict):
            continue
        reference = _name_of(entry, name)
        manifest_digest = _pick_manifest(store, entry)
        manifest, manifest_raw = _blob_json(store, manifest_digest)
        config_digest = str(manifest["config"]["digest"])
        config_raw = store.blob_path(config_digest).read_bytes()
        images.append(await store.add_image(reference, manifest_raw, config_raw))
    if not images:
        raise RegistryError("the archive holds no image")
    return images


# -- import and commit -------------------------------------------------------------------------------------


def _new_image(
    store: ImageStore, base: dict[str, Any] | None, base_manifest: dict[str, Any] | None, layer_blob: Path,
    media_type: str, diff_id: str, created_by: str, changes: dict[str, Any] | None = None,
) -> tuple[bytes, bytes]:
    """Move `layer_blob` into the store; the new image's (manifest, config) on top of `base` (a config)."""
    hasher = hashlib.sha256()
    size = 0
    with open(layer_blob, "rb") as source:
        while chunk := source.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    layer_digest = "sha256:" + hasher.hexdigest()
    os.rename(layer_blob, store.blob_path(layer_digest))
    platform = host_platform()
    config: dict[str, Any] = dict(base) if base is not None else {
        "architecture": platform.architecture, "os": platform.os, "config": {},
        "rootfs": {"type": "layers", "diff_ids": []}, "history": [],
    }
    config["created"] = _now()
    config["rootfs"] = {"type": "layers", "diff_ids": [*config.get("rootfs", {}).get("diff_ids", []), diff_id]}
    config["history"] = [*config.get("history", []), {"created": config["created"], "created_by": created_by}]
    if changes:
        config["config"] = {**(config.get("config") or {}), **changes}
    config_raw = _canonical(config)
    layers = list(base_manifest["layers"]) if base_manifest is not None else []
    layers.append({"mediaType": media_type, "digest": layer_digest, "size": size})
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _digest(config_raw), "size": len(config_raw)},
        "layers": layers,
    }
    return _canonical(manifest), config_raw


async def import_tarball(store: ImageStore, tarball: Path, name: str) -> Image:
    """A root filesystem tarball (plain, gzip or zstd) as a one-layer image named `name`. The tarball is
    moved into the store (it must be on the store's filesystem, e.g. written there by the caller)."""
    import asyncio

    parse(name)
    media_type = await asyncio.to_thread(layer_media_type, tarball)
    diff_id = await asyncio.to_thread(diff_id_of, tarball)
    manifest, config = await asyncio.to_thread(
        _new_image, store, None, None, tarball, media_type, diff_id, "berthctl import",
    )
    return await store.add_image(name, manifest, config)


def _whiteout(path: Path, st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            yield Path(dirpath) / name


def write_diff_tar(upper: Path, out: IO[bytes]) -> None:
    """The overlay upper dir `upper` as an OCI layer tar (uncompressed) on `out`."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk(upper):
            arcname = str(path.relative_to(upper))
            st = os.lstat(path)
            if _whiteout(path, st):
                info = tarfile.TarInfo(str(Path(arcname).parent / (WHITEOUT_PREFIX + path.name)).removeprefix("./"))
                info.mtime = int(st.st_mtime)
                tar.addfile(info)
                continue
            tar.add(path, arcname, recursive=False)
            if stat.S_ISDIR(st.st_mode) and _opaque(path):
                info = tarfile.TarInfo(f"{arcname}/{OPAQUE_MARKER}")
                info.mtime = int(st.st_mtime)
                tar.addfile(info)


def _commit_blob(upper: Path, workdir: Path) -> tuple[Path, str]:
    """gzip the diff of `upper` into a temporary file in `workdir`; returns it and the diff_id."""
    fd, tmp = tempfile.mkstemp(prefix=".download-", dir=workdir)
    diff = hashlib.sha256()

    class Tee:
        def __init__(self, inner: IO[bytes]) -> None:
            self.inner = inner

        def write(self, data: bytes) -> int:
            diff.update(data)
            return self.inner.write(data)

    try:
        with open(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0) as gz:
            write_diff_tar(upper, Tee(gz))  # type: ignore[arg-type]
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), "sha256:" + diff.hexdigest()


async def commit(
    store: ImageStore, upper: Path, base: str, name: str, changes: dict[str, Any] | None = None
) -> Image:
    """A new image `name`: the image `base` plus the overlay upper dir `upper` as one more layer."""
    import asyncio

    parse(name)
    record = store.record(base)
    if record is None:
        raise StoreError(f"the container's image {base} is no longer on this host; cannot commit on top of it")
    if not upper.is_dir():
        raise StoreError(f"the container has no writable layer at {upper}")
    base_manifest = store.manifest_of(record)
    base_config = json.loads(store.blob_path(record["config_digest"]).read_bytes())
    blob, diff_id = await asyncio.to_thread(_commit_blob, upper, store.blob_path(record["manifest"]).parent)
    try:
        manifest, config = await asyncio.to_thread(
            _new_image, store, base_config, base_manifest, blob, OCI_LAYER_GZIP, diff_id, "berthctl commit",
            changes,
        )
    finally:
        blob.unlink(missing_ok=True)
    return await store.add_image(name, manifest, config)


__all__ = ["commit", "import_tarball", "load_archive", "save_archive", "write_diff_tar"]
