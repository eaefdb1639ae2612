"""The event loop berth's daemons (controller, agent, hollow agents) run on.

uvloop (libuv) by default: the same asyncio API with the loop's own work (ready callbacks, timers, the
selector, the wake-ups from grpc's poller thread) in C; measured at ~7% less CPU for the controller and for
the agents in bench/schedule.py (docs/benchmarks.md, 2026-11-28). `BERTH_EVENT_LOOP=asyncio` runs the
standard library's loop instead (to compare, or to rule the loop out when chasing a bug).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LOOPS = ("uvloop", "asyncio")


class LoopChoiceError(ValueError):
    """BERTH_EVENT_LOOP names no loop berth knows."""


def chosen() -> str:
    """The loop BERTH_EVENT_LOOP picks (uvloop when unset)."""
    name = os.environ.get("BERTH_EVENT_LOOP", "").strip().lower() or "uvloop"
    if name not in LOOPS:
        raise LoopChoiceError(f"BERTH_EVENT_LOOP={name!r} is not a loop berth runs on: use one of {', '.join(LOOPS)}")
    return name


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the chosen loop."""
    try:
        name = chosen()
    except LoopChoiceError:
        main.close()  # never started: no "coroutine was never awaited" warning
        raise
    if name == "asyncio":
        return asyncio.run(main)
    import uvloop

    return uvloop.run(main)
