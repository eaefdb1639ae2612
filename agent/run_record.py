"""The worker's crash-safety record (issue 6): for each container, the generation of the last run this agent
started, so that a restarted agent starts nothing twice, and the restart count of its current run, so that a
later agent goes on counting where this one stopped.

The record is one append-only file, `<state dir>/worker.runs`, of lines `<kind> <value> <container id>`:

    s 3 <cid>     the run of generation 3 was started (kind s: started)
    r 2 <cid>     its restart count is 2 (kind r: restarts)
    s - <cid>     forget it (the container was removed); `r - <cid>` likewise

A change is one write(2) of one line on a descriptor opened with O_APPEND, done before the change is relied
on: once `set_*` returns, the line is in the kernel's page cache and survives the agent being killed (as the
per-container files that the record replaces did; like them, it is not fsynced per change, so a host crash
may lose the last changes, and with them every container process). Reading keeps the last line of each
(kind, container), and ignores a torn last line. The file is compacted (the live entries written to a
temporary file, fsynced and renamed over it) when it holds four times more lines than live entries (at least
1,024), and when it is opened with a torn last line or an earlier agent's files to take over.

Per-container files of earlier agents (`worker/<cid>`: generation, `worker-restarts/<cid>`: count) are
folded into the record when it is first made, then removed (left-overs of a removal that failed are
removed at later opens, never read again).

One Worker, so one RunRecord, per state dir at a time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

FILE = "worker.runs"
LEGACY = {"s": "worker", "r": "worker-restarts"}  # per-container files of earlier agents
COMPACT_MIN_LINES = 1024


class RunRecord:
    """Generations started and restart counts per container, kept in `<state_dir>/worker.runs`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE
        self.started: dict[str, int] = {}  # container id -> generation of the last run started
        self.restarts: dict[str, int] = {}  # container id -> restart count of its current run
        self._lines = 0
        self._fd = -1
        state_dir.mkdir(parents=True, exist_ok=True)
        # An earlier agent's files are taken over once, when there is no record yet (the record is on disk
        # before they are removed): files left behind by a removal that failed are older than every line of
        # the record, and an entry forgotten since must not come back.
        take_over = not self.path.exists()
        legacy = self._read_legacy(state_dir, take_over)
        lines = self._read()
        if (take_over and legacy) or lines is None or lines >= self._limit():
            self._compact()
        else:  # nothing to tidy: appends go on (no rewrite and fsync at each start of an agent)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._lines = lines
        for directory in legacy:  # folded into the record, which is on disk now
            shutil.rmtree(directory, ignore_errors=True)

    # ---- changes ----------------------------------------------------------------------------------

    def set_started(self, cid: str, generation: int) -> None:
        self.started[cid] = generation
        self._append("s", str(generation), cid)

    def set_restarts(self, cid: str, count: int) -> None:
        self.restarts[cid] = count
        self._append("r", str(count), cid)

    def forget_restarts(self, cid: str) -> None:
        if self.restarts.pop(cid, None) is not None:
            self._append("r", "-", cid)

    def forget(self, cid: str) -> None:
        """The container is gone from this host: nothing of it is kept."""
        if self.started.pop(cid, None) is not None:
            self._append("s", "-", cid)
        self.forget_restarts(cid)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ---- the file ---------------------------------------------------------------------------------

    def _append(self, kind: str, value: str, cid: str) -> None:
        if "\n" in cid or not cid:
            raise ValueError(f"container id {cid!r} cannot be recorded")
        os.write(self._fd, f"{kind} {value} {cid}\n".encode())
        self._lines += 1
        if self._lines >= self._limit():
            self._compact()

    def _limit(self) -> int:
        """Lines that call for a compaction."""
        return max(COMPACT_MIN_LINES, 4 * (len(self.started) + len(self.restarts)))

    def _apply(self, kind: str, value: str, cid: str) -> None:
        table = self.started if kind == "s" else self.restarts
        if value == "-":
            table.pop(cid, None)
        else:
            table[cid] = int(value)

    def _read(self) -> int | None:
        """Apply the file's lines; returns how many there are, or None when the last one is torn."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        lines = data.decode(errors="replace").split("\n")
        for line in lines[:-1]:  # the last piece: "" or a torn line
            kind, _, rest = line.partition(" ")
            value, _, cid = rest.partition(" ")
            if kind in LEGACY and cid:
                with contextlib.suppress(ValueError):
                    self._apply(kind, value, cid)
        return len(lines) - 1 if lines[-1] == "" else None

    def _read_legacy(self, state_dir: Path, take_over: bool) -> list[Path]:
        """The legacy directories present, their entries applied when `take_over`."""
        found = []
        for kind, name in LEGACY.items():
            directory = state_dir / name
            if not directory.is_dir():
                continue
            found.append(directory)
            for path in directory.iterdir() if take_over else ():
                with contextlib.suppress(ValueError, OSError):
                    self._apply(kind, path.read_text().strip(), path.name)
        return found

    def _compact(self) -> None:
        """Rewrite the file with only the live entries (atomically: a crash leaves the old file or the new)."""
        lines = [f"s {g} {c}\n" for c, g in self.started.items()] + [f"r {n} {c}\n" for c, n in self.restarts.items()]
        tmp = self.path.with_name(f".{FILE}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            data = memoryview("".join(lines).encode())
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._lines = len(lines)
