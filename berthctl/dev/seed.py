"""Seed images for the dev registry and the tests, built without internet from Debian's static busybox.

    build_busybox_layout(dest)                   an OCI image layout holding busybox:latest
    push_layout(layout, tag, registry, image)    skopeo copy it into a registry (plain HTTP)
    seed_registry(registry, work_dir)            both, for library/busybox:latest, layout cached in work_dir

Images are built in Python (tarfile, gzip, hashlib, json) and are deterministic: fixed mtimes, owners and
entry order, gzip without a timestamp, canonical JSON, so the same busybox binary always gives the same
digests. `tar_layer` and `write_image` are public so tests can build other images (extra layers, whiteouts,
hostile archives) the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.images.registry import OCI_MANIFEST, host_platform

BUSYBOX = Path("/bin/busybox")
SKOPEO = "/usr/bin/skopeo"
FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z
FIXED_CREATED = "2000-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


class SeedError(RuntimeError):
    """Building or pushing a seed image failed; the message says which step and why."""


@dataclass(frozen=True)
class Entry:
    """One tar entry. kind: file, dir, symlink, hardlink, char (major/minor), fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""  # symlink or hard link target
    uid: int = 0
    gid: int = 0
    major: int = 0
    minor: int = 0
    mtime: int = FIXED_MTIME


_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_layer(entries: Iterable[Entry]) -> bytes:
    """An uncompressed layer tar of `entries`, in the order given, written exactly as named (no cleaning, so
    tests can write hostile names)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = _KINDS[entry.kind]
            info.mode = entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.uname = info.gname = "root" if entry.uid == 0 else ""
            info.mtime = entry.mtime
            info.linkname = entry.target
            info.devmajor, info.devminor = entry.major, entry.minor
            if entry.kind == "file":
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                tar.addfile(info)
    return out.getvalue()


def gzip_layer(tar: bytes) -> bytes:
    """Deterministic gzip (no name, mtime 0)."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
        gz.write(tar)
    return out.getvalue()


def _canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_image(
    layout: Path,
    tag: str,
    layers: Sequence[bytes],
    config: Mapping[str, Any] | None = None,
    architecture: str | None = None,
) -> str:
    """Add an image to the OCI layout `layout` (created if needed) under `tag`, replacing an older image with
    that tag. `layers` are uncompressed tars, lowest first; they are stored gzip-compressed. `config` is the
    image config's "config" section (Cmd, Env, ...). Returns the manifest digest."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descriptors, diff_ids = [], []
    for tar in layers:
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        descriptors.append({"mediaType": OCI_LAYER_GZIP, **_put_blob(layout, gzip_layer(tar))})
    image_config = {
        "created": FIXED_CREATED,
        "architecture": architecture or host_platform().architecture,
        "os": "linux",
        "config": dict(config or {}),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": FIXED_CREATED, "created_by": "berth seed"} for _ in layers],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **_put_blob(layout, _canonical(image_config))},
        "layers": descriptors,
    }
    manifest_desc = {"mediaType": OCI_MANIFEST, **_put_blob(layout, _canonical(manifest))}
    _set_tag(layout, tag, manifest_desc)
    return str(manifest_desc["digest"])


def _set_tag(layout: Path, tag: str, descriptor: Mapping[str, Any]) -> None:
    index_path = layout / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    kept = [m for m in index["manifests"] if (m.get("annotations") or {}).get(REF_NAME) != tag]
    index["manifests"] = [*kept, {**descriptor, "annotations": {REF_NAME: tag}}]
    index_path.write_bytes(_canonical(index))


def write_index(layout: Path, tag: str, manifests: Sequence[tuple[str, Mapping[str, str]]]) -> str:
    """Tag, in `layout`, a multi-platform index of manifests already in it: (digest, platform) pairs, the
    platform as {"os": ..., "architecture": ..., "variant": ...}. Returns the index digest."""
    entries = []
    for digest, plat in manifests:
        size = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).stat().st_size
        entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size, "platform": dict(plat)})
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    descriptor = {"mediaType": OCI_INDEX, **_put_blob(layout, _canonical(index))}
    _set_tag(layout, tag, descriptor)
    return str(descriptor["digest"])


def busybox_entries() -> list[Entry]:
    """The entries of the busybox base layer: the static binary, one symlink per applet, a minimal /etc."""
    try:
        binary = BUSYBOX.read_bytes()
        listed = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, check=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise SeedError(f"cannot read the busybox binary {BUSYBOX} (apt-get install busybox-static): {err}") from err
    applets = sorted({a.strip() for a in listed.stdout.split() if a.strip() and a.strip() != "busybox"})
    entries = [
        Entry("bin/", "dir", mode=0o755),
        Entry("dev/", "dir", mode=0o755),
        Entry("etc/", "dir", mode=0o755),
        Entry("proc/", "dir", mode=0o755),
        Entry("root/", "dir", mode=0o700),
        Entry("sys/", "dir", mode=0o755),
        Entry("tmp/", "dir", mode=0o1777),
        Entry("bin/busybox", data=binary, mode=0o755),
    ]
    entries += [Entry(f"bin/{applet}", "symlink", target="busybox", mode=0o777) for applet in applets]
    entries += [
        Entry("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n"),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
    ]
    return entries


BUSYBOX_CONFIG: Mapping[str, Any] = {"Cmd": ["sh"], "Env": [PATH_ENV]}


def build_busybox_layout(dest: Path, tag: str = "latest") -> None:
    """Write an OCI image layout of busybox under `tag` into `dest`."""
    write_image(dest, tag, [tar_layer(busybox_entries())], BUSYBOX_CONFIG)


def push_layout(
    layout: Path, tag: str, registry: str, image: str = "library/busybox", *, all_platforms: bool = False
) -> None:
    """Copy `layout`'s image `tag` to docker://<registry>/<image>:<tag>, over plain HTTP, digests kept.
    all_platforms: the tag is an index; copy it and every manifest it lists."""
    command = [
        SKOPEO, "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
        *(["--all"] if all_platforms else []),
        f"oci:{layout}:{tag}", f"docker://{registry}/{image}:{tag}",
    ]  # fmt: skip
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SeedError(f"cannot run {' '.join(command)}: {err}") from err
    if result.returncode != 0:
        raise SeedError(
            f"pushing {image}:{tag} to {registry} failed (skopeo exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )


def seed_registry(registry: str, work_dir: Path) -> None:
    """Push busybox as library/busybox:latest to `registry`; the layout is cached in `work_dir`, keyed by the
    busybox binary's digest."""
    try:
        key = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()[:16]
    except OSError as err:
        raise SeedError(f"cannot read the busybox binary {BUSYBOX}: {err}") from err
    layout = work_dir / f"busybox-{key}"
    if not (layout / "index.json").exists():
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".busybox-", dir=work_dir))
        try:
            build_busybox_layout(tmp)
            tmp.rename(layout)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    push_layout(layout, "latest", registry)
