"""agent.runtime.cgroups: the writes for v1 and v2 against trees in a temporary directory, and a real
cgroup on this host (create, join, kill, remove)."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime.cgroups import Hierarchy, Limits, detect_version
from tests.agent.conftest import wait_for


@pytest.fixture
def v2_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    return root


@pytest.fixture
def v1_root(tmp_path: Path) -> Path:
    """A hybrid-like v1 tree: memory, pids and freezer on their own, cpu and cpuacct co-mounted."""
    root = tmp_path / "cgroup1"
    for ctrl in ("memory", "pids", "freezer", "cpu,cpuacct"):
        (root / ctrl).mkdir(parents=True)
        (root / ctrl / "cgroup.procs").write_text("")
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    (root / "unified").mkdir()
    return root


def test_cpu_quota() -> None:
    assert Limits().cpu_quota_us() == -1
    assert Limits(nano_cpus=1_500_000_000).cpu_quota_us() == 150_000
    assert Limits(nano_cpus=1).cpu_quota_us() == 1000  # the kernel's minimum quota


def test_detect(v1_root: Path, v2_root: Path) -> None:
    assert detect_version(v2_root) == 2
    assert detect_version(v1_root) == 1
    assert Hierarchy(v2_root).version == 2


def test_v2_writes(v2_root: Path) -> None:
    hier = Hierarchy(v2_root)
    hier.prepare_parent("berth/host-a")
    for d in (v2_root, v2_root / "berth", v2_root / "berth" / "host-a"):
        assert (d / "cgroup.subtree_control").read_text() == "+memory +cpu +pids +cpuset", d
    cg = hier.cgroup("/berth/host-a/", "c1")
    assert cg.dirs == {"": v2_root / "berth" / "host-a" / "c1"}
    cg.create(Limits(memory_bytes=64 << 20, nano_cpus=1_500_000_000, pids_limit=50))
    d = v2_root / "berth" / "host-a" / "c1"
    assert (d / "memory.max").read_text() == str(64 << 20)
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert (d / "pids.max").read_text() == "50"
    assert cg.procs_files() == [str(d / "cgroup.procs")]
    cg.create(Limits())  # idempotent, and back to unlimited
    assert (d / "memory.max").read_text() == "max"
    assert (d / "cpu.max").read_text() == "max 100000"
    assert (d / "pids.max").read_text() == "max"


def test_v2_enables_only_offered_controllers(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("memory io\n")
    (root / "cgroup.subtree_control").write_text("memory\n")
    Hierarchy(root).prepare_parent("p")
    assert (root / "cgroup.subtree_control").read_text() == "memory\n"  # already enabled: not rewritten
    assert (root / "p" / "cgroup.subtree_control").read_text() == "+memory"


def test_v2_oom(v2_root: Path) -> None:
    cg = Hierarchy(v2_root).cgroup("p", "c")
    cg.create(Limits())
    assert not cg.oom_killed()
    (cg.dirs[""] / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.oom_killed()


def test_v1_writes(v1_root: Path) -> None:
    hier = Hierarchy(v1_root)
    assert hier.version == 1
    assert set(hier.v1_controllers) == {"memory", "cpu", "cpuacct", "pids", "freezer"}
    cg = hier.cgroup("berth", "c1")
    cg.create(Limits(memory_bytes=1 << 30, nano_cpus=250_000_000, pids_limit=10))
    assert (v1_root / "memory/berth/c1/memory.limit_in_bytes").read_text() == str(1 << 30)
    assert (v1_root / "cpu,cpuacct/berth/c1/cpu.cfs_period_us").read_text() == "100000"
    assert (v1_root / "cpu,cpuacct/berth/c1/cpu.cfs_quota_us").read_text() == "25000"
    assert (v1_root / "pids/berth/c1/pids.max").read_text() == "10"
    assert (v1_root / "freezer/berth/c1").is_dir()
    # cpu and cpuacct share one directory: joined once.
    assert len(cg.procs_files()) == 4
    cg.create(Limits())
    assert (v1_root / "memory/berth/c1/memory.limit_in_bytes").read_text() == "-1"
    assert (v1_root / "cpu,cpuacct/berth/c1/cpu.cfs_quota_us").read_text() == "-1"
    assert (v1_root / "pids/berth/c1/pids.max").read_text() == "max"


def test_v1_oom(v1_root: Path) -> None:
    cg = Hierarchy(v1_root).cgroup("p", "c")
    cg.create(Limits())
    mem = v1_root / "memory/p/c"
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert not cg.oom_killed()
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cg.oom_killed()
    (mem / "memory.oom_control").unlink()  # kernels before 4.13: fall back to failcnt
    (mem / "memory.failcnt").write_text("5\n")
    assert cg.oom_killed()


# ----- the real hierarchy -----


@pytest.fixture
def real_parent() -> Iterator[tuple[Hierarchy, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    hier = Hierarchy()
    parent = f"berth-test-{uuid.uuid4().hex[:10]}"
    try:
        yield hier, parent
    finally:
        bases = [hier.root] if hier.version == 2 else list(set(hier.v1_controllers.values()))
        for base in bases:
            d = base / parent
            if d.is_dir():
                for leaf in d.iterdir():
                    if leaf.is_dir():
                        hier.cgroup(parent, leaf.name).remove()
                d.rmdir()


def test_real_cgroup_limits_kill_and_remove(real_parent: tuple[Hierarchy, str]) -> None:
    hier, parent = real_parent
    assert hier.version == detect_version()
    hier.prepare_parent(parent)
    cg = hier.cgroup(parent, "c1")
    cg.create(Limits(memory_bytes=32 << 20, pids_limit=20))
    assert cg.exists()
    if hier.version == 1:
        assert int((cg.dirs["memory"] / "memory.limit_in_bytes").read_text()) == 32 << 20
    else:
        assert (cg.dirs[""] / "memory.max").read_text().strip() == str(32 << 20)
    children = [subprocess.Popen(["sleep", "1000"]) for _ in range(3)]
    for p in children:
        for path in cg.procs_files():
            with open(path, "w") as f:
                f.write(str(p.pid))
    try:
        wait_for(lambda: sorted(cg.procs()) == sorted(p.pid for p in children), what="processes in the cgroup")
        assert not cg.oom_killed()
        assert cg.kill_all(timeout_s=5)
        for p in children:
            assert p.wait(timeout=5) == -9
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
                p.wait()
    cg.remove()
    assert not cg.exists()
    cg.remove()  # idempotent


def test_limit_without_its_controller_is_an_error(tmp_path: Path, v1_root: Path) -> None:
    root = tmp_path / "v2-no-pids"
    root.mkdir()
    (root / "cgroup.controllers").write_text("memory\n")
    hier = Hierarchy(root)
    hier.prepare_parent("p")
    cg = hier.cgroup("p", "c")
    with pytest.raises(OSError, match="pids limit requested but the pids cgroup controller is not available"):
        cg.create(Limits(pids_limit=5))
    cg.create(Limits(memory_bytes=1 << 20))  # no pids limit: fine without the controller
    assert (cg.dirs[""] / "memory.max").read_text() == str(1 << 20)
    assert not (cg.dirs[""] / "pids.max").exists()
    (v1_root / "pids" / "cgroup.procs").unlink()
    with pytest.raises(OSError, match="pids limit requested"):
        Hierarchy(v1_root).cgroup("p", "c").create(Limits(pids_limit=5))


def test_real_cgroup2_without_controllers() -> None:
    """The v2 code path on a real cgroup2 mount (on a v1 hybrid host: the controller-less unified one)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = Path("/sys/fs/cgroup")
    if detect_version(root) != 2:
        root = root / "unified"
        if detect_version(root) != 2:
            pytest.skip("no cgroup2 mount")
    hier = Hierarchy(root)
    parent = f"berth-test-{uuid.uuid4().hex[:10]}"
    try:
        hier.prepare_parent(parent)
        cg = hier.cgroup(parent, "c1")
        cg.create(Limits())
        child = subprocess.Popen(["sleep", "1000"])
        try:
            (cg.dirs[""] / "cgroup.procs").write_text(str(child.pid))
            assert cg.procs() == [child.pid]
            assert cg.kill_all(timeout_s=5)
            assert child.wait(timeout=5) == -9
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        cg.remove()
        assert not cg.exists()
    finally:
        leaf = root / parent / "c1"
        if leaf.is_dir():
            leaf.rmdir()
        if (root / parent).is_dir():
            (root / parent).rmdir()


