"""Host ports handed from a container on its way out to its replacement on the same host (issue 6).

A service's stop-first rolling update removes a task and makes its successor at once; the scheduler sees
the host port free as soon as the old task is removed from etcd, so the successor may be placed on the
same host while the agent is still stopping the old container (SIGTERM, then SIGKILL after its grace time),
which holds the port until its network is detached. The successor's start waits for that removal instead
of failing with "port in use". A port held by a container that is still assigned here (running or
stopped) is not waited for: that is a real clash, and the start fails saying so.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from agent.network.ipam import Port

if TYPE_CHECKING:
    from agent.worker import Worker

log = logging.getLogger(__name__)

HANDOFF_TIMEOUT_S = 60.0  # longer than any sane stop grace time; after it the start fails with the clash


async def await_port_holders(worker: Worker, cid: str, ports: list[Port],
                             timeout_s: float = HANDOFF_TIMEOUT_S) -> None:
    """Wait until containers being removed from this host no longer hold any of `ports`."""
    network = worker.network
    fixed = [p for p in ports if p.host_port]
    if network is None or not fixed:
        return
    holders: dict[str, asyncio.Task[None]] = {}
    # A snapshot (one C-level copy): the network's thread attaches and detaches meanwhile, as it does the
    # old container's detach during exactly this wait; iterating the live dict could raise RuntimeError.
    for other, allocation in list(network.ipam.containers.items()):
        if other == cid or other in worker.assignments:
            continue
        if any(p.clashes(q) for p in fixed for q in allocation.ports):
            actor = worker._actors.get(other)
            if actor is not None:
                holders[other] = actor
    if not holders:
        return
    log.info("container %s waits for %s to release its host ports", cid[:12], ", ".join(h[:12] for h in holders))
    await asyncio.wait(list(holders.values()), timeout=timeout_s)
