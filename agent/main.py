"""The berth-agent command: one per host."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import platform
import signal
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from berth import loop as event_loop

# issue 6 (throughput): the collector's thresholds, as the controller's (controller/main.py): young collections
# every 10,000 allocations instead of 700 (an agent's garbage is short-lived messages, statuses and futures)
# and full ones far rarer. bench/schedule.py's hollow agents spent ~7% of their CPU in collections.
GC_THRESHOLDS = (10_000, 20, 100)


def tune_gc() -> None:
    """Set the collector's thresholds for an agent process (at its start)."""
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_gc() -> None:
    """Leave everything made so far (modules, descriptors, the loaded state) out of later collections: call
    once the agent is set up, so that each full collection walks only what was made since."""
    gc.collect()
    gc.freeze()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="berth-agent", description="Run a berth agent on this host.")
    p.add_argument("--controller", required=True, help="controller address host:port; several, comma-separated")
    p.add_argument("--name", default=platform.node(), help="this host's name in the cluster")
    p.add_argument("--address", default="", help="this host's address, as other hosts reach it")
    p.add_argument("--listen", default="0.0.0.0:7072", help="address of the agent API (logs)")
    p.add_argument("--metrics-listen", default="0.0.0.0:7073", help="address of /metrics")
    p.add_argument("--state-dir", default="/var/lib/berth", help="containers, images and supervisor state")
    p.add_argument("--cgroup-parent", default="berth", help="cgroup under which containers are made")
    p.add_argument("--registry-mirror", action="append", default=[], metavar="REGISTRY=URL",
                   help="pull REGISTRY's images from URL first, e.g. docker.io=http://10.0.0.1:5000")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST:PORT",
                   help="a registry reached over plain HTTP")
    p.add_argument("--image-store-max", default="", metavar="SIZE",
                   help="high-water mark of the image store, e.g. 20g: unused images are removed above it")
    p.add_argument("--netns", default="", help="enter this named network namespace first (test hosts)")
    p.add_argument("--allow-privileged", action="store_true",
                   help="let containers on this host run with --privileged (refused otherwise)")
    p.add_argument("--executor", choices=("linux", "hollow"), default="linux",
                   help="hollow: start nothing (scale tests only, agent.hollow)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label of this host, for placement constraints (node.labels.KEY==VALUE); repeatable")
    p.add_argument("--labels-file", default="", metavar="PATH",
                   help="more labels, one KEY=VALUE a line (# comments); --label wins over it")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def enter_netns(name: str) -> None:
    """Join a named network namespace. Must run before any thread exists: setns moves one thread."""
    from pyroute2 import netns

    if not Path(f"/var/run/netns/{name}").exists():
        raise SystemExit(f"berth-agent: no network namespace {name!r} (see /var/run/netns)")
    netns.setns(name, flags=0)


def capacity() -> tuple[int, int]:
    memory = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    return memory, (os.cpu_count() or 1) * 1_000_000_000


