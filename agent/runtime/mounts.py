"""A container's extra mounts: bind mounts (`-v /host/dir:/dir[:ro]`), named volumes (`-v data:/data`,
see agent.runtime.volumes) and tmpfs (`--tmpfs /run[:OPTIONS]`), parsed from what the user wrote and
mounted inside the container's mount namespace by its PID 1 (after /proc, /dev and /sys, before
pivot_root), shallowest target first.

Targets are made inside the rootfs one component at a time, and a symlink on the way is refused: following
an image's symlink would mount onto whatever it points at, possibly outside the rootfs. Like every mount of
the container these live in its mount namespace only and vanish with it.

Exceptions: MountError for what the user wrote; OSError (errno, path) from the kernel in the child.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import stat
from dataclasses import dataclass

from agent.runtime import syscalls as sc

VOLUME_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_TMPFS_FLAGS = {
    "ro": (sc.MS_RDONLY, 0), "rw": (0, sc.MS_RDONLY),
    "noexec": (sc.MS_NOEXEC, 0), "exec": (0, sc.MS_NOEXEC),
    "nosuid": (sc.MS_NOSUID, 0), "suid": (0, sc.MS_NOSUID),
    "nodev": (sc.MS_NODEV, 0), "dev": (0, sc.MS_NODEV),
}
_TMPFS_DATA = ("size", "mode", "uid", "gid", "nr_inodes")
_TMPFS_DEFAULT_FLAGS = sc.MS_NOEXEC | sc.MS_NOSUID | sc.MS_NODEV  # Docker's --tmpfs defaults
# Mount.options of a bind made from a named volume (agent.runtime.volumes.resolve): an empty volume first
# gets what the image has at the mount point (copy_up).
COPY_UP = "volume-copy-up"


class MountError(Exception):
    """A mount option the user wrote that cannot work; the message says what to write instead."""


@dataclass(frozen=True)
class Mount:
    kind: str  # "bind" | "volume" | "tmpfs"
    target: str  # absolute path inside the container
    # bind: absolute host path; volume: the volume's name (its host path comes from VolumeStore); tmpfs: "".
    source: str = ""
    read_only: bool = False
    # tmpfs: mount options as the user wrote them, e.g. "size=64m,mode=1777"; a resolved volume: COPY_UP.
    options: str = ""


def _target(text: str, what: str) -> str:
    if not text.startswith("/"):
        raise MountError(f"invalid {what}: the path in the container must be absolute, got {text!r}")
    norm = posixpath.normpath(text)
    if norm == "/":
        raise MountError(f"invalid {what}: cannot mount over the container's root /")
    return norm


def parse_volume(text: str) -> Mount:
    """`-v SRC:DST[:ro|rw]`: SRC absolute is a bind mount of a host path, otherwise a named volume."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise MountError(f"invalid -v {text!r}: write -v NAME:/path, -v /host/path:/path, optionally :ro")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise MountError(f"invalid -v {text!r}: the mode after the second ':' is ro or rw, not {mode!r}")
    src, dst = parts[0], _target(parts[1], f"-v {text!r}")
    if src.startswith("/"):
        return Mount("bind", dst, posixpath.normpath(src), mode == "ro")
    if not VOLUME_NAME_RE.match(src):
        raise MountError(
            f"invalid volume name {src!r} in -v {text!r}: use letters, digits, '_', '.' and '-' "
            "(or an absolute host path for a bind mount)"
        )
    return Mount("volume", dst, src, mode == "ro")


def parse_tmpfs(text: str) -> Mount:
    """`--tmpfs DST[:OPTIONS]` with OPTIONS among ro rw exec noexec suid nosuid dev nodev size= mode= uid=
    gid= nr_inodes=; noexec, nosuid and nodev by default, as Docker."""
    dst, _, opts = text.partition(":")
    target = _target(dst, f"--tmpfs {text!r}")
    tmpfs_options(opts, text)
    return Mount("tmpfs", target, "", False, opts)


