"""Fixtures for the real-kernel runtime tests: a busybox root filesystem, a private cgroup parent, a
supervisor in a temporary state dir, and checks that nothing is left behind (processes, cgroups, mounts)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.executor import ContainerConfig
from agent.runtime.cgroups import Hierarchy
from agent.runtime.linux import LinuxExecutor

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")
T = TypeVar("T")


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, mounts, cgroups)")
    if not BUSYBOX.exists():
        pytest.skip("needs /bin/busybox (busybox-static)")


def wait_for(cond: Callable[[], T | None], timeout_s: float = 10.0, what: str = "condition") -> T:
    """Poll cond until it returns a truthy value; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


async def async_wait_for(
    cond: Callable[[], Coroutine[Any, Any, T | None]], timeout_s: float = 10.0, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or 'condition'}")
        await asyncio.sleep(0.005)


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
    """Run one async test body on a fresh event loop, with an overall deadline."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def mounts_mentioning(*paths: Path) -> list[str]:
    """Host mount table lines whose mount point or options name one of paths (an overlay's upperdir, a
    rootfs); other processes on the machine may mount elsewhere meanwhile, so tests look only at theirs."""
    needles = [str(p) for p in paths]
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if any(n in line for n in needles)]


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image layer: bin/busybox, a symlink per applet, etc/passwd, etc/group, tmp, mount points."""
    needs_root()
    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "tmp").mkdir(mode=0o1777)
    (root / "root").mkdir(mode=0o700)
    for mount_point in ("proc", "sys", "dev"):  # as in real images; else they are made in the upper dir
        (root / mount_point).mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True).stdout.split()
    for name in applets:
        if name != "busybox":
            (root / "bin" / name).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc" / "group").write_text("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    return root


def _cgroup_leaves(hier: Hierarchy, parent: str) -> list[Path]:
    bases = [hier.root] if hier.version == 2 else list(set(hier.v1_controllers.values()))
    out: list[Path] = []
    for base in bases:
        d = base / parent
        if d.is_dir():
            out.extend(p for p in d.iterdir() if p.is_dir())
    return out


def _remove_parent(hier: Hierarchy, parent: str) -> None:
    bases = [hier.root] if hier.version == 2 else list(set(hier.v1_controllers.values()))
    for base in bases:
        d = base / parent
        if d.is_dir():
            d.rmdir()


@dataclass
class Host:
    """One test host: state dir, cgroup parent, image layer, the supervisor's process."""

    state_dir: Path
    cgroup_parent: str
    rootfs: Path
    hier: Hierarchy
    supervisor: subprocess.Popen[bytes] | None = None

    def executor(self) -> LinuxExecutor:
        return LinuxExecutor(self.state_dir, self.cgroup_parent)

    def config(self, cid: str, *args: str, **kw: Any) -> ContainerConfig:
        kw.setdefault("hostname", cid)
        return ContainerConfig(id=cid, name=cid, layers=(self.rootfs,), args=args, **kw)

    def cgroup_leaves(self) -> list[Path]:
        return _cgroup_leaves(self.hier, self.cgroup_parent)

    def container_pids(self) -> list[int]:
        pids: set[int] = set()
        for leaf in self.cgroup_leaves():
            pids.update(int(p) for p in (leaf / "cgroup.procs").read_text().split())
        return sorted(pids)

    def log_text(self, cid: str) -> str:
        try:
            return (self.state_dir / "containers" / cid / "container.log").read_text()
        except FileNotFoundError:
            return ""


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _kill_supervisor_by_pidfile(state_dir: Path) -> None:
    try:
        pid = int((state_dir / "supervisor.pid").read_text())
    except (FileNotFoundError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or _is_zombie(pid), what=f"supervisor {pid} to die")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def host(tmp_path: Path, busybox_rootfs: Path) -> Iterator[Host]:
    """A state dir and cgroup parent, with no supervisor; at teardown every container process, cgroup and
    supervisor of this host is gone and no host mount refers to its state dir or image."""
    needs_root()
    hier = Hierarchy()
    h = Host(tmp_path / "state", f"berth-test-{uuid.uuid4().hex[:10]}", busybox_rootfs, hier)
    try:
        yield h
    finally:
        leftovers = h.container_pids()
        if h.supervisor is not None:
            h.supervisor.kill()
            h.supervisor.wait()
        _kill_supervisor_by_pidfile(h.state_dir)
        leaves = h.cgroup_leaves()
        for leaf in leaves:
            cg = hier.cgroup(h.cgroup_parent, leaf.name)
            cg.kill_all()
            cg.remove()
        _remove_parent(hier, h.cgroup_parent)
        leaked_mounts = mounts_mentioning(h.state_dir, h.rootfs)
        assert not leftovers, f"container processes left running: {leftovers}"
        assert not leaked_mounts, f"mounts left on the host: {leaked_mounts}"


def start_supervisor(host: Host) -> None:
    """Run a supervisor for host as a child of the test (not detached) and wait until its socket answers."""
    host.state_dir.mkdir(parents=True, exist_ok=True)
    with open(host.state_dir / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.supervisor",
                "--state-dir",
                str(host.state_dir),
                "--cgroup-parent",
                host.cgroup_parent,
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    host.supervisor = proc
    wait_for(
        lambda: _socket_answers(host.state_dir / "supervisor.sock") or proc.poll() is not None,
        what="supervisor socket",
    )
    assert proc.poll() is None, (host.state_dir / "supervisor.log").read_text()


@pytest.fixture
def supervised(host: Host) -> Iterator[Host]:
    """host with a supervisor started by the test (killed at teardown)."""
    start_supervisor(host)
    try:
        yield host
    finally:
        stop_containers(host)


def stop_containers(host: Host) -> None:
    """Kill every container of the host and wait until the supervisor has reaped them, so the teardown of
    `host` sees no processes."""
    for leaf in host.cgroup_leaves():
        host.hier.cgroup(host.cgroup_parent, leaf.name).signal_all(signal.SIGKILL)
    if host.supervisor is not None and host.supervisor.poll() is None:
        wait_for(lambda: not host.container_pids(), what="container processes to be reaped")
