"""LinuxExecutor and berth-supervisor on the real kernel: namespaces, overlay rootfs, cgroups, logs, exits.
Run as root; each test gets its own state dir, cgroup parent and supervisor (see conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.executor import ContainerInfo, ContainerNotFound, ExecutorError, ProcessState, StartError
from agent.runtime.linux import LinuxExecutor
from agent.supervisor import cri_lines, rfc3339nano
from tests.agent.conftest import Host, async_wait_for, mounts_mentioning, run, start_supervisor, wait_for

CRI_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) (F|P) (.*)$")


async def run_to_exit(ex: LinuxExecutor, host: Host, cid: str, *args: str, **kw: object) -> ContainerInfo:
    await ex.create(host.config(cid, *args, **kw))
    await ex.start(cid)
    return await wait_exit(ex, cid)


async def wait_exit(ex: LinuxExecutor, cid: str) -> ContainerInfo:
    async def exited() -> ContainerInfo | None:
        info = await ex.info(cid)
        return info if info.state is ProcessState.EXITED else None

    return await async_wait_for(exited, what=f"{cid} to exit")


def stdout_lines(host: Host, cid: str) -> list[str]:
    out = []
    for line in host.log_text(cid).splitlines():
        m = CRI_LINE.match(line)
        assert m, f"not a CRI log line: {line!r}"
        if m.group(1) == "stdout":
            out.append(m.group(3))
    return out


@contextlib.asynccontextmanager
async def subscribed(ex: LinuxExecutor) -> AsyncIterator[asyncio.Queue[ContainerInfo]]:
    """Exits from ex.exits() in a queue; entered once the supervisor has the subscription."""
    q: asyncio.Queue[ContainerInfo] = asyncio.Queue()
    before = (await ex._request("ping"))["subscribers"]

    async def pump() -> None:
        async for info in ex.exits():
            q.put_nowait(info)

    task = asyncio.create_task(pump())

    async def have_sub() -> bool:
        return bool((await ex._request("ping"))["subscribers"] > before)

    try:
        await async_wait_for(have_sub, what="exit subscription")
        yield q
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ----- pure helpers -----


def test_cri_lines_full_and_partial() -> None:
    ns = 1_700_000_000_123_456_789
    assert rfc3339nano(ns) == "2023-11-14T22:13:20.123456789Z"
    out = cri_lines(ns, "stdout", b"a\nb\npart").decode().splitlines()
    assert out == [
        "2023-11-14T22:13:20.123456789Z stdout F a",
        "2023-11-14T22:13:20.123456789Z stdout F b",
        "2023-11-14T22:13:20.123456789Z stdout P part",
    ]


# ----- containers -----


def test_echo_exit_code_and_log(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            async with subscribed(ex) as exits:
                await ex.create(supervised.config("c1", "sh", "-c", "echo hello; printf part; echo oops >&2; exit 3"))
                info = await ex.start("c1")
                assert info.state is ProcessState.RUNNING and info.pid > 0
                ev = await asyncio.wait_for(exits.get(), 10)
            assert (ev.id, ev.state, ev.exit_code, ev.oom_killed) == ("c1", ProcessState.EXITED, 3, False)
            assert ev.finished_at_ns >= ev.started_at_ns > 0
            text = ex.log_path("c1").read_text()
            lines = text.splitlines()
            assert all(CRI_LINE.match(line) for line in lines), text
            assert any(line.endswith(" stdout F hello") for line in lines), text
            assert any(line.endswith(" stdout P part") for line in lines), text
            assert any(line.endswith(" stderr F oops") for line in lines), text
            listed = {i.id: i for i in await ex.list()}
            assert listed["c1"] == ev  # the same facts from exit.json
        finally:
            await ex.remove("c1")
            await ex.close()

    run(body())


def test_pid_namespace(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            info = await run_to_exit(ex, supervised, "pidns", "sh", "-c", "echo $$; ps -o pid,comm; exit 0")
            assert info.exit_code == 0
            lines = stdout_lines(supervised, "pidns")
            assert lines[0] == "1"
            pids = sorted(int(line.split()[0]) for line in lines[2:])
            assert pids[0] == 1 and len(pids) == 2, lines  # sh (1) and ps itself, nothing of the host
        finally:
            await ex.remove("pidns")
            await ex.close()

    run(body())


def test_hostname_net_and_mounts(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            script = (
                "hostname; echo --; tail -n +3 /proc/net/dev; echo --; cat /sys/class/net/lo/flags; echo --;"
                " ls /dev; echo --; cat /proc/mounts"
            )
            info = await run_to_exit(ex, supervised, "ns", "sh", "-c", script, hostname="web-1")
            assert info.exit_code == 0, supervised.log_text("ns")
            sections: list[list[str]] = [[]]
            for line in stdout_lines(supervised, "ns"):
                if line == "--":
                    sections.append([])
                else:
                    sections[-1].append(line)
            hostname, net_dev, lo_flags, dev, mounts = sections
            assert hostname == ["web-1"]
            assert [line.split(":")[0].strip() for line in net_dev] == ["lo"]  # a network namespace of its own
            assert lo_flags == ["0x9"]  # lo is up (IFF_UP | IFF_LOOPBACK)
            for name in ("null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "mqueue", "ptmx"):
                assert name in dev, name
            by_target = {m.split()[1]: m.split() for m in mounts}
            assert by_target["/"][2] == "overlay"
            assert by_target["/proc"][2] == "proc"
            assert by_target["/dev/pts"][2] == "devpts"
            assert by_target["/sys"][3].startswith("ro")
        finally:
            await ex.remove("ns")
            await ex.close()

    run(body())


def test_capabilities_and_kernel_paths(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            masked = next(p for p in ("/proc/timer_list", "/proc/keys", "/proc/kcore") if os.path.exists(p))
            script = (
                "grep CapBnd /proc/self/status;"
                " (echo 1 > /proc/sys/kernel/ns_last_pid) 2>/dev/null && echo wrote-proc-sys;"
                f" wc -c < {masked};"
                " ls /sys/firmware;"
                " touch /sys/x 2>/dev/null && echo wrote-sys;"
                " echo end"
            )
            info = await run_to_exit(ex, supervised, "caps", "sh", "-c", script)
            assert info.exit_code == 0
            lines = stdout_lines(supervised, "caps")
            assert lines[0].split() == ["CapBnd:", "00000000a80425fb"]  # Docker's default set
            assert lines[1:] == ["0", "end"], supervised.log_text("caps")
        finally:
            await ex.remove("caps")
            await ex.close()

    run(body())


def test_oom_kill_is_reported(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            # dd holds one 64 MiB block in memory: over a 16 MiB limit the OOM killer takes it.
            info = await run_to_exit(
                ex, supervised, "oom", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1", memory_bytes=16 << 20
            )
            assert info.exit_code == 128 + signal.SIGKILL
            assert info.oom_killed
            assert (await ex.info("oom")).oom_killed
        finally:
            await ex.remove("oom")
            await ex.close()

    run(body())


def test_concurrent_starts(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        ids = [f"par{i}" for i in range(8)]
        try:
            async with subscribed(ex) as exits:
                for i, cid in enumerate(ids):
                    await ex.create(supervised.config(cid, "sh", "-c", f"echo {cid}; exit {i}"))
                infos = await asyncio.gather(*(ex.start(cid) for cid in ids))
                assert len({i.pid for i in infos}) == len(ids)
                got: dict[str, int] = {}
                while len(got) < len(ids):
                    ev = await asyncio.wait_for(exits.get(), 10)
                    got[ev.id] = ev.exit_code
            assert got == {cid: i for i, cid in enumerate(ids)}
            for cid in ids:
                assert stdout_lines(supervised, cid) == [cid]
        finally:
            for cid in ids:
                await ex.remove(cid)
            await ex.close()

    run(body())


def test_only_lo_in_net_namespace(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            info = await run_to_exit(ex, supervised, "net", "sh", "-c", "ls /sys/class/net")
            assert info.exit_code == 0
            assert stdout_lines(supervised, "net") == ["lo"]
        finally:
            await ex.remove("net")
            await ex.close()

    run(body())


def test_limits_on_host_cgroup_and_inside(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        mem = 64 << 20
        try:
            await ex.create(
                supervised.config(
                    "lim",
                    "sh",
                    "-c",
                    "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null;"
                    " trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done",
                    memory_bytes=mem,
                    nano_cpus=500_000_000,
                    pids_limit=100,
                )
            )
            info = await ex.start("lim")
            wait_for(lambda: "ready" in stdout_lines(supervised, "lim"), what="container ready")
            cg = supervised.hier.cgroup(supervised.cgroup_parent, "lim")
            if supervised.hier.version == 1:
                assert int((cg.dirs["memory"] / "memory.limit_in_bytes").read_text()) == mem
                assert int((cg.dirs["cpu"] / "cpu.cfs_quota_us").read_text()) == 50_000
                assert (cg.dirs["pids"] / "pids.max").read_text().strip() == "100"
            else:
                assert (cg.dirs[""] / "memory.max").read_text().strip() == str(mem)
                assert (cg.dirs[""] / "cpu.max").read_text().split() == ["50000", "100000"]
            assert info.pid in cg.procs()
            assert stdout_lines(supervised, "lim")[0] == str(mem)
            stopped = await ex.stop("lim", timeout_s=10)
            assert stopped.state is ProcessState.EXITED and stopped.exit_code == 0
            assert not cg.exists(), "cgroup of an exited container is removed"
        finally:
            await ex.remove("lim")
            await ex.close()

    run(body())


def test_writable_layer_survives_stop_start_and_remove_deletes_it(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        script = (
            "cat /data.txt 2>/dev/null; echo run >> /data.txt;"
            " trap 'exit 0' TERM; echo up; while :; do sleep 0.05; done"
        )
        try:
            await ex.create(supervised.config("vol", "sh", "-c", script))
            await ex.start("vol")
            wait_for(lambda: stdout_lines(supervised, "vol").count("up") == 1, what="first run")
            await ex.stop("vol", timeout_s=10)
            await ex.create(supervised.config("vol", "sh", "-c", script))  # idempotent, keeps the layer
            await ex.start("vol")
            wait_for(lambda: stdout_lines(supervised, "vol").count("up") == 2, what="second run")
            assert stdout_lines(supervised, "vol") == ["up", "run", "up"]
            await ex.stop("vol", timeout_s=10)
            upper = supervised.state_dir / "containers" / "vol" / "upper"
            assert (upper / "data.txt").read_text() == "run\nrun\n"
            await ex.remove("vol")
            assert not upper.exists()
            assert not (supervised.state_dir / "containers" / "vol").exists()
            await ex.remove("vol")  # idempotent
            assert "vol" not in {i.id for i in await ex.list()}
        finally:
            await ex.remove("vol")
            await ex.close()

    run(body())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("nosuchcmd", "arg"), "executable file not found in $PATH: nosuchcmd"),
        (("/no/such/file",), "no such file or directory: /no/such/file"),
    ],
)
def test_missing_executable_is_a_start_error_leaving_nothing(
    supervised: Host, argv: tuple[str, ...], message: str
) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            await ex.create(supervised.config("bad", *argv))
            with pytest.raises(StartError) as e:
                await ex.start("bad")
            assert str(e.value) == message
            assert not supervised.cgroup_leaves()
            assert not supervised.container_pids()
            assert not mounts_mentioning(supervised.state_dir, supervised.rootfs)
            assert (await ex.info("bad")).state is ProcessState.CREATED
            cdir = supervised.state_dir / "containers" / "bad"
            assert sorted(p.name for p in (cdir / "upper").iterdir()) == []
            await ex.remove("bad")
            assert not cdir.exists()
        finally:
            await ex.remove("bad")
            await ex.close()

    run(body())


def test_symlinked_mount_point_in_image_is_refused(supervised: Host, tmp_path: Path) -> None:
    evil = tmp_path / "evil-layer"
    evil.mkdir()
    (evil / "proc").symlink_to("/etc")

    async def body() -> None:
        ex = supervised.executor()
        try:
            cfg = supervised.config("evil", "true")
            await ex.create(dataclasses.replace(cfg, layers=(supervised.rootfs, evil)))
            with pytest.raises(StartError) as e:
                await ex.start("evil")
            rootfs = supervised.state_dir / "containers" / "evil" / "rootfs"
            assert str(e.value) == f"mount /proc: mount point in the image is not a directory: {rootfs}/proc"
            assert not supervised.cgroup_leaves()
        finally:
            await ex.remove("evil")
            await ex.close()

    run(body())


def test_missing_layer_is_a_start_error(supervised: Host, tmp_path: Path) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            cfg = supervised.config("nolayer", "true")
            await ex.create(dataclasses.replace(cfg, layers=(tmp_path / "gone",)))
            with pytest.raises(StartError, match=r"^mount rootfs: mount overlay on .*/nolayer/rootfs: "):
                await ex.start("nolayer")
            assert not supervised.cgroup_leaves()
        finally:
            await ex.remove("nolayer")
            await ex.close()

    run(body())


def test_failure_before_the_namespaces_exist_is_a_start_error(supervised: Host) -> None:
    """pids.max 1 lets the intermediate process join the cgroup but not fork the container's PID 1."""

    async def body() -> None:
        ex = supervised.executor()
        try:
            await ex.create(supervised.config("tiny", "true", pids_limit=1))
            with pytest.raises(StartError) as e:
                await ex.start("tiny")
            assert str(e.value) == "fork the container's first process: Resource temporarily unavailable"
            assert not supervised.cgroup_leaves()
            assert not supervised.container_pids()
        finally:
            await ex.remove("tiny")
            await ex.close()

    run(body())


