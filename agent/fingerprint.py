"""The host's fingerprint (issue 6): what the agent tells the controller about its host when it joins, so that
the scheduler places on facts instead of configuration: capacity (memory, CPUs), platform (os/arch), kernel
version, host name, and labels.

Labels come from three places, later ones winning: automatic ones the agent finds itself (`berth.*`, below),
a labels file (`--labels-file`, one `KEY=VALUE` a line, `#` comments), and `--label KEY=VALUE` flags.
Labels an operator sets with `berthctl node update --label-add` are kept apart by the controller and win
over all of these (they outlive the agent's re-joins).

Automatic labels:

    berth.platform.os      linux
    berth.platform.arch    amd64, arm64, ...
    berth.kernel.version   6.1.0-18-amd64
    berth.hostname         the machine's host name
    berth.cgroup.version   1 or 2
    berth.storage.driver   overlay (berth's own overlayfs rootfs)

Exceptions: FingerprintError, a bad label or an unreadable labels file; the message says what to fix.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t

STORAGE_DRIVER = "overlay"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


class FingerprintError(Exception):
    """A label or labels file the agent cannot use."""


@dataclass(frozen=True)
class Fingerprint:
    memory_bytes: int
    nano_cpus: int
    os: str
    arch: str
    kernel_version: str
    hostname: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def platform(self) -> str:
        return f"{self.os}/{self.arch}"

    def fill(self, join: d.JoinRequest) -> None:
        """Put the fingerprint into a join request."""
        join.capacity.CopyFrom(t.Resources(memory_bytes=self.memory_bytes, nano_cpus=self.nano_cpus))
        join.platform = self.platform
        join.hostname = self.hostname
        join.kernel_version = self.kernel_version
        join.labels.clear()
        join.labels.update(self.labels)


def parse_label(text: str, where: str) -> tuple[str, str]:
    key, sep, value = text.strip().partition("=")
    key = key.strip()
    if not sep or not key or any(c.isspace() for c in key):
        raise FingerprintError(f"invalid label {text.strip()!r} in {where}: write KEY=VALUE")
    return key, value.strip()


def read_labels_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise FingerprintError(f"cannot read the labels file {path}: {exc.strerror}; fix --labels-file") from exc
    labels: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = parse_label(line, f"{path} line {n}")
            labels[key] = value
    return labels


def _memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpus() -> int:
    try:
        n = len(os.sched_getaffinity(0))  # the CPUs this agent (and so its containers) may use
    except OSError:
        n = os.cpu_count() or 1
    return max(1, n) * 1_000_000_000


def _cgroup_version() -> str:
    from agent.runtime.cgroups import detect_version

    try:
        return str(detect_version())
    except Exception:  # noqa: BLE001 - a host without cgroups mounted: no label rather than no agent
        return ""


def take(flags: list[str], labels_file: str = "") -> Fingerprint:
    """Fingerprint this host; `flags` are `--label KEY=VALUE` values."""
    uname = os.uname()
    arch = _ARCH.get(uname.machine, uname.machine)
    osname = platform.system().lower() or "linux"
    automatic = {
        "berth.platform.os": osname, "berth.platform.arch": arch, "berth.kernel.version": uname.release,
        "berth.hostname": uname.nodename, "berth.storage.driver": STORAGE_DRIVER,
    }
    cgroup = _cgroup_version()
    if cgroup:
        automatic["berth.cgroup.version"] = cgroup
    labels = dict(automatic)
    if labels_file:
        labels.update(read_labels_file(Path(labels_file)))
    for flag in flags:
        key, value = parse_label(flag, "--label")
        labels[key] = value
    return Fingerprint(_memory(), _cpus(), osname, arch, uname.release, uname.nodename, labels)
