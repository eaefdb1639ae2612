"""--memory-swap, --cpu-shares and --cpuset-cpus (issue 3b) from one model onto cgroup v1 and v2: the writes
checked against v1- and v2-shaped trees in a temporary directory (the kernel here is a v1 hybrid; the real
v1 writes are checked in test_hardening.py), plus the spec -> ContainerConfig mapping of the run options."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from agent.executor import ExecutorError
from agent.runtime.cgroup_limits import shares_to_weight
from agent.runtime.cgroups import Hierarchy, Limits
from agent.runtime.mounts import Mount
from agent.runtime.security import Security, Ulimit
from agent.worker import run_options
from berth.api import types_pb2 as t


@pytest.fixture
def v2_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


@pytest.fixture
def v1_root(tmp_path: Path) -> Path:
    """memory (with swap accounting), cpu, pids and cpuset, each on its own, as a hybrid host mounts them."""
    root = tmp_path / "cgroup1"
    for ctrl in ("memory", "cpu", "pids", "cpuset"):
        (root / ctrl).mkdir(parents=True)
        (root / ctrl / "cgroup.procs").write_text("")
    (root / "cpuset" / "cpuset.cpus").write_text("0-3\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    return root


def test_shares_to_weight() -> None:
    assert shares_to_weight(2) == 1
    assert shares_to_weight(1024) == 39
    assert shares_to_weight(262144) == 10000
    assert shares_to_weight(512) == 20


def test_v2_swap_weight_cpuset(v2_root: Path) -> None:
    hier = Hierarchy(v2_root)
    hier.prepare_parent("berth")
    cg = hier.cgroup("berth", "c1")
    d = v2_root / "berth" / "c1"
    d.mkdir()
    (d / "memory.swap.max").write_text("max")  # present when the kernel accounts swap
    cg.create(Limits(memory_bytes=64 << 20, memory_swap_bytes=96 << 20, cpu_shares=512, cpuset_cpus="0-1"))
    assert (d / "memory.max").read_text() == str(64 << 20)
    assert (d / "memory.swap.max").read_text() == str(32 << 20)  # v2 counts swap alone
    assert (d / "cpu.weight").read_text() == "20"
    assert (d / "cpuset.cpus").read_text() == "0-1"
    cg.create(Limits(memory_bytes=64 << 20))  # default: as much swap as memory (twice in total)
    assert (d / "memory.swap.max").read_text() == str(64 << 20)
    assert (d / "cpu.weight").read_text() == "100"
    cg.create(Limits(memory_bytes=64 << 20, memory_swap_bytes=-1))
    assert (d / "memory.swap.max").read_text() == "max"


def test_v2_swap_without_swap_accounting_is_an_error(v2_root: Path) -> None:
    hier = Hierarchy(v2_root)
    hier.prepare_parent("berth")
    cg = hier.cgroup("berth", "c2")
    with pytest.raises(OSError, match=r"--memory-swap requested but this host.s cgroups lack memory\.swap\.max") as e:
        cg.create(Limits(memory_bytes=64 << 20, memory_swap_bytes=128 << 20))
    assert e.value.errno == errno.ENOTSUP
    cg.create(Limits(memory_bytes=64 << 20))  # without --memory-swap the missing file is fine


def test_v2_cpuset_needs_the_controller(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("memory cpu pids\n")
    (root / "cgroup.subtree_control").write_text("")
    hier = Hierarchy(root)
    hier.prepare_parent("berth")
    with pytest.raises(OSError, match="cpuset"):
        hier.cgroup("berth", "c").create(Limits(cpuset_cpus="0"))


def test_v1_memsw_shares_and_cpuset_filled_from_the_parent(v1_root: Path) -> None:
    hier = Hierarchy(v1_root)
    assert "cpuset" in hier.v1_controllers
    cg = hier.cgroup("berth/host-a", "c1")
    for ctrl in ("memory", "cpu", "pids", "cpuset"):
        (v1_root / ctrl / "berth" / "host-a" / "c1").mkdir(parents=True)
    for d in (v1_root / "cpuset/berth", v1_root / "cpuset/berth/host-a", v1_root / "cpuset/berth/host-a/c1"):
        (d / "cpuset.cpus").write_text("")
        (d / "cpuset.mems").write_text("")
    (v1_root / "memory/berth/host-a/c1/memory.memsw.limit_in_bytes").write_text("-1")
    cg.create(Limits(memory_bytes=32 << 20, memory_swap_bytes=48 << 20, cpu_shares=512, cpuset_cpus="1"))
    assert (v1_root / "memory/berth/host-a/c1/memory.memsw.limit_in_bytes").read_text() == str(48 << 20)
    assert (v1_root / "cpu/berth/host-a/c1/cpu.shares").read_text() == "512"
    # a v1 cpuset needs cpus and mems before a process can join: the empty parents get the root's.
    assert (v1_root / "cpuset/berth/cpuset.cpus").read_text() == "0-3"
    assert (v1_root / "cpuset/berth/host-a/cpuset.mems").read_text() == "0"
    assert (v1_root / "cpuset/berth/host-a/c1/cpuset.cpus").read_text() == "1"
    cg.create(Limits(memory_bytes=32 << 20))
    assert (v1_root / "memory/berth/host-a/c1/memory.memsw.limit_in_bytes").read_text() == str(64 << 20)
    assert (v1_root / "cpu/berth/host-a/c1/cpu.shares").read_text() == "1024"


def test_run_options_from_the_spec_and_the_image_user() -> None:
    spec = t.ContainerSpec(
        name="c", image="busybox", cap_add=["NET_ADMIN"], cap_drop=["MKNOD"], read_only=True,
        ulimits=["nofile=10:20"], memory_swap_bytes=-1, cpu_shares=100, cpuset_cpus="0",
        volumes=["data:/data:ro", "/srv:/srv"], tmpfs=["/run:size=1m"],
    )
    opts = run_options(spec, image_user="app")
    assert opts["security"] == Security(cap_add=("NET_ADMIN",), cap_drop=("MKNOD",), read_only=True, user="app",
                                        ulimits=(Ulimit("nofile", 10, 20),))
    assert opts["mounts"] == (Mount("volume", "/data", "data", True), Mount("bind", "/srv", "/srv"),
                              Mount("tmpfs", "/run", "", False, "size=1m"))
    assert (opts["memory_swap_bytes"], opts["cpu_shares"], opts["cpuset_cpus"]) == (-1, 100, "0")
    spec.user = "1000:1000"
    assert run_options(spec, image_user="app")["security"].user == "1000:1000"  # --user wins over USER
    spec.ulimits.append("bogus=1")
    with pytest.raises(ExecutorError, match="invalid --ulimit 'bogus=1'"):
        run_options(spec, image_user="")
