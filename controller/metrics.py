"""The controller's Prometheus metrics, served on /metrics (berth.metrics_http).

Gauges of containers by state and hosts by state are refreshed from the store by a background task; the
scheduling-latency histogram is observed where placements are committed (controller.orchestrator).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from berth.api import types_pb2 as t
from berth.metrics_http import serve_metrics
from controller.store import Store, StoreError

if TYPE_CHECKING:
    from controller.cache import ClusterCache

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def state_name(state: int) -> str:
    return t.ContainerState.Name(state).removeprefix("STATE_").lower()  # type: ignore[arg-type]


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.containers = Gauge(
            "berth_containers", "Containers by state", ["state"], registry=self.registry
        )
        self.nodes = Gauge("berth_nodes", "Hosts by state", ["state"], registry=self.registry)
        self.scheduling_latency = Histogram(
            "berth_scheduling_latency_seconds",
            "Time from a container's creation to its placement on a host",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.api_requests = PromCounter(
            "berth_api_requests", "Control API calls by method and gRPC code", ["method", "code"],
            registry=self.registry,
        )
        self.agent_sessions = Gauge(
            "berth_agent_sessions", "Agents with an open assignment stream to this controller",
            registry=self.registry,
        )

    async def serve(self, address: str) -> asyncio.Server:
        return await serve_metrics(self.registry, address)

    async def refresh(self, store: Store, cache: ClusterCache | None = None) -> None:
        containers: Counter[str] = Counter({state_name(s): 0 for s in t.ContainerState.values() if s})
        if cache is not None and cache.ready:  # issue 6: no read of every container every 2 s
            for code, count in cache.state_counts().items():
                containers[state_name(code)] += count
        else:
            for v in await store.list_containers():
                containers[state_name(v.container.status.state or t.STATE_PENDING)] += 1
        for state, n in containers.items():
            self.containers.labels(state=state).set(n)
        nodes = Counter({"ready": 0, "down": 0})
        if cache is not None and cache.ready:
            nodes["ready"] = sum(1 for node_id in cache.nodes if node_id in cache.alive)
            nodes["down"] = len(cache.nodes) - nodes["ready"]
        else:
            for node in await store.list_nodes():
                nodes["ready" if node.state == t.NODE_READY else "down"] += 1
        for state, n in nodes.items():
            self.nodes.labels(state=state).set(n)

    async def run_refresh_loop(self, store: Store, period_s: float = 2.0, cache: ClusterCache | None = None) -> None:
        while True:
            try:
                await self.refresh(store, cache)
            except StoreError as exc:
                log.warning("metrics refresh: %s", exc)
            await asyncio.sleep(period_s)