def tmpfs_options(opts: str, text: str = "") -> tuple[int, str]:
    """(mount flags, data) for a --tmpfs option string."""
    flags = _TMPFS_DEFAULT_FLAGS
    data: list[str] = []
    for opt in filter(None, (o.strip() for o in opts.split(","))):
        key, sep, value = opt.partition("=")
        if not sep and key in _TMPFS_FLAGS:
            add, remove = _TMPFS_FLAGS[key]
            flags = (flags | add) & ~remove
        elif sep and key in _TMPFS_DATA and value:
            data.append(f"{key}={value}")
        else:
            raise MountError(
                f"invalid --tmpfs {text or opts!r}: unknown option {opt!r} "
                f"(use {', '.join(_TMPFS_FLAGS)} or {'=, '.join(_TMPFS_DATA)}=)"
            )
    return flags, ",".join(data)


def check_targets(mounts: tuple[Mount, ...]) -> None:
    seen: set[str] = set()
    for m in mounts:
        if m.target in seen:
            raise MountError(f"duplicate mount point {m.target}: give each -v and --tmpfs its own path")
        seen.add(m.target)


# ----- in the container's PID 1 -----


def make_target(root: str, target: str, is_dir: bool) -> str:
    """Create `target` under root (directories along the way, the last one a directory or an empty file)
    without following symlinks; returns its host-side path."""
    path = root
    parts = [p for p in target.split("/") if p]
    for i, part in enumerate(parts):
        path = f"{path}/{part}"
        last = i == len(parts) - 1
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if last and not is_dir:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
            else:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, 0o755)
            st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, f"mount point {target} goes through a symlink in the image", path)
        if not last and not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, f"mount point {target}: a file in the image is in the way", path)
    return path


def mount_all(root: str, mounts: tuple[Mount, ...]) -> None:
    """Mount every bind and tmpfs (volumes arrive here as binds of their host directory)."""
    for m in sorted(mounts, key=lambda m: m.target.count("/")):
        if m.kind == "tmpfs":
            flags, data = tmpfs_options(m.options)
            dst = make_target(root, m.target, True)
            sc.mount("tmpfs", dst, "tmpfs", flags, data or None)
            continue
        try:
            is_dir = stat.S_ISDIR(os.stat(m.source).st_mode)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"bind source {m.source} does not exist on the host", m.source) from None
        dst = make_target(root, m.target, is_dir)
        if m.options == COPY_UP and is_dir and not os.listdir(m.source):
            copy_up(dst, m.source)
        sc.mount(m.source, dst, None, sc.MS_BIND | sc.MS_REC)
        if m.read_only:
            sc.mount(None, dst, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV)


def copy_up(src: str, dst: str) -> None:
    """Docker's copy of the image's files into a new, empty named volume: what the image has at the mount
    point (files, directories, symlinks, with modes, owners and times) lands in the volume, and the volume's
    directory takes the mode and owner of the image's. Symlinks are copied, never followed; other special
    files are skipped."""
    top = os.lstat(src)
    os.chown(dst, top.st_uid, top.st_gid)
    os.chmod(dst, stat.S_IMODE(top.st_mode))
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out_dir = dst if rel == "." else os.path.join(dst, rel)
        for name in [*dirnames, *filenames]:
            s, d = os.path.join(dirpath, name), os.path.join(out_dir, name)
            st = os.lstat(s)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), d)
            elif stat.S_ISDIR(st.st_mode):
                os.mkdir(d, 0o700)
            elif stat.S_ISREG(st.st_mode):
                with open(s, "rb") as fin, open(d, "xb") as fout:
                    while chunk := fin.read(1 << 20):
                        fout.write(chunk)
            else:
                continue
            os.chown(d, st.st_uid, st.st_gid, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(d, stat.S_IMODE(st.st_mode))
                os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))


def make_root_read_only(root: str) -> None:
    """--read-only: the rootfs mount becomes read-only; /proc, /dev, /sys, volumes and tmpfs keep theirs."""
    sc.mount(None, root, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY)
