"""The agent's start-latency breakdown (issue 2): agent.metrics.StartPhases, and the worker observing each
phase of a real container's start in berth_agent_container_start_phase_seconds."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from agent.metrics import AgentMetrics, StartPhases
from berth.api import types_pb2 as t
from tests.agent.conftest import Host, async_wait_for, run, start_supervisor
from tests.agent.test_restart import FakeSleep, assign, worker_on

PHASES = {"image", "network", "create", "start"}


def phase_samples(registry: CollectorRegistry, suffix: str) -> dict[str, float]:
    return {
        s.labels["phase"]: s.value
        for family in registry.collect() if family.name == "berth_agent_container_start_phase_seconds"
        for s in family.samples if s.name.endswith(suffix)
    }


def test_laps_are_consecutive_and_observed() -> None:
    metrics = AgentMetrics()
    phases = StartPhases()
    phases.lap("image")
    phases.lap("network")
    assert [p for p, _ in phases.laps] == ["image", "network"]
    assert all(seconds >= 0 for _, seconds in phases.laps)
    phases.observe(metrics)
    assert phase_samples(metrics.registry, "_count") == {"image": 1.0, "network": 1.0, "create": 0.0, "start": 0.0}
    assert str(phases).endswith(")") and "image " in str(phases) and "network " in str(phases)


def test_a_real_start_is_observed_by_phase(host: Host) -> None:
    start_supervisor(host)

    async def body() -> None:
        async with worker_on(host, FakeSleep()) as (w, _ex):
            w.apply(assign("phases", "sleep", "1000", restart="no"))

            async def running() -> bool:
                s = w.reporter.sent.get("phases")
                return s is not None and s.state == t.STATE_RUNNING

            await async_wait_for(running, what="the container to run")
            assert phase_samples(w.metrics.registry, "_count") == dict.fromkeys(PHASES, 1.0)
            sums = phase_samples(w.metrics.registry, "_sum")
            assert set(sums) == PHASES and all(v > 0 for v in sums.values()), sums

    run(body())
