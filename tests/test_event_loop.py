"""The daemons' event loop (berth/loop.py, issue 6 throughput): the dev cluster's controller and agents run on
uvloop; BERTH_EVENT_LOOP=asyncio picks the standard library's loop; any other value is refused in one line
before a daemon does anything."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from berth import loop as event_loop
from berthctl.dev import cluster as dev_cluster

ROOT = Path(__file__).resolve().parent.parent


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _daemons(cluster: dev_cluster.ClusterInfo) -> dict[int, str]:
    """The cluster's controller and agent processes now (tests before this one restart some), by pid."""
    found = {}
    for pid in dev_cluster.find_processes(Path(cluster.state_dir), [h.netns for h in cluster.hosts]):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"-m" in argv and argv[argv.index(b"-m") + 1:][:1] in ([b"controller"], [b"agent"]):
                found[pid] = argv[argv.index(b"-m") + 1].decode()
    return found


def test_cluster_daemons_run_on_uvloop(cluster: dev_cluster.ClusterInfo) -> None:
    daemons = _daemons(cluster)
    assert sorted(daemons.values()).count("agent") == len(cluster.hosts), daemons
    assert "controller" in daemons.values(), daemons
    for pid, role in daemons.items():
        assert "uvloop/loop." in _maps(pid), f"the {role} (pid {pid}) has not loaded uvloop"


async def _loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(("value", "module"), [("", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio"),
                                               (" AsyncIO ", "asyncio")])
def test_run_picks_the_loop(monkeypatch: pytest.MonkeyPatch, value: str, module: str) -> None:
    monkeypatch.setenv("BERTH_EVENT_LOOP", value)
    assert event_loop.run(_loop_type()).split(".")[0] == module


@pytest.mark.parametrize(("package", "prog"), [("controller", "berth-controller"), ("agent", "berth-agent"),
                                               ("agent.hollow", "agent.hollow")])
def test_unknown_loop_refused_in_one_line(package: str, prog: str, tmp_path: Path) -> None:
    args = ["--etcd", "http://127.0.0.1:9"] if package == "controller" else ["--controller", "127.0.0.1:9"]
    args += ["--state-dir", str(tmp_path / "state")] if package != "controller" else []
    proc = subprocess.run([sys.executable, "-m", package, *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "BERTH_EVENT_LOOP": "libev"}, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"{prog}: BERTH_EVENT_LOOP='libev' is not a loop berth runs on: use one of uvloop, asyncio"]
    assert not (tmp_path / "state").exists()  # nothing was started
