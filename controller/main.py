"""The berth-controller command: serves the control API and agent sessions, places containers, and
exports /metrics. All state is in etcd; the controller itself keeps none that matters across restarts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys

from berth import loop as event_loop
from berth import rpc, serving
from berth.api import control_pb2_grpc, dispatcher_pb2_grpc
from controller.api import ControlAPI
from controller.cache import ClusterCache
from controller.dispatcher import Dispatcher
from controller.leader import Leadership
from controller.metrics import ControllerMetrics
from controller.network import NetworkConfigError, SubnetAllocator
from controller.orchestrator import Orchestrator
from controller.services import ServiceReconciler
from controller.store import Store, StoreError
from controller.user_networks import DEFAULT_POOL, UserNetworks

log = logging.getLogger("berth.controller")

# issue 6: a Run allocates a few hundred short-lived objects (futures, gRPC call state, protobuf wrappers) and
# the cluster cache keeps a few per container for ever; with CPython's default thresholds (700, 10, 10) a full
# collection (~130 ms over ~200,000 objects at 10,000 containers) came every few seconds under load. Young
# collections every 10,000 allocations instead of 700 (most objects are gone by then) and full ones far
# rarer: bench/schedule.py's controller spent 3.1 CPU-s in collections over its life, 0.8 with these.
GC_THRESHOLDS = (10_000, 20, 100)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="berth-controller", description="Run a berth controller.")
    p.add_argument("--etcd", default="http://127.0.0.1:2379", help="etcd client URL (default %(default)s)")
    p.add_argument("--listen", default="0.0.0.0:7070", help="gRPC address for berthctl and agents")
    p.add_argument("--metrics-listen", default="0.0.0.0:7071", help="address of /metrics")
    p.add_argument("--lease-ttl", type=int, default=5, help="seconds a host lives without heartbeats")
    p.add_argument("--leader-ttl", type=int, default=5,
                   help="seconds before another controller takes over from a dead leader (default %(default)s)")
    p.add_argument("--id", default="", help="this controller's name in the election (default: host:port)")
    p.add_argument("--strategy", choices=("spread", "binpack"), default="spread",
                   help="how hosts are chosen (default %(default)s)")
    p.add_argument("--sample", type=int, default=0,
                   help="fitting hosts looked at per placement, 0 for all (large clusters: 10)")
    p.add_argument("--container-cidr", default="10.88.0.0/16",
                   help="addresses of containers, cut into one subnet per host (default %(default)s)")
    p.add_argument("--node-subnet-size", type=int, default=24, help="prefix length of each host's subnet")
    p.add_argument("--network-pool", default=DEFAULT_POOL,
                   help="where user networks made without --subnet get a /24 (default %(default)s)")
    p.add_argument("--max-txn-ops", type=int, default=128,
                   help="operations per etcd transaction: etcd's --max-txn-ops (default %(default)s, etcd's own)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.sample < 0:  # session 7: -1 was taken, and meant every host
        p.exit(2, f"berth-controller: invalid --sample {args.sample}: give how many fitting hosts a placement "
                  "looks at, or 0 for all of them\n")
    return args


async def serve(args: argparse.Namespace) -> None:
    store = Store(args.etcd)
    try:
        await store.connect()
    except StoreError as exc:
        raise SystemExit(f"berth-controller: cannot reach etcd at {args.etcd}: {exc}") from None
    try:  # issue 6: what a node runs is derived from the container keys; an older controller's keys go
        dropped = await store.drop_assignment_keys()
    except StoreError as exc:
        raise SystemExit(f"berth-controller: cannot clear the old assignment keys in etcd: {exc}") from None
    if dropped:
        log.info("deleted %d /berth/assignments/ keys of an older controller", dropped)
    metrics = ControllerMetrics()
    orchestrator = Orchestrator(store, metrics)
    orchestrator.strategy, orchestrator.sample = args.strategy, args.sample
    orchestrator.cache, orchestrator.max_txn_ops = ClusterCache(store), max(4, args.max_txn_ops)  # issue 6
    orchestrator.reconcilers.append(ServiceReconciler(store, orchestrator).reconcile)
    leadership = Leadership(store, args.id or f"{socket.gethostname()}:{args.listen}", args.leader_ttl,
                            orchestrator.lead)
    api = ControlAPI(store, orchestrator, metrics)
    server = rpc.aio_server()
    control_pb2_grpc.add_ControlServicer_to_server(api, server)
    dispatcher = Dispatcher(store, orchestrator, metrics, args.lease_ttl)
    try:
        dispatcher.subnets = SubnetAllocator(store, args.container_cidr, args.node_subnet_size)
    except NetworkConfigError as exc:
        raise SystemExit(f"berth-controller: {exc}") from None
    try:  # issue 5: user networks
        api.networks = dispatcher.networks = UserNetworks(store, args.container_cidr, args.network_pool)
    except ValueError as exc:
        raise SystemExit(f"berth-controller: invalid --network-pool: {exc}") from None
    try:  # issue 5 (order): networks older than their open key get it; one a crashed `network rm` closed reopens
        await store.open_networks()
    except StoreError as exc:
        raise SystemExit(f"berth-controller: opening the user networks in etcd: {exc}") from None
    dispatcher_pb2_grpc.add_DispatcherServicer_to_server(dispatcher, server)
    health_servicer = await serving.start(
        server, args.listen, "berth-controller", lambda: metrics.serve(args.metrics_listen)
    )
    log.info("controller listening on %s, metrics on %s, etcd %s", args.listen, args.metrics_listen, args.etcd)
    tasks = [
        asyncio.create_task(leadership.run()),
        asyncio.create_task(metrics.run_refresh_loop(store, cache=orchestrator.cache)),
        asyncio.create_task(orchestrator.cache.run()),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await leadership.resign()
    for task in tasks:
        task.cancel()
    await server.stop(grace=2)
    await api.links.close()
    with contextlib.suppress(StoreError):
        await store.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gc.set_threshold(*GC_THRESHOLDS)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        event_loop.run(serve(args))  # issue 6 (throughput): uvloop unless BERTH_EVENT_LOOP says otherwise
    except event_loop.LoopChoiceError as exc:
        sys.exit(f"berth-controller: {exc}")