def test_join_files_name_tasks_on_v1_and_procs_on_v2(v1_root: Path, v2_root: Path) -> None:
    cg1 = Hierarchy(v1_root).cgroup("berth", "c1")
    cg1.create(Limits())
    assert sorted(cg1.join_files()) == sorted(str(d / "tasks") for d in cg1.unique_dirs())
    cg2 = Hierarchy(v2_root).cgroup("berth", "c1")
    cg2.create(Limits())
    assert cg2.join_files() == [str(v2_root / "berth" / "c1" / "cgroup.procs")]


def test_real_join_files_move_a_single_threaded_child_into_every_hierarchy(
    real_parent: tuple[Hierarchy, str],
) -> None:
    """What the supervisor's forked child does before it becomes the container (issue 2: through `tasks` on
    v1, without the RCU grace period that a write to cgroup.procs waits for)."""
    hier, parent = real_parent
    hier.prepare_parent(parent)
    cg = hier.cgroup(parent, "c1")
    cg.create(Limits(pids_limit=20))
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only joins, signals and waits to be killed
        try:
            for path in cg.join_files():
                with open(path, "w") as f:
                    f.write("0")
            os.write(ready_w, b"1")
            signal.pause()
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1", "the child could not join its cgroup"
        for d in cg.unique_dirs():  # every hierarchy, not only one
            assert int((d / "cgroup.procs").read_text()) == pid, d
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        cg.remove()  # also when an assertion failed: no cgroup left behind
