"""The agent's Prometheus metrics, served on /metrics."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Gauge, Histogram

from berth.metrics_http import serve_metrics

_START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.running = Gauge(
            "berth_agent_containers_running", "Containers running on this host", registry=self.registry
        )
        self.start_latency = Histogram(
            "berth_agent_container_start_seconds",
            "From the agent taking up a container to its process running (image pull included)",
            buckets=_START_BUCKETS,
            registry=self.registry,
        )
        self.connected = Gauge(
            "berth_agent_controller_connected", "1 while the agent has a session with a controller",
            registry=self.registry,
        )

    async def serve(self, address: str) -> asyncio.Server:
        return await serve_metrics(self.registry, address)
