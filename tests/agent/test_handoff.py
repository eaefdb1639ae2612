"""agent.handoff without a kernel: a starting container waits for a container on its way out (no longer
assigned here) that holds its host port, and not for one still assigned here (a real clash, which the start
reports). The whole path on a cluster is tests/e2e/test_service_ports.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from agent.handoff import await_port_holders
from agent.network.ipam import Allocation, Port

WEB = Port("", 8080, 80, "tcp")


def worker(leaving: asyncio.Task[None], staying: asyncio.Task[None]) -> Any:
    containers = {"old": Allocation("10.0.0.2", [WEB]), "kept": Allocation("10.0.0.3", [Port("", 9090, 90, "tcp")]),
                  "other": Allocation("10.0.0.4", [Port("", 8080, 80, "udp")])}
    return SimpleNamespace(network=SimpleNamespace(ipam=SimpleNamespace(containers=containers)),
                           assignments={"kept": object(), "new": object()},
                           _actors={"old": leaving, "kept": staying})


def test_waits_for_the_leaving_holder_only() -> None:
    async def main() -> None:
        gone = asyncio.Event()
        leaving = asyncio.create_task(gone.wait())
        staying = asyncio.create_task(asyncio.Event().wait())  # never ends
        w = worker(leaving, staying)
        try:
            waiting = asyncio.create_task(await_port_holders(w, "new", [WEB], timeout_s=30))
            await asyncio.sleep(0)
            assert not waiting.done()  # "old" still holds 8080/tcp
            gone.set()  # its removal finishes
            await asyncio.wait_for(waiting, 10)
            # 9090 is held by a container still assigned here: not waited for (the attach reports the clash);
            # 8080/udp is another port.
            await asyncio.wait_for(await_port_holders(w, "new", [Port("", 9090, 90, "tcp"),
                                                                  Port("", 8080, 80, "udp")], timeout_s=30), 10)
        finally:
            staying.cancel()
            await asyncio.gather(leaving, staying, return_exceptions=True)

    asyncio.run(main())
