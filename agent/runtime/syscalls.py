"""Every raw Linux system call the runtime makes that Python's os module lacks, in one place.

Each wrapper calls libc through ctypes with errno captured and raises OSError(errno, message, path) on
failure, so a caller sees the same exception the os module would raise. Docstrings state the kernel's
preconditions; breaking one is the usual cause of EINVAL or EPERM.

Nothing here decides policy (which mounts, which flags): see agent.runtime.rootfs and agent.runtime.spawn.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import platform
import socket
import struct

_libc = ctypes.CDLL(None, use_errno=True)

# unshare(2) / clone(2) flags.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_STRICTATIME = 0x1000000

# umount2(2) flags.
MNT_DETACH = 0x2

# prctl(2) options.
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

# netdevice(7)
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _check(ret: int, what: str, path: str | None = None) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    """mount(2). The caller needs CAP_SYS_ADMIN in the user namespace owning its mount namespace; target must
    exist. A bind (MS_BIND) ignores fstype and data; read-only on a bind needs a second MS_REMOUNT|MS_BIND
    call. MS_PRIVATE/MS_REC with a None source change propagation only."""
    ret = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(ret, f"mount {fstype or source or ''} on {target}", target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2). MNT_DETACH unmounts lazily: the mount leaves the tree at once and goes away when
    its last user does; needed for an old root still referenced by the calling process."""
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount {target}", target)


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2): make new_root the root of the calling mount namespace and move the old root to
    put_old. Kernel preconditions: new_root is a mount point and is not the current root; neither
    new_root nor the parent mount of the current root is a shared mount (make / MS_PRIVATE|MS_REC first);
    put_old is at or under new_root. Passing "." for both (after chdir(new_root)) stacks the old root on
    top of the new one, to be removed with umount2(".", MNT_DETACH): no directory for the old root needed.
    """
    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(38, f"pivot_root: unsupported architecture {platform.machine()}", new_root)
    ret = _libc.syscall(ctypes.c_long(nr), _b(new_root), _b(put_old))
    _check(ret, f"pivot_root {new_root}", new_root)


def unshare(flags: int) -> None:
    """unshare(2). CLONE_NEWPID does not move the caller: its next child is PID 1 of the new namespace.
    CLONE_NEWCGROUP roots the new cgroup namespace at the caller's current cgroups, so join the
    container's cgroups first. CLONE_NEWNS copies the mount table; mounts made afterwards still propagate
    to the host through shared mounts until / is made MS_PRIVATE|MS_REC. Needs CAP_SYS_ADMIN."""
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace that fd (an open /proc/<pid>/ns/<kind>) names. CLONE_NEWPID applies to
    the caller's next child only; CLONE_NEWNS needs a single-threaded caller and resets its root and
    working directory to the namespace's root. Needs CAP_SYS_ADMIN (and CAP_SYS_CHROOT for mnt)."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns {nstype:#x}")


def sethostname(name: str) -> None:
    """sethostname(2): sets the hostname of the caller's UTS namespace (unshare CLONE_NEWUTS first, or the
    host's name changes). At most 64 bytes."""
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), f"sethostname {name!r}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2) with integer arguments."""
    ret = int(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        )
    )
    _check(ret, f"prctl {option}")
    return ret


def set_child_subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER: orphaned descendants are re-parented to the caller instead of init, so it can
    reap them and read their exit status."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def cap_last_cap() -> int:
    """The highest capability number the running kernel knows."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_bounding_caps(keep: frozenset[int]) -> None:
    """Remove every capability not in keep from the bounding set (PR_CAPBSET_DROP, needs CAP_SETPCAP). A
    program exec'd afterwards by root gets at most the bounding set as its permitted set."""
    for cap in range(cap_last_cap() + 1):
        if cap not in keep:
            prctl(PR_CAPBSET_DROP, cap)


def set_loopback_up() -> None:
    """Set IFF_UP on `lo` in the caller's network namespace (SIOCSIFFLAGS; needs CAP_NET_ADMIN there). A
    fresh network namespace has `lo` down. Two ioctls: cheaper than a netlink round trip."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        got = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req)
        flags = struct.unpack("16sH22x", got)[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def proc_start_time(pid: int) -> int | None:
    """The start time of pid in clock ticks since boot (field 22 of /proc/<pid>/stat), or None if it is gone
    or a zombie. Together with the pid it names a process across pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])
