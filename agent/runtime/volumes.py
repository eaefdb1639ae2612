"""Named volumes on one host, with Docker's local-driver semantics: a volume is a directory on this host,
made by `volume create` or on first use by a container (`-v data:/data`), kept across the container's `rm`,
and deleted only by `volume rm`, which refuses while any container on the host (running or not) uses it.

    <state-dir>/volumes/<name>/volume.json   {"name", "created_at_ns", "labels"}
    <state-dir>/volumes/<name>/_data/        what the container sees at its mount point

Exceptions:

    VolumeError            base; the message is meant for a user
     +-- VolumeNotFound    no such volume on this host
     +-- VolumeInUse       `rm` of a volume that a container still uses
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.runtime.mounts import COPY_UP, VOLUME_NAME_RE, Mount


class VolumeError(Exception):
    """A volume operation that cannot be done; the message says why."""


class VolumeNotFound(VolumeError):
    pass


class VolumeInUse(VolumeError):
    pass


@dataclass(frozen=True)
class Volume:
    name: str
    mountpoint: Path  # the host directory containers see
    created_at_ns: int = 0
    labels: dict[str, str] = field(default_factory=dict)


class VolumeStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, name: str) -> Path:
        if not VOLUME_NAME_RE.match(name):
            raise VolumeError(f"invalid volume name {name!r}: use letters, digits, '_', '.' and '-'")
        return self.root / name

    def create(self, name: str, labels: dict[str, str] | None = None) -> Volume:
        """Create the volume, or return it as it is if it exists (as `docker volume create`)."""
        d = self._dir(name)
        try:
            return self.get(name)
        except VolumeNotFound:
            pass
        (d / "_data").mkdir(parents=True, exist_ok=True)
        meta = {"name": name, "created_at_ns": time.time_ns(), "labels": dict(labels or {})}
        tmp = d / ".volume.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, d / "volume.json")
        return self.get(name)

    def get(self, name: str) -> Volume:
        d = self._dir(name)
        try:
            meta = json.loads((d / "volume.json").read_text())
        except FileNotFoundError:
            raise VolumeNotFound(f"no such volume: {name}") from None
        return Volume(name, d / "_data", int(meta.get("created_at_ns", 0)), dict(meta.get("labels", {})))

    def list(self) -> list[Volume]:
        try:
            names = sorted(p.name for p in self.root.iterdir() if (p / "volume.json").exists())
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            with contextlib.suppress(VolumeError):
                out.append(self.get(name))
        return out

    def remove(self, name: str, users: builtins.list[str]) -> None:
        """Delete the volume and its data; `users` are the containers on this host that mount it."""
        self.get(name)
        if users:
            raise VolumeInUse(
                f"volume {name} is in use by container {', '.join(u[:12] for u in users)}: remove it first"
            )
        shutil.rmtree(self._dir(name))


def resolve(store: VolumeStore, mounts: tuple[Mount, ...]) -> tuple[Mount, ...]:
    """The mounts with each named volume turned into a bind of its directory (made on first use)."""
    out = []
    for m in mounts:
        if m.kind == "volume":
            path = str(store.create(m.source).mountpoint)
            out.append(Mount("bind", m.target, path, m.read_only, options=COPY_UP))
        else:
            out.append(m)
    return tuple(out)


def users(state_dir_containers: Path, name: str) -> list[str]:
    """Ids of the containers on this host whose config mounts the volume `name`."""
    out = []
    try:
        entries = sorted(state_dir_containers.iterdir())
    except FileNotFoundError:
        return []
    for d in entries:
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (FileNotFoundError, ValueError):
            continue
        if any(m.get("kind") == "volume" and m.get("source") == name for m in cfg.get("mounts", ())):
            out.append(d.name)
    return out
