"""Unpack one image layer (a tar, plain or gzip/zstd/bzip2/xz compressed) into a directory that overlayfs can use
as a lower layer.

The layer is unpacked into a private temporary directory beside the destination and renamed into place only
once it is complete and its uncompressed digest (the diff_id) checks out, so a partial or corrupt unpack is
never visible. The archive is streamed: compressed bytes -> decompressor -> sha256 -> tar reader -> files,
with no second copy in memory.

Safety, for archives that are hostile (same rules as Docker and containerd, chroot semantics):
- names are cleaned: a leading '/' is dropped, '.' and empty components vanish; a name whose '..' climbs
  above the root is refused (UnsafeLayer), as is a hard link whose target does;
- every parent directory is resolved inside the root: a symlink met on the way is followed as if the root
  were '/', so 'evil -> /etc' plus 'evil/x' writes <root>/etc/x; the last component is never followed
  (existing entries are replaced, files are opened with O_NOFOLLOW|O_EXCL);
- symlink targets are stored verbatim: they are only ever read inside the container's root;
- block and character devices are skipped (FIFOs are kept); a 0:0 character device is an overlay whiteout
  and is kept;
- of the PAX xattrs only security.capability and user.* are applied, never trusted.* (overlayfs reads its
  own trusted.overlay.* attributes, which a layer must not forge).

OCI whiteouts become overlayfs ones: '.wh.<name>' is a 0:0 character device named <name>; '.wh..wh..opq'
sets trusted.overlay.opaque=y on its directory. Modes, owners (when running as root), mtimes are kept.

Needs root for whiteouts (mknod) and ownership; raises InvalidLayer / UnsafeLayer / DigestMismatch /
StoreError from agent.images.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import hashlib
import importlib
import io
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from agent.images import DigestMismatch, InvalidLayer, StoreError, UnsafeLayer

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_CHUNK = 1 << 20
_MAX_SYMLINKS = 40
_XATTR_PREFIX = "SCHILY.xattr."

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _HashingReader:
    """A forward-only, read-only stream that hashes every byte that passes through it.

    tarfile is used in its seekable mode over this reader (its stream mode copies its whole buffer on every
    header read): tarfile only ever seeks forward, and a forward seek is a read whose bytes are hashed and
    dropped, so the hash still covers the whole stream."""

    def __init__(self, inner: _Readable) -> None:
        self._inner = inner
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def tell(self) -> int:
        return self.size

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = offset if whence == os.SEEK_SET else self.size + offset if whence == os.SEEK_CUR else -1
        if target < self.size:
            raise io.UnsupportedOperation(f"backward seek to {target} in a layer stream at {self.size}")
        while self.size < target:
            if not self.read(min(_CHUNK, target - self.size)):
                break
        return self.size

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


@contextlib.contextmanager
def _zstd(blob: Path) -> Iterator[_Readable]:
    """zstd: the standard library's (Python >= 3.14), else the zstd program through a pipe, else an error."""
    try:
        module: Any = importlib.import_module("compression.zstd")
    except ImportError:
        module = None
    if module is not None:
        with module.open(blob, "rb") as stream:
            yield stream
        return
    program = shutil.which("zstd")
    if program is None:
        raise InvalidLayer(
            "zstd-compressed layers need Python 3.14's compression.zstd or the zstd program "
            "(apt-get install zstd) on this host; or push the image with gzip layers"
        )
    proc = subprocess.Popen(
        [program, "-d", "-c", "-q", "--", str(blob)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        yield proc.stdout
        proc.stdout.read()  # to the end, so the exit status says whether the whole blob decompressed
    finally:
        proc.stdout.close()  # if we stopped early, zstd gets EPIPE and exits
        errors = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise InvalidLayer(f"zstd could not decompress layer {blob.name}: {errors or f'exit status {code}'}")


@contextlib.contextmanager
def _decompressed(blob: Path) -> Iterator[_Readable]:
    """The blob's uncompressed bytes, whatever the compression (sniffed from the magic number)."""
    with contextlib.ExitStack() as stack:
        raw: BinaryIO = stack.enter_context(open(blob, "rb"))
        magic = raw.read(6)
        raw.seek(0)
        stream: _Readable = raw
        if magic.startswith(_GZIP_MAGIC):
            stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif magic.startswith(_ZSTD_MAGIC):
            stream = stack.enter_context(_zstd(blob))
        elif magic.startswith(_BZIP2_MAGIC):
            stream = stack.enter_context(bz2.BZ2File(raw, mode="rb"))
        elif magic.startswith(_XZ_MAGIC):
            stream = stack.enter_context(lzma.LZMAFile(raw, mode="rb"))
        yield stream


def _clean(name: str, what: str) -> tuple[str, ...]:
    """Split a tar name into components relative to the root; refuse a '..' that climbs above it."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UnsafeLayer(
                    f"layer entry {what}{name!r} points outside the layer root; refusing the layer"
                )
            parts.pop()
        else:
            parts.append(part)
    return tuple(parts)


class _Unpacker:
    """Writes tar members under `root`, which is a fresh directory nobody else writes to."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.as_root = os.geteuid() == 0
        # Directories (as component tuples) known to be real directories reached without any symlink.
        self.dirs: set[tuple[str, ...]] = {()}
        # Directory metadata is applied at the end: writing children would change the mtimes.
        self.dir_meta: dict[str, tuple[int, int]] = {}

    def host(self, parts: tuple[str, ...]) -> str:
        return os.path.join(self.root, *parts) if parts else self.root

    def resolve_dir(self, parts: tuple[str, ...], name: str) -> tuple[tuple[str, ...], bool]:
        """Resolve `parts` to a real directory inside the root, following symlinks as in a chroot and
        creating missing directories (0755). Returns the real components and whether a symlink was met."""
        if parts in self.dirs:
            return parts, False
        current: list[str] = []
        pending = list(parts)
        followed = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if current:
                    current.pop()
                continue
            if part in ("", "."):
                continue
            candidate = (*current, part)
            path = self.host(candidate)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
                if not followed:
                    self.dirs.add(candidate)
                current.append(part)
                continue
            if stat.S_ISLNK(st.st_mode):
                followed += 1
                if followed > _MAX_SYMLINKS:
                    raise UnsafeLayer(f"layer entry {name!r}: too many levels of symbolic links")
                target = os.readlink(path)
                if target.startswith("/"):
                    current = []
                pending[:0] = target.split("/")
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidLayer(f"layer entry {name!r}: {'/'.join(candidate)} is not a directory")
            current.append(part)
        real = tuple(current)
        if not followed:
            self.dirs.add(real)
        return real, followed > 0

    def remove(self, path: str) -> None:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
            self.dirs = {()}
        else:
            os.unlink(path)

    def owner(self, path: str | int, member: tarfile.TarInfo) -> None:
        if self.as_root:
            if isinstance(path, int):
                os.fchown(path, member.uid, member.gid)
            else:
                os.chown(path, member.uid, member.gid, follow_symlinks=False)

    def xattrs(self, path: str, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith(_XATTR_PREFIX):
                continue
            attr = key[len(_XATTR_PREFIX) :]
            if attr == "security.capability" or attr.startswith("user."):
                os.setxattr(path, attr, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _clean(member.name, "")
        if not parts:  # the root itself ("./")
            if member.isdir():
                self.dir_meta[self.root] = (stat.S_IMODE(member.mode), int(member.mtime * 1e9))
                self.owner(self.root, member)
            return
        base = parts[-1]
        parent, followed = self.resolve_dir(parts[:-1], member.name)
        parent_path = self.host(parent)

        if base.startswith(WHITEOUT_PREFIX):
            if base == OPAQUE_MARKER:
                os.setxattr(parent_path, OPAQUE_XATTR, b"y")
            elif not base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):  # other .wh..wh.* is AUFS metadata
                hidden = base[len(WHITEOUT_PREFIX) :]
                if hidden in ("", ".", ".."):
                    raise UnsafeLayer(f"layer entry {member.name!r} whites out {hidden!r}; refusing the layer")
                self.whiteout(os.path.join(parent_path, hidden), member)
            return

        path = os.path.join(parent_path, base)
        if member.isdir():
            self.directory(path, member)
            if not followed:
                self.dirs.add((*parent, base))
        elif member.isreg():
            self.regular(path, tar, member)
        elif member.issym():
            self.symlink(path, member)
        elif member.islnk():
            self.hardlink(path, member)
        elif member.isfifo():
            self.replace_with(path, lambda: os.mkfifo(path, 0o600))
            self.owner(path, member)
            os.chmod(path, stat.S_IMODE(member.mode))
            self.mtime(path, member)
        elif member.ischr() and member.devmajor == 0 and member.devminor == 0:
            self.whiteout(path, member)
        # Other devices are skipped: a container gets its /dev from the runtime, never from an image.

    def replace_with(self, path: str, create: Callable[[], None]) -> None:
        try:
            create()
        except FileExistsError:
            self.remove(path)
            create()

    def mtime(self, path: str | int, member: tarfile.TarInfo) -> None:
        ns = int(member.mtime * 1e9)
        if isinstance(path, int):
            os.utime(path, ns=(ns, ns))
        else:
            os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def whiteout(self, path: str, member: tarfile.TarInfo) -> None:
        self.replace_with(path, lambda: os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0)))
        self.mtime(path, member)

    def directory(self, path: str, member: tarfile.TarInfo) -> None:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                self.remove(path)
                os.mkdir(path, 0o700)
        self.owner(path, member)
        self.xattrs(path, member)
        self.dir_meta[path] = (stat.S_IMODE(member.mode), int(member.mtime * 1e9))

    def regular(self, path: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            self.remove(path)
            fd = os.open(path, flags, 0o600)
        with open(fd, "wb", closefd=True) as out:
            source = tar.extractfile(member)
            if source is not None and member.size:
                shutil.copyfileobj(source, out, _CHUNK)
            out.flush()
            self.owner(fd, member)
            os.fchmod(fd, stat.S_IMODE(member.mode))
            if member.pax_headers:
                self.xattrs(path, member)
            self.mtime(fd, member)

    def symlink(self, path: str, member: tarfile.TarInfo) -> None:
        self.replace_with(path, lambda: os.symlink(member.linkname, path))
        self.owner(path, member)
        self.mtime(path, member)

    def hardlink(self, path: str, member: tarfile.TarInfo) -> None:
        target_parts = _clean(member.linkname, f"{member.name!r} hard link target ")
        if not target_parts:
            raise UnsafeLayer(f"layer entry {member.name!r} is a hard link to the layer root")
        target_parent, _ = self.resolve_dir(target_parts[:-1], member.name)
        target = os.path.join(self.host(target_parent), target_parts[-1])
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise InvalidLayer(
                f"layer entry {member.name!r} is a hard link to {member.linkname!r}, which the layer lacks"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(f"layer entry {member.name!r} is a hard link to a directory")
        if os.path.lexists(path) and os.path.samestat(os.lstat(path), st):
            return
        self.replace_with(path, lambda: os.link(target, path, follow_symlinks=False))

    def finish(self) -> None:
        for path, (mode, ns) in reversed(self.dir_meta.items()):
            try:
                os.chmod(path, mode, follow_symlinks=False)
                os.utime(path, ns=(ns, ns), follow_symlinks=False)
            except FileNotFoundError:
                continue  # replaced by a later entry of the same layer


def unpack_layer(blob: Path, dest: Path, diff_id: str | None = None) -> None:
    """Unpack the layer archive `blob` so that `dest` appears, complete, or not at all.

    `diff_id` (sha256:<hex> of the uncompressed tar) is checked before `dest` becomes visible. `dest` must
    not exist yet; its parent must exist. A temporary directory is made beside it and removed on failure.
    """
    if diff_id is not None and not diff_id.startswith("sha256:"):
        raise InvalidLayer(f"unsupported diff_id algorithm: {diff_id}")
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent)
    try:
        os.chmod(tmp, 0o755)
        unpacker = _Unpacker(tmp)
        with _decompressed(blob) as stream:
            reader = _HashingReader(stream)
            try:
                with tarfile.open(fileobj=reader, mode="r:") as tar:  # type: ignore[call-overload]
                    while (member := tar.next()) is not None:
                        unpacker.add(tar, member)
                        tar.members.clear()  # tarfile keeps every header otherwise
                    reader.drain()
            except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as err:
                if isinstance(err, OSError) and err.errno is not None:
                    raise  # a real I/O error from the filesystem, not a corrupt archive
                raise InvalidLayer(
                    f"layer {diff_id or blob.name} is not a readable tar archive: {err}"
                ) from err
        unpacker.finish()
        if diff_id is not None:
            actual = "sha256:" + reader.hash.hexdigest()
            if actual != diff_id:
                raise DigestMismatch(
                    f"layer content does not match its diff_id: expected {diff_id}, got {actual} "
                    f"({reader.size} bytes uncompressed)"
                )
        try:
            os.rename(tmp, dest)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp)  # another process unpacked the same layer first; same content
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"cannot unpack layer {diff_id or blob.name} into {dest.parent}: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def diff_id_of(blob: Path) -> str:
    """sha256:<hex> of the layer's uncompressed tar, whatever its compression."""
    digest = hashlib.sha256()
    try:
        with _decompressed(blob) as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise StoreError(f"cannot read layer {blob}: {err}") from err
        raise InvalidLayer(f"layer {blob.name} cannot be decompressed: {err}") from err
    return "sha256:" + digest.hexdigest()


def layer_media_type(blob: Path) -> str:
    """The OCI media type of a layer blob, from its magic number: tar, tar+gzip or tar+zstd."""
    with open(blob, "rb") as raw:
        magic = raw.read(6)
    if magic.startswith(_GZIP_MAGIC):
        return "application/vnd.oci.image.layer.v1.tar+gzip"
    if magic.startswith(_ZSTD_MAGIC):
        return "application/vnd.oci.image.layer.v1.tar+zstd"
    if magic.startswith((_BZIP2_MAGIC, _XZ_MAGIC)):
        raise InvalidLayer(f"{blob.name}: bzip2 and xz layers cannot be stored in an OCI image; use gzip")
    return "application/vnd.oci.image.layer.v1.tar"
