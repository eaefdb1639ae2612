"""A container's privileges: capabilities (Docker's default set, --cap-add/--cap-drop, --privileged), the
user it runs as (--user or the image's USER, names looked up in the container's own /etc/passwd and
/etc/group), resource limits (--ulimit) and no_new_privs.

`Security` is the typed option set carried in ContainerConfig; `check` validates it with messages meant for
a user (called by the agent before anything is created); `enter` applies it in the container's PID 1 after
pivot_root and right before exec:

    setrlimit for each ulimit -> drop capabilities from the bounding set -> setgroups, setgid, setuid
    -> PR_SET_NO_NEW_PRIVS

As root (uid 0), a program exec'd gets the bounding set as its permitted and effective sets; as another
uid it gets none (file capabilities aside), as with Docker.

Exceptions: SecurityError (a bad option or a user the image does not know); OSError from the kernel.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from agent.runtime import syscalls as sc


class SecurityError(Exception):
    """A security option that cannot be applied; the message says what to write instead."""


# capabilities(7), by number.
CAPABILITIES = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6,
    "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10, "NET_BROADCAST": 11,
    "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15, "SYS_MODULE": 16, "SYS_RAWIO": 17,
    "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20, "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23,
    "SYS_RESOURCE": 24, "SYS_TIME": 25, "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29,
    "AUDIT_CONTROL": 30, "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}

# Docker's default set: chown dac_override fowner fsetid kill setgid setuid setpcap net_bind_service net_raw
# sys_chroot mknod audit_write setfcap.
DEFAULT_CAPABILITIES = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31})

# setrlimit(2) resource numbers (Linux, every architecture), by the names `docker run --ulimit` takes.
ULIMITS = {
    "cpu": 0, "fsize": 1, "data": 2, "stack": 3, "core": 4, "rss": 5, "nproc": 6, "nofile": 7, "memlock": 8,
    "as": 9, "locks": 10, "sigpending": 11, "msgqueue": 12, "nice": 13, "rtprio": 14, "rttime": 15,
}


@dataclass(frozen=True)
class Ulimit:
    name: str
    soft: int  # -1: unlimited
    hard: int


@dataclass(frozen=True)
class Security:
    """The privilege options of one container (all default to Docker's defaults, no_new_privs aside)."""

    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    privileged: bool = False
    read_only: bool = False  # read-only root filesystem (applied by agent.runtime.rootfs)
    no_new_privs: bool = True
    user: str = ""  # NAME|UID[:GROUP|GID]; empty: root
    ulimits: tuple[Ulimit, ...] = ()


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def parse_ulimit(text: str) -> Ulimit:
    """`nofile=1024:2048` or `nproc=512` (soft = hard); -1 or `unlimited` for no limit."""
    name, sep, values = text.partition("=")
    name = name.strip().lower()
    if not sep or name not in ULIMITS:
        raise SecurityError(
            f"invalid --ulimit {text!r}: write NAME=SOFT[:HARD] with NAME one of {', '.join(sorted(ULIMITS))}"
        )
    soft_s, _, hard_s = values.partition(":")
    try:
        soft = _limit_value(soft_s)
        hard = _limit_value(hard_s) if hard_s else soft
    except ValueError:
        raise SecurityError(f"invalid --ulimit {text!r}: limits are whole numbers, -1 or unlimited") from None
    if hard != -1 and (soft == -1 or soft > hard):
        raise SecurityError(f"invalid --ulimit {text!r}: the soft limit must not exceed the hard limit")
    return Ulimit(name, soft, hard)


def _limit_value(text: str) -> int:
    text = text.strip()
    if text in ("-1", "unlimited"):
        return -1
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _cap_number(name: str) -> int | None:
    key = name.strip().upper().removeprefix("CAP_")
    return CAPABILITIES.get(key)


def capabilities(sec: Security, last_cap: int = max(CAPABILITIES.values())) -> frozenset[int]:
    """The bounding set: Docker's default, or every capability when privileged; then --cap-drop and
    --cap-add (ALL allowed in either). Raises SecurityError for an unknown name."""
    everything = frozenset(range(last_cap + 1))
    if sec.privileged:
        return everything
    caps = set(DEFAULT_CAPABILITIES)
    for name in sec.cap_drop:
        if name.strip().upper() == "ALL":
            caps.clear()
            continue
        num = _cap_number(name)
        if num is None:
            raise SecurityError(f"unknown capability {name!r} in --cap-drop (see capabilities(7), e.g. NET_RAW)")
        caps.discard(num)
    for name in sec.cap_add:
        if name.strip().upper() == "ALL":
            caps |= everything
            continue
        num = _cap_number(name)
        if num is None:
            raise SecurityError(f"unknown capability {name!r} in --cap-add (see capabilities(7), e.g. NET_ADMIN)")
        caps.add(num)
    return frozenset(c for c in caps if c <= last_cap)


def check(sec: Security) -> None:
    """Validate what can be checked before the container exists (capability names, user syntax)."""
    capabilities(sec)
    user, _, group = sec.user.partition(":")
    if sec.user and (not user or (":" in sec.user and not group)):
        raise SecurityError(f"invalid --user {sec.user!r}: write UID, NAME, UID:GID or NAME:GROUP")


def _entries(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def lookup_user(spec: str, passwd: str = "/etc/passwd", group: str = "/etc/group") -> Identity:
    """Resolve NAME|UID[:GROUP|GID] against the container's own account files (as Docker does: a numeric
    uid needs no entry; its gid is then 0 unless given). Supplementary groups are those /etc/group lists
    the user's name in."""
    user, _, grp = (spec or "0").partition(":")
    users = [e for e in _entries(passwd) if len(e) >= 7]
    entry = next((e for e in users if e[0] == user), None)
    if entry is None and user.isdigit():
        entry = next((e for e in users if e[2] == user), None)
    if entry is None and not user.isdigit():
        raise SecurityError(f"unable to find user {user}: no matching entries in the image's /etc/passwd")
    uid = int(entry[2]) if entry is not None else int(user)
    gid = int(entry[3]) if entry is not None else 0
    home = entry[5] if entry is not None and entry[5] else "/"
    name = entry[0] if entry is not None else None
    groups = _entries(group)
    if grp:
        if grp.isdigit():
            gid = int(grp)
        else:
            g = next((e for e in groups if len(e) >= 3 and e[0] == grp), None)
            if g is None:
                raise SecurityError(f"unable to find group {grp}: no matching entries in the image's /etc/group")
            gid = int(g[2])
    extra = sorted({int(e[2]) for e in groups if len(e) >= 4 and name and name in e[3].split(",")} - {gid})
    return Identity(uid=uid, gid=gid, groups=(gid, *extra), home=home)


def enter(sec: Security, ident: Identity) -> None:
    """Run in the container's PID 1 right before exec (see the module docstring)."""
    for lim in sec.ulimits:
        soft = resource.RLIM_INFINITY if lim.soft < 0 else lim.soft
        hard = resource.RLIM_INFINITY if lim.hard < 0 else lim.hard
        try:
            resource.setrlimit(ULIMITS[lim.name], (soft, hard))
        except (OSError, ValueError) as e:
            raise SecurityError(f"set ulimit {lim.name}={lim.soft}:{lim.hard}: {e}") from e
    sc.drop_bounding_caps(capabilities(sec, sc.cap_last_cap()))
    os.setgroups(list(ident.groups))
    os.setgid(ident.gid)
    os.setuid(ident.uid)
    if sec.no_new_privs:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
