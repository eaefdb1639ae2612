"""The container's filesystem, built inside its new mount namespace by its PID 1 before exec.

Named steps, in the order runc and rubber-docker use:

    make_root_private   / becomes MS_PRIVATE|MS_REC, so nothing below propagates to the host
    mount_overlay       image layers read-only below, the container's upper dir on top, at rootfs
    mount_proc          a proc for the new pid namespace
    mount_dev           tmpfs /dev with null zero full random urandom tty, pts, shm, mqueue, std links
    mount_sys           read-only sysfs (of the new net namespace) and a read-only cgroup view
    protect_kernel_paths  read-only /proc/sys & co., masked /proc/kcore & co. (Docker's defaults)
    pivot               pivot_root into rootfs and detach the old root

Every mount lives in the container's mount namespace only, so the kernel undoes all of them when the last
process of the container exits: no undo step is needed, and nothing leaks onto the host.

These functions run in a forked child between fork and exec; they raise OSError and never print.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass

from agent.runtime import mounts as mnt
from agent.runtime import syscalls as sc

# (name, major, minor): the device nodes every OCI runtime provides.
_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
_DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)
_NOSUID_NODEV_NOEXEC = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC


@dataclass(frozen=True)
class RootfsPlan:
    rootfs: str
    # Lowest first, as in ContainerConfig.layers.
    layers: tuple[str, ...]
    upper: str
    work: str
    # 1 or 2, and on v1 the hierarchies to show under /sys/fs/cgroup (directory names on the host,
    # e.g. "memory" or "cpu,cpuacct").
    cgroup_version: int = 1
    cgroup_v1_mounts: tuple[str, ...] = ()
    # issue 3b: -v/--tmpfs mounts (volumes already resolved to binds), --read-only, --privileged (no masks).
    mounts: tuple[mnt.Mount, ...] = ()
    read_only: bool = False
    privileged: bool = False


def overlay_options(layers: tuple[str, ...], upper: str, work: str) -> str:
    """The overlayfs mount data: lowerdir lists the highest layer first."""
    for p in (*layers, upper, work):
        if any(c in p for c in ",:\\"):
            raise OSError(22, f"layer path not usable by overlayfs (contains , : or \\): {p}", p)
    return f"lowerdir={':'.join(reversed(layers))},upperdir={upper},workdir={work}"


def make_root_private() -> None:
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


def mount_overlay(plan: RootfsPlan) -> None:
    if not plan.layers:
        raise OSError(22, "the image has no layers", plan.rootfs)
    sc.mount("overlay", plan.rootfs, "overlay", 0, overlay_options(plan.layers, plan.upper, plan.work))


def _mkdir(path: str, mode: int = 0o755) -> None:
    """Make a mount point in the rootfs. An image's symlink there is refused: following it would mount onto
    whatever it points at, outside the rootfs."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "mount point in the image is not a directory", path)


def mount_proc(root: str) -> None:
    _mkdir(f"{root}/proc", 0o555)
    sc.mount("proc", f"{root}/proc", "proc", _NOSUID_NODEV_NOEXEC)


