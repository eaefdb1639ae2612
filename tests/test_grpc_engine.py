"""gRPC's I/O engine in berth's daemons (berth/grpc_engine.py, issue 6 throughput): a process that imports the
controller or agent package before grpc (as `berth-controller`, `berth-agent` and `python -m agent.hollow` do)
has its channels and listeners on grpcio's polling engine (its tcp_posix endpoints), not the EventEngine's
posix_endpoint; an operator's GRPC_EXPERIMENTS wins, and grpcio knows the experiments berth names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from berth import grpc_engine

ROOT = Path(__file__).resolve().parent.parent

# One call through an asyncio server and channel of this process, after importing `package` (if any) first.
PROBE = """
import sys
if sys.argv[1]:
    __import__(sys.argv[1])
import asyncio, grpc, grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    await server.stop(None)

asyncio.run(main())
"""


def _probe(package: str, experiments: str | None) -> str:
    """grpc's tcp trace (stderr) of one call in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    env.update(GRPC_VERBOSITY="debug", GRPC_TRACE="tcp,event_engine_endpoint")
    if experiments is not None:
        env["GRPC_EXPERIMENTS"] = experiments
    proc = subprocess.run([sys.executable, "-c", PROBE, package], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


@pytest.mark.parametrize("package", ["controller", "agent"])
def test_daemon_packages_choose_the_polling_engine(package: str) -> None:
    trace = _probe(package, None)
    assert "tcp_posix.cc" in trace, "no socket I/O through grpcio's polling engine"
    assert "posix_endpoint.cc" not in trace, "socket I/O went through the EventEngine"
    assert "Unknown experiment" not in trace, trace[-2000:]


def test_grpc_default_without_berth() -> None:
    """The probe tells the engines apart: without berth's choice, grpcio's default is the EventEngine."""
    trace = _probe("", None)
    assert "posix_endpoint.cc" in trace and "tcp_posix.cc" not in trace


def test_operator_setting_wins() -> None:
    trace = _probe("controller", "")  # set, empty: grpcio's defaults
    assert "posix_endpoint.cc" in trace and "tcp_posix.cc" not in trace


def test_grpcio_knows_the_experiments() -> None:
    """A grpcio that dropped an experiment berth names says so on every start: caught here, at an upgrade."""
    assert "Unknown experiment" in _probe("", "-no_such_experiment_in_grpcio")  # how grpcio says it
    assert "Unknown experiment" not in _probe("", grpc_engine.EXPERIMENTS)
