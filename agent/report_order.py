"""The order of an agent's statuses (ContainerStatus.seq): a number that grows with every status the agent
produces, across agent restarts, so that the controller can refuse a status older than the one it holds for
the same run (one delivered late, or redone after a failed compare, while the agent has since reported a
newer one, perhaps through another controller).

A seq is `epoch << 32 | counter`: the counter counts this agent process's statuses from 1, the epoch is
taken at each start of the agent (one per process, not per status) as the greater of the last epoch + 1 and
the wall clock's seconds, and kept in `<state dir>/worker.epoch` (written to a temporary file, fsynced and
renamed over it, before any status is numbered), so a restarted agent's statuses follow every status of
the agent before it, even after a host crash, and even when the clock went back (the file) or the state
dir was lost (the clock). One agent, so one ReportOrder, per state dir at a time.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

FILE = "worker.epoch"
COUNTER_BITS = 32


class ReportOrder:
    """Numbers an agent's statuses; call it for the next seq."""

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = state_dir / FILE
        self._clock = clock
        state_dir.mkdir(parents=True, exist_ok=True)
        self.epoch = 0
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.epoch = int(self.path.read_text().strip() or "0")
        self._counter = 0
        self._next_epoch()

    def __call__(self) -> int:
        self._counter += 1
        if self._counter >> COUNTER_BITS:  # 4 billion statuses in one process: go on in a new epoch
            self._next_epoch()
            self._counter = 1
        return self.epoch << COUNTER_BITS | self._counter

    def _next_epoch(self) -> None:
        self.epoch = max(self.epoch + 1, int(self._clock()))
        tmp = self.path.with_name(f".{FILE}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{self.epoch}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
