"""The daemons' event loop (berth/loop.py, issue 6 throughput): the dev cluster's controller and agents run on
uvloop; BERTH_EVENT_LOOP=asyncio picks the standard library's loop; any other value is refused in one line
before a daemon does anything."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from berth import loop as event_loop
from berthctl.dev import cluster as dev_cluster

ROOT = Path(__file__).resolve().parent.parent


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_cluster_daemons_run_on_uvloop(cluster: dev_cluster.ClusterInfo) -> None:
    daemons = [p for p in cluster.processes if p.role == "controller" or p.role.startswith("agent-")]
    assert any(p.role == "controller" for p in daemons) and any(p.role.startswith("agent-") for p in daemons)
    for p in daemons:
        assert dev_cluster.alive(p.pid, p.start_time), f"{p.role} (pid {p.pid}) is not running"
        assert "uvloop/loop." in _maps(p.pid), f"{p.role} (pid {p.pid}) has not loaded uvloop"


async def _loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(("value", "module"), [("", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio"),
                                               (" AsyncIO ", "asyncio")])
def test_run_picks_the_loop(monkeypatch: pytest.MonkeyPatch, value: str, module: str) -> None:
    monkeypatch.setenv("BERTH_EVENT_LOOP", value)
    assert event_loop.run(_loop_type()).split(".")[0] == module


@pytest.mark.parametrize(("package", "prog"), [("controller", "berth-controller"), ("agent", "berth-agent")])
def test_unknown_loop_refused_in_one_line(package: str, prog: str, tmp_path: Path) -> None:
    args = ["--etcd", "http://127.0.0.1:9"] if package == "controller" else ["--controller", "127.0.0.1:9"]
    args += ["--state-dir", str(tmp_path / "state")] if package == "agent" else []
    proc = subprocess.run([sys.executable, "-m", package, *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "BERTH_EVENT_LOOP": "libev"}, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"{prog}: BERTH_EVENT_LOOP='libev' is not a loop berth runs on: use one of uvloop, asyncio"]
    assert not (tmp_path / "state").exists()  # nothing was started
