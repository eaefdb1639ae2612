"""The supervisor's log rotation keeps each file within --log-opt max-size also when the current file is already
over it (written by an earlier supervisor, which appended a whole chunk before rotating): that file is rotated
as it is, and nothing more is appended to it. No container or kernel feature is needed: the supervisor's log
writer alone, on a state dir of the test's own."""

from __future__ import annotations

import os
from pathlib import Path

from agent.runtime.state import StateDir
from agent.supervisor import Container, Supervisor


def test_an_oversized_log_file_gets_nothing_more(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, "berth-test-unused")
    paths = StateDir(tmp_path).container("c1")
    paths.log.parent.mkdir(parents=True)
    paths.log.write_bytes(b"old line\n" * 150)  # 1,350 bytes under a cap of 1,000
    c = Container(id="c1", cgroup=None, log_max_size=1000, log_max_files=3)
    try:
        sup._write_log(c, "stdout", b"new line\n" * 18)  # ~900 bytes of CRI lines: fits in a fresh file
    finally:
        if c.log_fd >= 0:
            os.close(c.log_fd)
    assert paths.rotated_log(1).read_bytes() == b"old line\n" * 150, "appended to a file already over the cap"
    assert 0 < paths.log.stat().st_size <= 1000
