"""Isolation and hardening defaults on the real kernel (issue 3b): masked /proc, no mount inside,
capabilities and --cap-add/--cap-drop, --privileged, no_new_privs, --user and names from the image's
/etc/passwd, --ulimit, --read-only with --tmpfs, bind mounts and named volumes, more cgroup limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.executor import StartError
from agent.runtime import security as sec
from agent.runtime.linux import LinuxExecutor
from agent.runtime.mounts import Mount, MountError, parse_tmpfs, parse_volume
from agent.runtime.security import Security, SecurityError, Ulimit
from agent.runtime.volumes import VolumeInUse, VolumeNotFound, VolumeStore
from tests.agent.conftest import Host, mounts_mentioning, run
from tests.agent.test_runtime import run_to_exit, stdout_lines


def run_script(host: Host, cid: str, script: str, **kw: object) -> tuple[int, list[str]]:
    """Run `sh -c script` in a fresh container to its exit; (exit code, stdout lines). Removes it."""

    async def body() -> tuple[int, list[str]]:
        ex = LinuxExecutor(host.state_dir, host.cgroup_parent, allow_privileged=True)
        try:
            info = await run_to_exit(ex, host, cid, "sh", "-c", script, **kw)
            return info.exit_code, stdout_lines(host, cid)
        finally:
            await ex.remove(cid)
            await ex.close()

    return run(body())


def cap_mask(caps: frozenset[int]) -> str:
    return f"{sum(1 << c for c in caps):016x}"


# ----- pure -----


def test_capability_sets() -> None:
    assert sec.capabilities(Security()) == sec.DEFAULT_CAPABILITIES
    caps = sec.capabilities(Security(cap_add=("net_admin",), cap_drop=("CAP_NET_RAW", "chown")))
    assert 12 in caps and 13 not in caps and 0 not in caps
    assert sec.capabilities(Security(cap_drop=("ALL",), cap_add=("KILL",))) == frozenset({5})
    assert sec.capabilities(Security(privileged=True), 40) == frozenset(range(41))
    with pytest.raises(SecurityError, match="unknown capability 'NET_FOO' in --cap-add"):
        sec.capabilities(Security(cap_add=("NET_FOO",)))


def test_parse_ulimit() -> None:
    assert sec.parse_ulimit("nofile=1024:2048") == Ulimit("nofile", 1024, 2048)
    assert sec.parse_ulimit("nproc=64") == Ulimit("nproc", 64, 64)
    assert sec.parse_ulimit("core=-1") == Ulimit("core", -1, -1)
    for bad, msg in (("nofil=1", "NAME one of"), ("nofile=2:1", "must not exceed"), ("nofile=x", "whole numbers")):
        with pytest.raises(SecurityError, match=msg):
            sec.parse_ulimit(bad)


def test_lookup_user(tmp_path: Path) -> None:
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    group.write_text("root:x:0:\napp:x:1000:\nwheel:x:10:app,other\nstaff:x:50:\n")
    look = lambda spec: sec.lookup_user(spec, str(passwd), str(group))  # noqa: E731
    assert look("") == sec.Identity(0, 0, (0,), "/root")
    assert look("app") == sec.Identity(1000, 1000, (1000, 10), "/home/app")
    assert look("1000:staff") == sec.Identity(1000, 50, (50, 10), "/home/app")
    assert look("4242:7") == sec.Identity(4242, 7, (7,), "/")  # numeric: no entry needed
    with pytest.raises(SecurityError, match="unable to find user nobody"):
        look("nobody")
    with pytest.raises(SecurityError, match="unable to find group nogroup"):
        look("app:nogroup")


def test_parse_mounts() -> None:
    assert parse_volume("/srv/data:/data:ro") == Mount("bind", "/data", "/srv/data", True)
    assert parse_volume("pgdata:/var/lib/pg/") == Mount("volume", "/var/lib/pg", "pgdata", False)
    assert parse_tmpfs("/run:size=1m,exec") == Mount("tmpfs", "/run", "", False, "size=1m,exec")
    for bad, msg in (("data", "write -v"), ("d:rel", "must be absolute"), ("d:/x:rx", "ro or rw"),
                     ("bad/name:/x", "invalid volume name"), ("/h:/", "root")):
        with pytest.raises(MountError, match=msg):
            parse_volume(bad)
    with pytest.raises(MountError, match="unknown option 'bogus'"):
        parse_tmpfs("/run:bogus")


def test_volume_store(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path / "volumes")
    v = store.create("data", {"k": "v"})
    assert v.mountpoint.is_dir() and store.create("data").created_at_ns == v.created_at_ns  # idempotent
    assert [x.name for x in store.list()] == ["data"]
    with pytest.raises(VolumeInUse, match="in use by container abc"):
        store.remove("data", ["abc"])
    store.remove("data", [])
    assert store.list() == [] and not (tmp_path / "volumes" / "data").exists()
    with pytest.raises(VolumeNotFound, match="no such volume: data"):
        store.remove("data", [])


# ----- kernel -----


def test_masked_proc_reads_empty_and_mount_fails(supervised: Host) -> None:
    masked = [p for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug") if os.path.exists(p)]
    script = (
        "".join(f"echo {p}=$(wc -c < {p});" for p in masked)
        + " (echo 1 > /proc/sys/kernel/ns_last_pid) 2>/dev/null && echo sys=rw || echo sys=ro;"
        + " mkdir -p /mnt/t; mount -t tmpfs none /mnt/t 2>/dev/null && echo mounted || echo mount-failed;"
        + " grep NoNewPrivs /proc/self/status"
    )
    code, lines = run_script(supervised, "masked", script)
    assert code == 0, supervised.log_text("masked")
    assert lines == [f"{p}=0" for p in masked] + ["sys=ro", "mount-failed", "NoNewPrivs:\t1"]
    assert masked  # the host has at least one of them, so the check above checked something


def test_cap_add_drop_and_privileged(supervised: Host) -> None:
    script = "grep -E 'CapBnd|CapEff' /proc/self/status | cut -f2"
    code, lines = run_script(supervised, "caps", script,
                             security=Security(cap_add=("NET_ADMIN",), cap_drop=("NET_RAW",)))
    want = cap_mask(sec.capabilities(Security(cap_add=("NET_ADMIN",), cap_drop=("NET_RAW",))))
    assert (code, lines) == (0, [want, want])
    # NET_ADMIN really works: adding an address needs it; without it this fails.
    code, lines = run_script(supervised, "netadm", "ip addr add 10.9.9.9/32 dev lo && echo ok",
                             security=Security(cap_add=("NET_ADMIN",)))
    assert (code, lines) == (0, ["ok"])
    code, _ = run_script(supervised, "nonetadm", "ip addr add 10.9.9.9/32 dev lo")
    assert code != 0
    # privileged: every capability, /proc not masked, mount works.
    script = ("grep CapEff /proc/self/status | cut -f2; mkdir -p /mnt/t; mount -t tmpfs none /mnt/t && echo mounted;"
              " grep -c ' /proc/kcore ' /proc/mounts; true")
    code, lines = run_script(supervised, "priv", script, security=Security(privileged=True))
    status = Path("/proc/self/status").read_text().splitlines()
    host_bounding = next(line.split()[1] for line in status if line.startswith("CapBnd:"))
    assert code == 0 and lines[0] == host_bounding  # all this host's (a sandbox may itself lack some)
    assert lines[1:] == ["mounted", "0"]


def test_privileged_refused_unless_allowed(host: Host) -> None:
    async def body() -> None:
        ex = host.executor()
        try:
            with pytest.raises(StartError, match="--allow-privileged"):
                await ex.create(host.config("p", "true", security=Security(privileged=True)))
            assert not (host.state_dir / "containers" / "p").exists()
        finally:
            await ex.close()

    run(body())


def test_user_from_image_and_uid_gid(supervised: Host) -> None:
    script = "id -u; id -g; id -G; echo $HOME; grep CapEff /proc/self/status | cut -f2; touch /root/x || echo denied"
    code, lines = run_script(supervised, "user", script, security=Security(user="nobody"))
    assert (code, lines) == (0, ["65534", "65534", "65534", "/", "0000000000000000", "denied"])
    code, lines = run_script(supervised, "uidgid", "id -u; id -g", security=Security(user="1234:5"))
    assert (code, lines) == (0, ["1234", "5"])
    code, lines = run_script(supervised, "root", "id -u; echo $HOME")
    assert (code, lines) == (0, ["0", "/root"])


def test_unknown_user_is_a_start_error(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            await ex.create(supervised.config("nouser", "true", security=Security(user="ghost")))
            with pytest.raises(StartError, match="unable to find user ghost"):
                await ex.start("nouser")
            assert not supervised.cgroup_leaves()
        finally:
            await ex.remove("nouser")
            await ex.close()

    run(body())


def test_ulimits(supervised: Host) -> None:
    code, lines = run_script(supervised, "ulim", "ulimit -n; ulimit -Hn; ulimit -u",
                             security=Security(ulimits=(Ulimit("nofile", 100, 200), Ulimit("nproc", 77, 77))))
    assert (code, lines) == (0, ["100", "200", "77"])


def test_read_only_root_with_tmpfs(supervised: Host) -> None:
    script = ("touch /x 2>/dev/null && echo root-rw || echo root-ro; touch /run/x && echo run-rw;"
              " grep ' /run ' /proc/mounts | cut -d' ' -f3,4")
    code, lines = run_script(supervised, "ro", script, security=Security(read_only=True),
                             mounts=(parse_tmpfs("/run:size=1m"),))
    assert code == 0, supervised.log_text("ro")
    assert lines[:2] == ["root-ro", "run-rw"]
    fstype, opts = lines[2].split()
    assert fstype == "tmpfs" and {"rw", "nosuid", "nodev", "noexec", "size=1024k"} <= set(opts.split(","))


def test_bind_mounts_ro_and_rw(supervised: Host, tmp_path: Path) -> None:
    src = tmp_path / "shared"
    src.mkdir()
    (src / "in.txt").write_text("from host\n")
    script = ("cat /data/in.txt; echo out > /data/out.txt; echo back > /ro/x 2>/dev/null || echo ro-denied;"
              " cat /ro/in.txt")
    code, lines = run_script(supervised, "bind", script,
                             mounts=(Mount("bind", "/data", str(src)), Mount("bind", "/ro", str(src), True)))
    assert (code, lines) == (0, ["from host", "ro-denied", "from host"]), supervised.log_text("bind")
    assert (src / "out.txt").read_text() == "out\n"
    assert not mounts_mentioning(src)


def test_mount_target_through_symlink_is_refused(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            # /bin/sh is a symlink in the image: a mount at /bin/sh/x must not follow it.
            await ex.create(supervised.config("symlink", "true", mounts=(Mount("tmpfs", "/bin/sh/x"),)))
            with pytest.raises(StartError, match="mount volumes: mount point /bin/sh/x goes through a symlink"):
                await ex.start("symlink")
            assert not supervised.cgroup_leaves()
        finally:
            await ex.remove("symlink")
            await ex.close()

    run(body())


def test_named_volume_outlives_rm(supervised: Host) -> None:
    vol = (Mount("volume", "/data", "pgdata"),)
    code, _ = run_script(supervised, "v1", "echo kept > /data/f", mounts=vol)
    assert code == 0, supervised.log_text("v1")
    store = VolumeStore(supervised.state_dir / "volumes")
    assert (store.get("pgdata").mountpoint / "f").read_text() == "kept\n"  # v1 is removed, the volume stays
    code, lines = run_script(supervised, "v2", "cat /data/f", mounts=vol)
    assert (code, lines) == (0, ["kept"])


def test_cgroup_swap_shares_cpuset(supervised: Host) -> None:
    async def body() -> None:
        ex = supervised.executor()
        try:
            await ex.create(supervised.config(
                "cg", "sleep", "60", memory_bytes=32 << 20, memory_swap_bytes=48 << 20, cpu_shares=512,
                cpuset_cpus="0",
            ))
            await ex.start("cg")
            hier = supervised.hier
            cg = hier.cgroup(supervised.cgroup_parent, "cg")
            if hier.version == 1:
                mem = cg.dirs["memory"]
                if (mem / "memory.memsw.limit_in_bytes").exists():
                    assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 48 << 20
                assert (cg.dirs["cpu"] / "cpu.shares").read_text().strip() == "512"
                assert (cg.dirs["cpuset"] / "cpuset.cpus").read_text().strip() == "0"
            else:
                d = cg.dirs[""]
                assert (d / "cpu.weight").read_text().strip() == "20"
                assert (d / "cpuset.cpus").read_text().strip() == "0"
            status = Path(f"/proc/{(await ex.info('cg')).pid}/status").read_text()
            assert "Cpus_allowed_list:\t0\n" in status
        finally:
            await ex.remove("cg")
            await ex.close()

    run(body())


def test_new_named_volume_gets_the_image_files(supervised: Host) -> None:
    """Docker's copy-up: an empty volume mounted where the image has files starts with them (modes and
    owners kept); a volume with data is left as it is."""
    code, lines = run_script(supervised, "cu1", "ls /etc; stat -c %a /root; echo mine > /etc/passwd",
                             mounts=(Mount("volume", "/etc", "etcvol"), Mount("volume", "/root", "rootvol")))
    assert code == 0, supervised.log_text("cu1")
    assert "passwd" in lines and "group" in lines and lines[-1] == "700"
    store = VolumeStore(supervised.state_dir / "volumes")
    assert (store.get("etcvol").mountpoint / "group").read_text() == (supervised.rootfs / "etc/group").read_text()
    assert oct(store.get("rootvol").mountpoint.stat().st_mode & 0o7777) == "0o700"
    code, lines = run_script(supervised, "cu2", "cat /etc/passwd", mounts=(Mount("volume", "/etc", "etcvol"),))
    assert (code, lines) == (0, ["mine"])  # not copied again over the volume's own data
