"""Lifecycle on the real kernel through LinuxExecutor and the supervisor: kill -s, exit reasons, pause and
unpause (freezer, v1 and a v2-shaped tree), the pids limit against a fork loop, zombies reaped inside, log
rotation and reading across rotated files."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from agent.executor import ProcessState
from agent.logs import log_parts, read_log
from agent.runtime import freezer
from agent.runtime.cgroups import Hierarchy
from berth.api import types_pb2 as t
from tests.agent.conftest import Host, async_wait_for, run, wait_for
from tests.agent.test_runtime import stdout_lines, wait_exit

LOOP = "trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done"


def test_kill_with_a_signal_and_the_exit_reason(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            await ex.create(supervised.config("k1", "sh", "-c", "trap 'exit 42' USR1; " + LOOP))
            await ex.start("k1")
            wait_for(lambda: "ready" in stdout_lines(supervised, "k1"), what="trap installed")
            await ex.signal("k1", signal.SIGUSR1)
            info = await wait_exit(ex, "k1")
            assert (info.exit_code, info.signal, info.oom_killed) == (42, 0, False)  # exited by itself

            await ex.create(supervised.config("k2", "sleep", "1000"))
            await ex.start("k2")
            await ex.signal("k2", signal.SIGKILL)
            info = await wait_exit(ex, "k2")
            assert (info.exit_code, info.signal) == (128 + signal.SIGKILL, signal.SIGKILL)
            assert (await ex.info("k2")).signal == signal.SIGKILL  # kept in exit.json
        finally:
            await ex.remove("k1")
            await ex.remove("k2")
            await ex.close()

    run(body())


def test_pause_freezes_every_process_and_unpause_thaws(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        cg = supervised.hier.cgroup(supervised.cgroup_parent, "p")
        try:
            await ex.create(supervised.config("p", "sh", "-c", "sleep 1000 & " + LOOP))
            await ex.start("p")
            wait_for(lambda: "ready" in stdout_lines(supervised, "p"), what="container ready")
            info = await ex.pause("p")
            assert info.paused and info.state is ProcessState.RUNNING
            assert freezer.is_frozen(cg)
            assert len(cg.procs()) >= 2  # the kernel says FROZEN only once each of these is frozen
            info = await ex.pause("p", False)
            assert not info.paused and not freezer.is_frozen(cg)
            stopped = await ex.stop("p", timeout_s=10)  # a thawed container reacts to SIGTERM again
            assert stopped.exit_code == 0

            # Removing a paused container kills it (SIGKILL needs a thaw to act).
            await ex.create(supervised.config("p2", "sleep", "1000"))
            await ex.start("p2")
            await ex.pause("p2")
            await ex.remove("p2")
            assert not supervised.container_pids() and not supervised.cgroup_leaves()
        finally:
            await ex.remove("p")
            await ex.remove("p2")
            await ex.close()

    run(body())


def test_freezer_on_a_v2_shaped_tree(tmp_path: Path) -> None:
    hier = Hierarchy(root=tmp_path, version=2)
    cg = hier.cgroup("berth", "c")
    d = cg.dirs[""]
    d.mkdir(parents=True)
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert not freezer.is_frozen(cg)
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")  # what the kernel shows once frozen
    freezer.set_frozen(cg, True)
    assert (d / "cgroup.freeze").read_text() == "1" and freezer.is_frozen(cg)
    freezer.set_frozen(cg, False)
    assert (d / "cgroup.freeze").read_text() == "0"


def test_pids_limit_stops_a_fork_loop(supervised: Host) -> None:
    limit = 16
    # An inner shell forks until refused; PID 1 stays, without forking, so the cgroup can be looked at.
    script = (
        "mkfifo /f; exec 3<>/f; sh -c 'i=0; while [ $i -lt 100 ]; do sleep 1000 & i=$((i+1)); done; echo spawned all';"
        " echo inner $?; trap 'exit 0' TERM; while :; do read -t 1 x <&3; done"
    )

    async def body() -> None:
        ex = supervised.executor()
        cg = supervised.hier.cgroup(supervised.cgroup_parent, "fork")
        try:
            await ex.create(supervised.config("fork", "sh", "-c", script, pids_limit=limit))
            await ex.start("fork")
            # the shell gives up at the first refused fork
            wait_for(lambda: "inner" in supervised.log_text("fork"), what="the fork loop to give up")
            assert "can't fork" in supervised.log_text("fork")
            assert "spawned all" not in supervised.log_text("fork")
            n = len(cg.procs())
            assert limit - 2 <= n <= limit, f"{n} processes under a limit of {limit}"
            pids_dir = cg.dirs["pids"] if supervised.hier.version == 1 else cg.dirs[""]
            assert int((pids_dir / "pids.current").read_text()) <= limit
            events = (pids_dir / "pids.events").read_text().split()
            assert int(events[events.index("max") + 1]) > 0, "the kernel counted refused forks"
        finally:
            await ex.remove("fork")
            await ex.close()
        assert not supervised.container_pids()

    run(body())


def test_pid_1_reaps_orphaned_zombies(supervised: Host) -> None:
    """The container's shell is PID 1; orphans reparent to it, and it reaps them (no init needed)."""
    script = (
        "i=0; while [ $i -lt 20 ]; do (sleep 0.01 &); i=$((i+1)); done; echo spawned;"
        " trap 'exit 0' TERM; while :; do sleep 0.05; done"
    )

    async def body() -> None:
        ex = supervised.executor()
        cg = supervised.hier.cgroup(supervised.cgroup_parent, "z")
        try:
            await ex.create(supervised.config("z", "sh", "-c", script))
            await ex.start("z")
            wait_for(lambda: "spawned" in stdout_lines(supervised, "z"), what="orphans spawned")

            def states() -> list[str]:
                out = []
                for pid in cg.procs():
                    try:
                        stat = Path(f"/proc/{pid}/stat").read_text()
                    except (FileNotFoundError, ProcessLookupError):  # the process ended while read
                        continue
                    out.append(stat.rsplit(")", 1)[1].split()[0])
                return out

            # the 20 orphans exit after 10 ms; once none is left sleeping, none may stay a zombie
            wait_for(lambda: len([s for s in states() if s != "Z"]) <= 2, what="orphans to finish")
            wait_for(lambda: "Z" not in states(), timeout_s=5, what="zombies to be reaped by PID 1")
        finally:
            await ex.remove("z")
            await ex.close()

    run(body())