def test_invalid_container_id(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            for bad in ("", "..", "a/b"):
                with pytest.raises(ExecutorError, match="invalid container id"):
                    await ex.create(supervised.config(bad, "true"))
        finally:
            await ex.close()

    run(body())


def test_unknown_container(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            with pytest.raises(ContainerNotFound):
                await ex.start("ghost")
            await ex.remove("ghost")  # no-op
        finally:
            await ex.close()

    run(body())


def test_stop_kills_after_timeout_when_sigterm_is_ignored(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            await ex.create(
                supervised.config("stub", "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done")
            )
            await ex.start("stub")
            wait_for(lambda: "ready" in stdout_lines(supervised, "stub"), what="trap installed")
            info = await ex.stop("stub", timeout_s=0.3)
            assert info.state is ProcessState.EXITED
            assert info.exit_code == 128 + signal.SIGKILL
            assert not supervised.container_pids()
        finally:
            await ex.remove("stub")
            await ex.close()

    run(body())


def test_remove_kills_a_running_container(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            await ex.create(supervised.config("rm", "sleep", "1000"))
            info = await ex.start("rm")
            assert info.pid in supervised.container_pids()
            await ex.remove("rm")
            assert not supervised.container_pids()
            assert not supervised.cgroup_leaves()
            assert not (supervised.state_dir / "containers" / "rm").exists()
        finally:
            await ex.close()

    run(body())


def test_containers_outlive_the_executor(supervised: Host) -> None:
    script = "trap 'exit 7' USR1; echo ready; while :; do sleep 0.05; done"

    async def first() -> int:
        ex = supervised.executor()
        try:
            await ex.create(supervised.config("live", "sh", "-c", script))
            return (await ex.start("live")).pid
        finally:
            await ex.close()

    pid = run(first())
    wait_for(lambda: "ready" in stdout_lines(supervised, "live"), what="container ready")
    assert pid in supervised.container_pids()

    async def second() -> None:
        ex = supervised.executor()
        try:
            listed = {i.id: i for i in await ex.list()}
            assert listed["live"].state is ProcessState.RUNNING and listed["live"].pid == pid
            async with subscribed(ex) as exits:
                os.kill(pid, signal.SIGUSR1)
                ev = await asyncio.wait_for(exits.get(), 10)
            assert (ev.id, ev.exit_code) == ("live", 7)
        finally:
            await ex.remove("live")
            await ex.close()

    run(second())


AGENT_SCRIPT = """
import asyncio, sys
from pathlib import Path
from agent.executor import ContainerConfig
from agent.runtime.linux import LinuxExecutor

async def main():
    ex = LinuxExecutor(Path(sys.argv[1]), sys.argv[2])
    script = "trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done"
    await ex.create(ContainerConfig(id="k", name="k", hostname="k", layers=(Path(sys.argv[3]),),
                                    args=("sh", "-c", script)))
    print((await ex.start("k")).pid, flush=True)
    await asyncio.Event().wait()  # an agent idling until it is killed

asyncio.run(main())
"""


def test_container_survives_kill_9_of_the_agent(host: Host) -> None:
    """The agent process starts the supervisor detached; SIGKILL of the agent stops neither."""
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, str(host.state_dir), host.cgroup_parent, str(host.rootfs)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        pid = int(agent.stdout.readline())
    finally:
        agent.kill()
        agent.wait()
    assert pid in host.container_pids()
    wait_for(lambda: "ready" in host.log_text("k"), what="trap installed")
    sup_pid = int((host.state_dir / "supervisor.pid").read_text())
    assert os.getsid(sup_pid) != os.getsid(0)  # a session of its own, not the agent's

    async def body() -> None:
        ex = host.executor()
        try:
            assert (await ex._request("ping"))["pid"] == sup_pid
            listed = {i.id: i for i in await ex.list()}
            assert listed["k"].state is ProcessState.RUNNING and listed["k"].pid == pid
            assert (await ex.stop("k", timeout_s=10)).exit_code == 0
        finally:
            await ex.remove("k")
            await ex.close()

    run(body())


def test_executor_starts_a_detached_supervisor_and_reuses_it(host: Host) -> None:
    async def body() -> None:
        ex1 = host.executor()
        ex2 = host.executor()
        try:
            await ex1.create(
                host.config("d1", "sh", "-c", "trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done")
            )
            await ex1.start("d1")
            wait_for(lambda: "ready" in host.log_text("d1"), what="trap installed")
            pid1 = (await ex1._request("ping"))["pid"]
            pid2 = (await ex2._request("ping"))["pid"]
            assert pid1 == pid2 == int((host.state_dir / "supervisor.pid").read_text())
            assert (await ex2.info("d1")).state is ProcessState.RUNNING
            info = await ex2.stop("d1", timeout_s=10)
            assert info.exit_code == 0
        finally:
            await ex1.remove("d1")
            await ex1.close()
            await ex2.close()

    run(body())


def test_supervisor_restart_adopts_running_container(supervised: Host) -> None:
    """A killed supervisor leaves containers running; its successor adopts them and keeps their logs: the
    container writes all along (into its FIFO, no SIGPIPE) and no line is lost."""
    script = "trap 'echo bye; exit 0' TERM; i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.01; done"

    def ticks() -> list[int]:
        return [int(line.split()[1]) for line in stdout_lines(supervised, "adopt") if line.startswith("tick ")]

    async def start() -> int:
        ex = supervised.executor()
        try:
            await ex.create(supervised.config("adopt", "sh", "-c", script))
            return (await ex.start("adopt")).pid
        finally:
            await ex.close()

    pid = run(start())
    wait_for(lambda: len(ticks()) >= 3, what="first ticks")
    assert supervised.supervisor is not None
    supervised.supervisor.kill()
    supervised.supervisor.wait()
    before = ticks()[-1]
    start_supervisor(supervised)

    async def check() -> None:
        ex = supervised.executor()
        try:
            info = await ex.info("adopt")
            assert info.state is ProcessState.RUNNING and info.pid == pid
            wait_for(lambda: ticks()[-1] > before + 3, what="ticks after the restart")
            stopped = await ex.stop("adopt", timeout_s=10)
            assert stopped.state is ProcessState.EXITED
            assert not supervised.container_pids()
            got = ticks()
            assert got == list(range(1, len(got) + 1)), "log lines lost across the restart"
            assert stdout_lines(supervised, "adopt")[-1] == "bye"
        finally:
            await ex.remove("adopt")
            await ex.close()

    run(check())


def test_exit_subscription_survives_supervisor_death(supervised: Host) -> None:
    """exits() reconnects; the executor starts a new (detached) supervisor, which adopts the container and
    reports its exit (code unknown to a supervisor that is not the parent: 255)."""

    async def body() -> None:
        ex = supervised.executor()
        assert supervised.supervisor is not None
        old_pid = supervised.supervisor.pid
        try:
            await ex.create(
                supervised.config("re", "sh", "-c", "trap 'exit 5' USR1; echo ready; while :; do sleep 0.05; done")
            )
            pid = (await ex.start("re")).pid
            wait_for(lambda: "ready" in supervised.log_text("re"), what="trap installed")
            async with subscribed(ex) as exits:
                supervised.supervisor.kill()
                supervised.supervisor.wait()

                async def resubscribed() -> bool:
                    try:
                        r = await ex._request("ping")
                    except ExecutorError:
                        return False
                    return bool(r["pid"] != old_pid and r["subscribers"] >= 1)

                await async_wait_for(resubscribed, what="a new supervisor with the subscription")
                os.kill(pid, signal.SIGUSR1)
                ev = await asyncio.wait_for(exits.get(), 10)
            assert (ev.id, ev.state, ev.exit_code) == ("re", ProcessState.EXITED, 255)
            assert not supervised.container_pids()
        finally:
            await ex.remove("re")
            await ex.close()

    run(body())


def test_host_mounts_untouched_by_runs(supervised: Host) -> None:
    """The overlay, /proc, /dev, /sys mounts exist only in the containers' mount namespaces."""

    async def body() -> None:
        ex = supervised.executor()
        try:
            await ex.create(
                supervised.config("m0", "sh", "-c", "trap 'exit 0' TERM; echo up; while :; do sleep 0.05; done")
            )
            await ex.start("m0")
            wait_for(lambda: "up" in stdout_lines(supervised, "m0"), what="container up")
            assert not mounts_mentioning(supervised.state_dir, supervised.rootfs), "overlay visible on the host"
            await ex.stop("m0", timeout_s=10)
            for i in range(1, 3):
                info = await run_to_exit(ex, supervised, f"m{i}", "true")
                assert info.exit_code == 0
        finally:
            for i in range(3):
                await ex.remove(f"m{i}")
            await ex.close()

    run(body())
    assert not mounts_mentioning(supervised.state_dir, supervised.rootfs)
