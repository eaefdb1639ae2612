"""Reading a container's log: CRI-format lines (`<RFC3339Nano> <stdout|stderr> <F|P> <text>`), as the
supervisor writes them, turned into LogEntry messages; with follow, new lines as they are written."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from berth.api import types_pb2 as t

POLL_S = 0.05


def parse_timestamp(text: str) -> int:
    """`2026-11-27T18:00:00.123456789Z` -> nanoseconds since the epoch."""
    main, _, frac = text.rstrip("Z").partition(".")
    base = dt.datetime.fromisoformat(main).replace(tzinfo=dt.UTC)
    return int(base.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])


def parse_line(line: bytes) -> t.LogEntry | None:
    parts = line.split(b" ", 3)
    if len(parts) < 3:
        return None
    stamp, stream, tag = parts[0], parts[1], parts[2]
    text = parts[3] if len(parts) == 4 else b""
    try:
        ts = parse_timestamp(stamp.decode())
    except ValueError:
        return None
    data = text + (b"\n" if tag == b"F" else b"")
    kind = t.LogEntry.STDERR if stream == b"stderr" else t.LogEntry.STDOUT
    return t.LogEntry(stream=kind, data=data, timestamp_ns=ts)


async def read_log(
    path: Path,
    *,
    follow: bool,
    tail: int,
    finished: Callable[[], bool],
    changed: Callable[[], Awaitable[None]],
    appear_timeout_s: float = 60.0,
) -> AsyncIterator[t.LogEntry]:
    """Entries of a log file. With follow, waits for the file to appear (a container attached to before it
    starts) and for new lines, until `finished()` says the container is done and the file is drained."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + appear_timeout_s
    while not path.exists():
        if not follow or finished() or loop.time() > deadline:
            return
        await _pause(changed)
    with path.open("rb") as f:
        lines: collections.abc.Iterable[bytes] = collections.deque(f, maxlen=tail) if tail > 0 else f
        pending = b""
        for line in lines:
            if not line.endswith(b"\n"):
                pending = line
                break
            entry = parse_line(line[:-1])
            if entry is not None:
                yield entry
        if not follow:
            return
        while True:
            done = finished()  # read before draining, so nothing written before the exit is missed
            chunk = f.read()
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    entry = parse_line(line)
                    if entry is not None:
                        yield entry
                continue
            if done:
                return
            await _pause(changed)


async def _pause(changed: Callable[[], Awaitable[None]]) -> None:
    """Until the worker reports a change, or a short poll interval for new output."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(changed(), POLL_S)