def test_log_rotation_and_reading_across_rotated_files(supervised: Host) -> None:
    n = 3000
    pad = "x" * 100  # ~450 KB in all: many rotations
    # Written to a file first, then out by cat in big writes: the supervisor reads chunks of up to 64 KiB, each
    # holding hundreds of lines, which must still be cut so that no file grows past the cap.
    script = (f"i=0; while [ $i -lt {n} ]; do echo line$i {pad}; i=$((i+1)); done > /tmp/out; cat /tmp/out; "
              "echo err >&2")

    async def body() -> None:
        ex = supervised.executor()
        try:
            await ex.create(
                supervised.config("rot", "sh", "-c", script, log_max_size_bytes=16 << 10, log_max_files=3)
            )
            await ex.start("rot")
            await wait_exit(ex, "rot")
            path = ex.log_path("rot")
            parts = log_parts(path)
            assert [p.name for p in parts] == ["container.log.2", "container.log.1", "container.log"]
            sizes = [p.stat().st_size for p in parts]
            assert all(0 < size <= 16 << 10 for size in sizes), sizes

            async def never() -> None:
                await asyncio.Event().wait()

            entries = [e async for e in read_log(path, follow=False, tail=0, finished=lambda: True, changed=never)]
            out = [e.data.decode().split()[0] for e in entries if e.stream == t.LogEntry.STDOUT]
            err = [e.data.decode().strip() for e in entries if e.stream == t.LogEntry.STDERR]
            assert err == ["err"]
            first = int(out[0].removeprefix("line"))
            assert first > 0, "older lines were dropped with the oldest file"
            assert out == [f"line{i}" for i in range(first, n)], "lines in order, none lost across files"
            tail = [e async for e in read_log(path, follow=False, tail=5, finished=lambda: True, changed=never)]
            assert tail == entries[-5:]
            assert {e.data.split()[0] for e in tail} >= {b"line2998", b"line2999"}
            since = entries[-3].timestamp_ns
            recent = [e async for e in read_log(path, follow=False, tail=0, finished=lambda: True, changed=never,
                                                since_ns=since)]
            assert recent == [e for e in entries if e.timestamp_ns >= since] and len(recent) < len(entries)
        finally:
            await ex.remove("rot")
            await ex.close()

    run(body())


def test_follow_goes_on_across_a_rotation(supervised: Host) -> None:
    script = (
        "trap 'exit 0' TERM; i=0; while [ $i -lt 400 ]; do echo follow$i; i=$((i+1)); sleep 0.005; done; echo done;"
        " while :; do sleep 0.05; done"
    )

    async def body() -> None:
        ex = supervised.executor()
        finished = False
        try:
            await ex.create(supervised.config("fol", "sh", "-c", script, log_max_size_bytes=4096, log_max_files=5))
            await ex.start("fol")
            path = ex.log_path("fol")

            async def changed() -> None:
                await asyncio.sleep(0.01)

            got: list[str] = []

            async def reader() -> None:
                async for e in read_log(path, follow=True, tail=0, finished=lambda: finished, changed=changed):
                    got.append(e.data.decode().strip())

            task = asyncio.create_task(reader())
            await async_wait_for(lambda: asyncio.sleep(0, "done" in got), timeout_s=30, what="all lines followed")
            finished = True
            await asyncio.wait_for(task, 10)
            assert len(log_parts(path)) > 2, "the log rotated while it was followed"
            assert got == [f"follow{i}" for i in range(400)] + ["done"], "every line once, in order"
        finally:
            await ex.remove("fol")
            await ex.close()

    run(body())


def test_exit_time_is_recorded(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            before = time.time_ns()
            await ex.create(supervised.config("et", "true"))
            await ex.start("et")
            info = await wait_exit(ex, "et")
            assert before <= info.started_at_ns <= info.finished_at_ns <= time.time_ns()
        finally:
            await ex.remove("et")
            await ex.close()

    run(body())