def platform_name() -> str:
    machine = platform.machine()
    return "linux/" + {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


async def serve(args: argparse.Namespace) -> None:

    from agent.api import AgentAPI3b
    from agent.fingerprint import FingerprintError, take
    from agent.health import HealthReporter
    from agent.images.registry import RegistryConfig
    from agent.images.store import ImageStore
    from agent.metrics import AgentMetrics
    from agent.network import NetworkError, dns
    from agent.network.host import HostNetwork
    from agent.network.overlay import Peer
    from agent.runtime.linux import LinuxExecutor
    from agent.session import Session
    from agent.worker import Worker
    from berth import rpc, serving
    from berth.api import agent_pb2_grpc
    from berth.api import dispatcher_pb2 as d
    from berth.api import types_pb2 as t

    try:
        fingerprint = take(args.label, args.labels_file)  # issue 6: first, so a bad label stops nothing half-made
    except FingerprintError as exc:
        raise SystemExit(f"berth-agent: {exc}") from None
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    mirrors: dict[str, str] = {}
    for item in args.registry_mirror:
        registry, sep, url = item.partition("=")
        if not sep or not url:
            raise SystemExit(f"berth-agent: invalid --registry-mirror {item!r}: write REGISTRY=URL")
        mirrors[registry] = url
    from agent.image_api import high_water_loop, load_credentials

    images = ImageStore(state_dir / "images", RegistryConfig(
        mirrors=mirrors, insecure=set(args.insecure_registry), credentials=load_credentials(state_dir / "images"),
    ))
    executor: Any
    if args.executor == "hollow":  # issue 6: scale tests only
        from agent.hollow import HollowExecutor

        executor = HollowExecutor(state_dir)
    else:
        executor = LinuxExecutor(state_dir, args.cgroup_parent, allow_privileged=args.allow_privileged)
    metrics = AgentMetrics()
    # issue 6: the reporter also runs health checks (not on hollow agents, which start nothing)
    reporter = HealthReporter(executor if isinstance(executor, LinuxExecutor) else None, images=images)
    network = HostNetwork(state_dir)
    worker = Worker(executor, images, reporter, metrics, state_dir, network=network)
    reporter.assignments = worker.assignments
    names = dns.Names()  # issue 5 (names): the containers' DNS server, on the gateway of each network
    worker.dns = dns_server = dns.DnsServer(names, dns.container_upstreams(network, worker, dns.HostResolvConf()))
    await worker.load()

    async def on_join(reply: d.JoinResponse) -> None:
        if not reply.subnet:
            return
        try:
            await network.configure(reply.subnet, keep=set(worker.info) | set(worker.assignments),
                                    address=args.address)
            await dns.serve_networks(dns_server, network)
        except NetworkError as exc:
            logging.getLogger("berth.agent").error("container network: %s", exc)

    host = args.address or "127.0.0.1"
    memory, cpus = capacity()
    join = d.JoinRequest(
        name=args.name, address=host,
        agent_address=args.listen.replace("0.0.0.0", host),
        metrics_address=args.metrics_listen.replace("0.0.0.0", host),
        capacity=t.Resources(memory_bytes=memory, nano_cpus=cpus), platform=platform_name(),
    )
    fingerprint.fill(join)  # issue 6: capacity, platform, kernel, host name, labels
    async def on_peers(peers: Collection[d.NetworkPeer]) -> None:
        await network.set_peers([Peer(p.address, p.subnet) for p in peers])

    async def on_names(msg: d.NamesMessage) -> None:
        dns.apply(names, msg)

    session = Session(args.controller.split(","), join, worker, reporter, metrics, on_join=on_join,
                      on_peers=on_peers, on_names=on_names)
    from agent.network.usernet import attacher

    network.attacher = attacher(session.network_attach)  # issue 5: user networks' addresses

    server = rpc.aio_server()
    api = AgentAPI3b(executor, worker)  # issue 3b: + exec, volumes
    api.image_store, api.state_dir = images, state_dir  # issue 4: the image RPCs
    agent_pb2_grpc.add_AgentServicer_to_server(api, server)
    await serving.start(server, args.listen, "berth-agent", lambda: metrics.serve(args.metrics_listen))
    logging.getLogger("berth.agent").info("agent %s listening on %s", args.name, args.listen)
    freeze_gc()  # issue 6 (throughput): set up; what follows is collected without walking it

    tasks: list[asyncio.Task[object]] = [
        asyncio.create_task(session.run()), asyncio.create_task(worker.watch_exits())
    ]
    if args.image_store_max:
        from berth.units import parse_size

        limit = parse_size(args.image_store_max, "--image-store-max")
        tasks.append(asyncio.create_task(high_water_loop(images, state_dir, limit)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter: asyncio.Task[object] = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({waiter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await server.stop(grace=1)
    await dns_server.close_all()
    await executor.close()  # containers keep running: they belong to the supervisor, not to the agent
    for task in done:
        if task is not waiter:
            task.result()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tune_gc()  # issue 6 (throughput)
    if args.netns:
        enter_netns(args.netns)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        event_loop.run(serve(args))  # issue 6 (throughput): uvloop unless BERTH_EVENT_LOOP says otherwise
    except event_loop.LoopChoiceError as exc:
        sys.exit(f"berth-agent: {exc}")
