"""The agent's Prometheus metrics, served on /metrics."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Gauge, Histogram

from berth.metrics_http import serve_metrics

_START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
START_PHASES = ("image", "network", "create", "start")  # the worker's laps, in order
_PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)


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
        self.start_phase = Histogram(  # issue 2: where a start spends its time
            "berth_agent_container_start_phase_seconds",
            "Each step of a container's start: image (found or pulled), network (namespace, veth, address, "
            "/etc/hosts), create (config, writable layer), start (the supervisor's fork to the exec)",
            ["phase"], buckets=_PHASE_BUCKETS, registry=self.registry,
        )
        self.connected = Gauge(
            "berth_agent_controller_connected", "1 while the agent has a session with a controller",
            registry=self.registry,
        )
        self._phases: dict[str, Histogram] = {}  # issue 6: start_phase's children, labels() once each
        for phase in START_PHASES:  # every series exported from the start (at 0), as Prometheus advises
            self.phase(phase)

    def phase(self, name: str) -> Histogram:
        """start_phase's histogram of the phase `name`."""
        child = self._phases.get(name)
        if child is None:
            child = self._phases[name] = self.start_phase.labels(phase=name)
        return child

    async def serve(self, address: str) -> asyncio.Server:
        return await serve_metrics(self.registry, address)


class StartPhases:
    """The steps of one container start, timed one after another (issue 2): `lap(phase)` ends the step that
    began at the previous lap (or at creation)."""

    def __init__(self) -> None:
        self.began = self._mark = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps.append((phase, now - self._mark))
        self._mark = now

    def observe(self, metrics: AgentMetrics) -> None:
        for phase, seconds in self.laps:
            metrics.phase(phase).observe(seconds)

    def __str__(self) -> str:
        total = (self._mark - self.began) * 1000
        return f"{total:.1f} ms (" + ", ".join(f"{p} {s * 1000:.1f}" for p, s in self.laps) + ")"
