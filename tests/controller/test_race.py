"""Two controllers racing over the same 500 pending containers on one real etcd never place one twice
(issue 6): every placement compares the container's revision, and the loser re-reads.

Each placement puts the container's assignment; the etcd history of the assignment keys from before the race
is read back, so a container placed twice (even if later overwritten) is seen."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter

import aetcd

from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import ASSIGNMENTS, PREFIX, Store

N = 500


async def _assignment_puts(url: str, start: int) -> Counter[str]:
    """How many times each container's assignment was put since a revision."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    puts: Counter[str] = Counter()
    end = ASSIGNMENTS + b"~end"  # a key put after the race: the history is read up to it
    try:
        await client.put(end, b"")
        watch = await client.watch_prefix(ASSIGNMENTS, start_revision=start + 1)
        async with asyncio.timeout(30):
            async for event in watch:
                if bytes(event.kv.key) == end:
                    break
                if str(event.kind) == "PUT":
                    puts[bytes(event.kv.key).decode().rsplit("/", 1)[1]] += 1
        await watch.cancel()
    finally:
        await client.delete_prefix(PREFIX)
        await client.close()
    return puts


async def _race(url: str) -> tuple[Counter[str], dict[str, str], dict[str, list[str]]]:
    a, b = Store(url), Store(url)
    await a.connect()
    await b.connect()
    try:
        for i in range(3):
            lease = await a.grant_lease(60)
            await a.put_node(t.Node(id=f"h{i}", name=f"h{i}", lease_id=lease,
                                    capacity=t.Resources(memory_bytes=1 << 40, nano_cpus=64 * 10**9)))
        ids = [secrets.token_hex(32) for _ in range(N)]
        for cid in ids:
            await a.create_container(t.Container(
                id=cid, spec=t.ContainerSpec(name=f"c{cid[:8]}", image="busybox"),
                desired_state=t.DESIRED_RUNNING, generation=1))
        start = await a.revision()
        one, two = Orchestrator(a, ControllerMetrics()), Orchestrator(b, ControllerMetrics())
        # Both sweep at once, and one also places containers one by one, as its API would.
        await asyncio.gather(one.place_pending(), two.place_pending(),
                             *(one.schedule(cid) for cid in ids[::7]), two.place_pending())
        placed = {v.container.id: v.container.node_id for v in await a.list_containers()}
        held: dict[str, list[str]] = {}
        for i in range(3):
            _, assignments = await a.assignments(f"h{i}")
            for asg in assignments:
                held.setdefault(asg.container_id, []).append(f"h{i}")
        puts = await _assignment_puts(url, start)
        return puts, placed, held
    finally:
        await a.close()
        await b.close()


def test_two_controllers_racing_never_place_a_container_twice(etcd_url: str) -> None:
    puts, placed, held = asyncio.run(_race(etcd_url))
    assert len(placed) == N
    assert all(placed.values()), "every container is placed"
    doubles = {cid: n for cid, n in puts.items() if n != 1}
    assert not doubles, f"{len(doubles)} containers were placed more than once"
    assert set(puts) == set(placed)
    assert all(held[cid] == [node] for cid, node in placed.items())
