"""A hollow executor and many hollow agents in one process, for scale tests only (Kubernetes' kubemark):
never the default. `berth-agent --executor hollow` runs one agent over it; `python -m agent.hollow --count N`
runs N agents, each with the real session, worker and reporter code, in one event loop.

The executor keeps containers in memory and starts nothing: start returns a running container at once, stop
an exited one. Images are real: the agents of one process share one image store (one pull from the
registry, then every `ensure` is a local lookup).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from agent.executor import ContainerConfig, ContainerInfo, ContainerNotFound, ProcessState
from berth import loop as event_loop

JOIN_WAVE = 25  # agents of one process that join together


class HollowExecutor:
    """agent.executor.Executor over a dict: nothing is started."""

    def __init__(self, log_dir: Path) -> None:
        self._containers: dict[str, ContainerInfo] = {}
        self._exits: asyncio.Queue[ContainerInfo] = asyncio.Queue()
        self._log_dir = log_dir
        self._next_pid = 1_000_000

    async def create(self, config: ContainerConfig) -> None:
        self._containers.setdefault(config.id, ContainerInfo(config.id, ProcessState.CREATED))

    async def start(self, container_id: str) -> ContainerInfo:
        if container_id not in self._containers:
            raise ContainerNotFound(f"no such container: {container_id[:12]}")
        self._next_pid += 1
        info = ContainerInfo(container_id, ProcessState.RUNNING, pid=self._next_pid, started_at_ns=time.time_ns())
        self._containers[container_id] = info
        return info

    async def stop(self, container_id: str, timeout_s: float) -> ContainerInfo:
        info = self._containers.get(container_id)
        if info is None:
            raise ContainerNotFound(f"no such container: {container_id[:12]}")
        if info.state == ProcessState.RUNNING:
            info = replace(info, state=ProcessState.EXITED, exit_code=137, finished_at_ns=time.time_ns())
            self._containers[container_id] = info
        return info

    async def remove(self, container_id: str) -> None:
        self._containers.pop(container_id, None)

    async def list(self) -> list[ContainerInfo]:
        return list(self._containers.values())

    async def exits(self) -> AsyncIterator[ContainerInfo]:
        while True:  # hollow processes never exit by themselves
            yield await self._exits.get()

    def log_path(self, container_id: str) -> Path:
        return self._log_dir / f"{container_id}.log"

    async def close(self) -> None:
        pass


async def run_many(controllers: list[str], count: int, prefix: str, state_dir: Path, registry: str,
                   streams: bool = False) -> None:
    """`count` hollow agents named <prefix><i>, each with its own session, worker and reporter; with `streams`,
    each session also follows the Peers and Names streams (their messages dropped), as a real agent's does."""
    from agent.images.registry import RegistryConfig
    from agent.images.store import ImageStore
    from agent.main import freeze_gc
    from agent.metrics import AgentMetrics
    from agent.session import Session
    from agent.worker import Reporter, Worker
    from berth.api import dispatcher_pb2 as d
    from berth.api import types_pb2 as t

    mirrors = {"docker.io": f"http://{registry}"} if registry else {}
    images = ImageStore(state_dir / "images", RegistryConfig(mirrors=mirrors, insecure={registry} - {""}))
    tasks = []
    sessions = []
    for i in range(count):
        name = f"{prefix}{i}"
        agent_dir = state_dir / name
        agent_dir.mkdir(parents=True, exist_ok=True)
        metrics = AgentMetrics()
        reporter = Reporter()
        worker = Worker(HollowExecutor(agent_dir), images, reporter, metrics, agent_dir)
        await worker.load()
        join = d.JoinRequest(
            name=name, address="127.0.0.1", agent_address="127.0.0.1:1", metrics_address="127.0.0.1:1",
            capacity=t.Resources(memory_bytes=64 << 30, nano_cpus=32 * 10**9), platform="linux/amd64",
            labels={"hollow": "true"},
        )
        session = Session(controllers, join, worker, reporter, metrics,
                          on_peers=_drop if streams else None, on_names=_drop if streams else None)
        sessions.append(session)
        tasks.append(asyncio.create_task(session.run()))
        if len(sessions) % JOIN_WAVE == 0:
            # Join in waves, as hosts of a real cluster do not all join in one second: a thousand joins at
            # once time out and retry for ever on a loaded controller.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await asyncio.gather(*(s.joined.wait() for s in sessions[-JOIN_WAVE:]))
    freeze_gc()  # issue 6 (throughput): the agents' state, out of later collections
    await asyncio.gather(*tasks)


async def _drop(message: object) -> None:
    """A stream's message to a hollow agent, which has no overlay or DNS server to apply it to."""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m agent.hollow", description="Many hollow agents (scale tests only).")
    p.add_argument("--controller", required=True, help="controller address(es), comma-separated")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--prefix", default="hollow-")
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--registry", default="", help="host:port of a plain-HTTP registry mirroring docker.io")
    p.add_argument("--streams", action="store_true", help="follow the Peers and Names streams too")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    from agent.main import tune_gc

    tune_gc()  # issue 6 (throughput): as a real agent's
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="berth-hollow-"))
    try:
        event_loop.run(run_many(args.controller.split(","), args.count, args.prefix, state_dir, args.registry,
                                args.streams))
    except event_loop.LoopChoiceError as exc:
        sys.exit(f"agent.hollow: {exc}")


if __name__ == "__main__":
    main()
