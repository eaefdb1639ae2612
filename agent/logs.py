"""Reading a container's log: CRI-format lines (`<RFC3339Nano> <stdout|stderr> <F|P> <text>`), as the
supervisor writes them, turned into LogEntry messages; across the rotated parts (container.log.N ..
container.log.1, container.log); with follow, new lines as they are written, across rotations."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

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


def log_parts(path: Path) -> list[Path]:
    """The log's files oldest first: the rotated parts `<path>.N` .. `<path>.1` (as agent.supervisor
    rotates them), then the current file."""
    rotated: list[tuple[int, Path]] = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name[len(path.name) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    return [p for _, p in sorted(rotated, reverse=True)] + [path]


def _complete_lines(paths: list[Path]) -> tuple[list[bytes], bytes, BinaryIO | None]:
    """Every complete line of the files in order; the trailing partial line of the last file and that file,
    open and positioned after what was read (None if it does not exist)."""
    lines: list[bytes] = []
    pending = b""
    current: BinaryIO | None = None
    for i, p in enumerate(paths):
        try:
            f = p.open("rb")
        except FileNotFoundError:
            continue  # rotated away meanwhile
        data = f.read()
        if i == len(paths) - 1:
            current = f
        else:
            f.close()
        *complete, pending = data.split(b"\n")
        lines.extend(complete)
    return lines, pending, current


async def read_log(
    path: Path,
    *,
    follow: bool,
    tail: int,
    finished: Callable[[], bool],
    changed: Callable[[], Awaitable[None]],
    appear_timeout_s: float = 60.0,
    since_ns: int = 0,
) -> AsyncIterator[t.LogEntry]:
    """Entries of a log and its rotated parts, oldest first; with since_ns only those written at or after it,
    with tail only the last `tail` of those. With follow, waits for the file to appear (a container attached
    to before it starts) and for new lines, across rotations, until `finished()` says the container is done
    and the file is drained."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + appear_timeout_s
    while not path.exists():
        if not follow or finished() or loop.time() > deadline:
            return
        await _pause(changed)
    lines, pending, f = _complete_lines(log_parts(path))
    entries = (e for e in map(parse_line, lines) if e is not None and e.timestamp_ns >= since_ns)
    chosen: collections.abc.Iterable[t.LogEntry] = collections.deque(entries, maxlen=tail) if tail > 0 else entries
    for entry in chosen:
        yield entry
    if not follow:
        if f is not None:
            f.close()
        return
    try:
        while True:
            done = finished()  # read before draining, so nothing written before the exit is missed
            chunk = f.read() if f is not None else b""
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    new = parse_line(line)
                    if new is not None and new.timestamp_ns >= since_ns:
                        yield new
                continue
            if _rotated(path, f):
                # The supervisor moved the file aside (it writes whole lines only): go on with the new one.
                if f is not None:
                    f.close()
                f, pending = None, b""
                with contextlib.suppress(FileNotFoundError):
                    f = path.open("rb")
                continue
            if done:
                return
            await _pause(changed)
    finally:
        if f is not None:
            f.close()


def _rotated(path: Path, f: BinaryIO | None) -> bool:
    """Whether `path` now names another file than the one open in f."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return f is None or st.st_ino != os.fstat(f.fileno()).st_ino


async def _pause(changed: Callable[[], Awaitable[None]]) -> None:
    """Until the worker reports a change, or a short poll interval for new output."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(changed(), POLL_S)
