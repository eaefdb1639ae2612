"""Issue 6's benchmarks run end to end in CI (their figures are in docs/benchmarks.md; timings are never asserted
here): bench/schedule.py places 10,000 containers on 1,000 hollow agents and gets every one reported running
(it fails on any other answer), and bench/failover.py measures its host-death and leader-death trials. Each
prints its RESULT as its last line, with every field the issue names, and leaves no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _result(script: str, *args: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, f"bench/{script} failed:\n{proc.stderr[-4000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), proc.stdout[-2000:]
    result: dict[str, float] = json.loads(last.removeprefix("RESULT "))
    return result


def _bench_processes(state_prefix: str) -> list[str]:
    """Command lines of processes still running from a bench's state directory."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if state_prefix in cmdline:
                out.append(cmdline)
    return out


@pytest.mark.parametrize(("script", "fields", "state_prefix"), [
    ("schedule.py", {"containers", "agents", "per_second", "api_p50_ms", "api_p99_ms", "controller_peak_mib",
                     "in_flight"}, "berth-bench-schedule-"),
    ("failover.py", {"host_death_to_running_s", "leader_death_to_placement_s"}, "berth-bench-failover-"),
])
def test_bench_runs_and_reports(script: str, fields: set[str], state_prefix: str) -> None:
    result = _result(script)
    assert set(result) == fields, result
    assert all(isinstance(v, (int, float)) and v > 0 for v in result.values()), result
    if script == "schedule.py":
        assert (result["containers"], result["agents"], result["in_flight"]) == (10_000, 1_000, 1_000)
    assert not _bench_processes(state_prefix), "the bench left processes running"
