"""Which of gRPC's I/O engines berth's daemons use (issue 6, throughput): set before grpc is imported.

grpcio reads GRPC_EXPERIMENTS once, when the grpc module is imported: the daemons' packages (controller, agent)
call `choose()` first thing, before anything of theirs imports grpc.

grpcio's asyncio API always waits for completions on one poller thread, which hands them to the event loop.
With the EventEngine (grpcio's default for client channels and server listeners) the sockets are read and
written by the engine's own thread pool as well, so every message crosses two threads before the loop sees it:
a futex wake-up and a context switch more per message in each process. With the EventEngine turned off for
channels and listeners (`-event_engine_client,-event_engine_listener`), the poller thread polls the sockets
itself. On bench/schedule.py this takes ~12% of the CPU per container off the controller and the agents
(docs/benchmarks.md, session 7); behaviour (keepalives, deadlines, flow control) is the same.

An operator's GRPC_EXPERIMENTS, set even to empty, is left as it is (empty: grpcio's defaults).
"""

from __future__ import annotations

import os

EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def choose() -> None:
    """Turn the EventEngine off for channels and listeners unless GRPC_EXPERIMENTS says otherwise. Call it
    before grpc is imported; afterwards it changes nothing in this process (only in the processes it starts)."""
    os.environ.setdefault("GRPC_EXPERIMENTS", EXPERIMENTS)