def mount_dev(root: str) -> None:
    dev = f"{root}/dev"
    _mkdir(dev)
    sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_STRICTATIME, "mode=755,size=65536k")
    for name, major, minor in _DEVICES:
        path = f"{dev}/{name}"
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(path, 0o666)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/pts", 0o755)
    sc.mount("devpts", f"{dev}/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    os.mkdir(f"{dev}/shm", 0o1777)
    sc.mount("shm", f"{dev}/shm", "tmpfs", _NOSUID_NODEV_NOEXEC, "mode=1777,size=65536k")
    os.mkdir(f"{dev}/mqueue", 0o755)
    sc.mount("mqueue", f"{dev}/mqueue", "mqueue", _NOSUID_NODEV_NOEXEC)


# As Docker's defaults: kernel interfaces a container has no business writing, or reading.
READONLY_PATHS = ("proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger")
MASKED_PATHS = (
    "proc/acpi",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
)


def protect_kernel_paths(root: str) -> None:
    """Bind READONLY_PATHS read-only onto themselves; hide MASKED_PATHS (a read-only empty tmpfs on a
    directory, the container's /dev/null on a file). Paths this kernel lacks are skipped."""
    ro = sc.MS_RDONLY | _NOSUID_NODEV_NOEXEC
    for rel in READONLY_PATHS:
        path = f"{root}/{rel}"
        if not os.path.lexists(path):
            continue
        sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
        sc.mount(None, path, None, sc.MS_REMOUNT | sc.MS_BIND | ro)
    for rel in MASKED_PATHS:
        path = f"{root}/{rel}"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            sc.mount("tmpfs", path, "tmpfs", ro, "size=0")
        else:
            sc.mount(f"{root}/dev/null", path, None, sc.MS_BIND)


def mount_sys(plan: RootfsPlan) -> None:
    """Read-only sysfs. A sysfs mount shows the network devices of the mounter's network namespace and is
    refused (EPERM) when the caller lacks CAP_SYS_ADMIN over that namespace; then bind the host's /sys
    read-only instead. Under it, /sys/fs/cgroup shows the container's own cgroups (cgroup namespace)."""
    sys_dir = f"{plan.rootfs}/sys"
    _mkdir(sys_dir)
    ro = sc.MS_RDONLY | _NOSUID_NODEV_NOEXEC
    try:
        sc.mount("sysfs", sys_dir, "sysfs", ro)
    except PermissionError:
        sc.mount("/sys", sys_dir, None, sc.MS_BIND | sc.MS_REC)
        sc.mount(None, sys_dir, None, sc.MS_REMOUNT | sc.MS_BIND | ro)
        return
    cg = f"{sys_dir}/fs/cgroup"
    if plan.cgroup_version == 2:
        sc.mount("cgroup2", cg, "cgroup2", ro)
        return
    if not plan.cgroup_v1_mounts:
        return
    sc.mount("tmpfs", cg, "tmpfs", _NOSUID_NODEV_NOEXEC, "mode=755,size=64k")
    for name in plan.cgroup_v1_mounts:
        os.mkdir(f"{cg}/{name}", 0o755)
        sc.mount("cgroup", f"{cg}/{name}", "cgroup", ro, name)
    sc.mount(None, cg, None, sc.MS_REMOUNT | ro, "mode=755,size=64k")


def pivot(root: str) -> None:
    """pivot_root(".", "."): the old root ends up stacked on the new one and is detached right away, so no
    put_old directory is created in the container's writable layer."""
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


class SetupError(Exception):
    """A step failed; the message names the step and the cause, e.g. "mount rootfs: No such file..."."""


def describe(e: OSError) -> str:
    """An OSError in words: strerror plus the path when the message does not already name it."""
    msg = e.strerror or str(e)
    if e.filename is not None and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    return msg


def setup(plan: RootfsPlan) -> None:
    """Run every step in order; raises SetupError naming the step that failed."""
    steps = (
        ("make / private", make_root_private),
        ("mount rootfs", lambda: mount_overlay(plan)),
        ("mount /proc", lambda: mount_proc(plan.rootfs)),
        ("mount /dev", lambda: mount_dev(plan.rootfs)),
        ("mount /sys", lambda: mount_sys(plan)),
        ("mount volumes", lambda: mnt.mount_all(plan.rootfs, plan.mounts)),
        ("protect /proc and /sys", lambda: None if plan.privileged else protect_kernel_paths(plan.rootfs)),
        ("make the root read-only", lambda: mnt.make_root_read_only(plan.rootfs) if plan.read_only else None),
        ("pivot_root", lambda: pivot(plan.rootfs)),
    )
    for name, step in steps:
        try:
            step()
        except OSError as e:
            raise SetupError(f"{name}: {describe(e)}") from e
