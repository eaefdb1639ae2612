"""Two controllers racing over the same 500 pending containers on one real etcd never place one twice
(issue 6): every placement compares the container's revision, and the loser re-reads.

Each placement puts the container key with its node (its assignment there, issue 6); the etcd history of the
container keys from before the race is read back, so a container placed twice (even if later overwritten) is
seen."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter

import aetcd

from berth.api import types_pb2 as t
from controller.metrics import ControllerMetrics
from controller.orchestrator import Orchestrator
from controller.store import CONTAINERS, PREFIX, Store

N = 500


async def _assignment_puts(url: str, start: int) -> Counter[str]:
    """How many times each container was written placed on a node (given its assignment there) since a
    revision: created placed, placed from pending, or written placed over a placed copy of the same run (a
    second placement that did not see the first); a placed container written with a new run (generation) is
    not a placement."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    puts: Counter[str] = Counter()
    end = CONTAINERS + b"~end"  # a key put after the race: the history is read up to it
    try:
        await client.put(end, b"")
        watch = await client.watch_prefix(CONTAINERS, start_revision=start + 1, prev_kv=True)
        async with asyncio.timeout(30):
            async for event in watch:
                if bytes(event.kv.key) == end:
                    break
                if str(event.kind) == "PUT":
                    c, before = t.Container(), t.Container()
                    c.ParseFromString(bytes(event.kv.value))
                    if event.prev_kv is not None:
                        before.ParseFromString(bytes(event.prev_kv.value))
                    if c.node_id and (not before.node_id or before.generation == c.generation):
                        puts[c.id] += 1
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
