"""Bring a dev cluster up, report on it, and tear it down to nothing.

`up` builds, in order: the bridge and host namespaces (`netns`), etcd (`etcd`), the registry seeded with
busybox (`registry`, `seed`), one controller on the bridge address and one agent per host namespace. Every
process runs detached, marked with BERTH_DEV_CLUSTER=<state-dir>/<name> in its environment, and recorded
(pid and start time, so a reused pid is never killed) in <state-dir>/<name>/cluster.json as soon as it
starts. If any step fails, `up` tears down what it made, keeps the logs in <state-dir>/<name>.failed and
raises a `StartError` naming the log to read.

`down` does not trust cluster.json to be there or complete: it also finds the cluster's processes by
their environment mark, their command line (which names the state dir) and their network namespace; its
cgroups under every mounted hierarchy (`berth-<name>`); its mounts under the state dir; its namespaces and
links by name. Each step goes on when an earlier one fails, and what could not be removed is reported
in one `TeardownError` at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from berthctl.dev import (
    DEFAULT_NAME,
    DEFAULT_STATE_DIR,
    ClusterExistsError,
    DevError,
    NoClusterError,
    StartError,
    TeardownError,
    netns,
)
from berthctl.dev import etcd as etcd_server

ENV_MARK = "BERTH_DEV_CLUSTER"
CONTROLLER_PORT = 7070
CONTROLLER_METRICS_PORT = 7071
AGENT_PORT = 7072
AGENT_METRICS_PORT = 7073
REGISTRY_PORT = 5000
MAX_HOSTS = 99
CLUSTER_FILE = "cluster.json"
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Proc:
    """A process the cluster started."""

    role: str  # etcd, registry, controller, agent-host1, ...
    pid: int
    start_time: int  # /proc/<pid>/stat field 22: tells a reused pid apart
    log: str


@dataclass(frozen=True)
class HostInfo:
    name: str  # host1
    netns: str  # <cluster>-host1
    address: str  # 10.77.0.11
    agent_address: str  # 10.77.0.11:7072
    metrics_address: str  # 10.77.0.11:7073
    state_dir: str
    log: str


@dataclass(frozen=True)
class ClusterInfo:
    """Everything about one dev cluster; saved as <state-dir>/<name>/cluster.json."""

    name: str
    state_dir: str  # <state-dir>/<name>
    subnet: str
    bridge: str
    gateway: str  # the bridge's address, where etcd, registry and controller listen
    etcd: str  # client URL
    controller: str
    controller_metrics: str
    registry: str
    berth: bool  # False for an infrastructure-only cluster (--no-berth)
    hosts: tuple[HostInfo, ...]
    processes: tuple[Proc, ...] = field(default=())
    # every controller's address, comma-separated, the first being `controller` (`--controllers N`)
    controllers: str = ""

    @property
    def controller_list(self) -> str:
        """What agents and berthctl are given: all controllers, comma-separated."""
        return self.controllers or self.controller

    def process(self, role: str) -> Proc | None:
        return next((p for p in self.processes if p.role == role), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterInfo:
        hosts = tuple(HostInfo(**h) for h in data.pop("hosts"))
        processes = tuple(Proc(**p) for p in data.pop("processes"))
        return cls(hosts=hosts, processes=processes, **data)


# ---------------------------------------------------------------------------------------------------------
# Checks and paths


def cluster_dir(name: str, state_dir: Path | str) -> Path:
    return Path(state_dir).absolute() / name


def _failed_dir(cdir: Path) -> Path:
    return cdir.with_name(cdir.name + ".failed")


def _down_hint(name: str, state_dir: Path) -> str:
    extra = "" if state_dir == DEFAULT_STATE_DIR else f" --state-dir {state_dir}"
    return f"berthctl dev down --name {name}{extra}"


def _check_root() -> None:
    if os.geteuid() != 0:
        raise DevError("berthctl dev needs root (network namespaces, bridges, cgroups); run it with sudo")


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise DevError(
            f"invalid cluster name {name!r}: use lower-case letters, digits and inner dashes, "
            "starting with a letter (e.g. --name dev2)"
        )


# What `up` runs, by Debian package; checked before anything is made.
_TOOLS = {
    "/usr/bin/etcd": "etcd-server",
    "/usr/bin/docker-registry": "docker-registry",
    "/usr/bin/skopeo": "skopeo",
    "/bin/busybox": "busybox-static",
}


def _check_tools() -> None:
    missing = [pkg for path, pkg in _TOOLS.items() if not os.access(path, os.X_OK)]
    if missing:
        raise DevError(f"missing Debian packages: {', '.join(missing)}; run scripts/install-deps")


def parse_host_labels(flags: Iterable[str], hosts: int) -> dict[str, list[str]]:
    """issue 6: `dev up --label host2:disk=ssd` (one host) or `--label zone=a` (every host) -> the
    `--label KEY=VALUE` values of each host's agent."""
    out: dict[str, list[str]] = {f"host{i}": [] for i in range(1, hosts + 1)}
    for flag in flags:
        where, colon, label = flag.partition(":")
        if not colon or "=" in where:
            where, label = "", flag
        key, eq, _ = label.partition("=")
        if not eq or not key.strip():
            raise DevError(f"invalid --label {flag!r}: write [HOST:]KEY=VALUE, e.g. host2:disk=ssd")
        if where and where not in out:
            raise DevError(f"invalid --label {flag!r}: no host {where!r} in a cluster of {hosts} (host1..host{hosts})")
        for name in [where] if where else list(out):
            out[name].append(label)
    return out


def _parse_subnet(subnet: str, hosts: int) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as e:
        raise DevError(f"invalid --subnet {subnet!r} ({e}); give an IPv4 network such as 10.77.0.0/24") from e
    if net.num_addresses < 10 + hosts + 2:
        raise DevError(f"subnet {net} is too small for {hosts} hosts; use a /24 such as 10.77.0.0/24")
    return net


def config_path() -> Path:
    """The CLI's config file: $XDG_CONFIG_HOME/berth/config.json, by default ~/.config/berth/config.json."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "berth" / "config.json"


# ---------------------------------------------------------------------------------------------------------
# Processes


def _read(path: str | Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    return raw[raw.rfind(b")") + 2 :].decode().split()


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, started: int | None = None) -> bool:
    """True if pid runs (zombies count as dead) and, given `started`, is the same process."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def _reap(pid: int) -> None:
    """Collect pid's exit status if it is our child (when `up` ran in this process)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def terminate(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """SIGTERM, wait up to `timeout`, then SIGKILL; returns the pids still alive after that."""
    pending = {pid for pid in pids if alive(pid)}
    for pid in pending:
        _signal(pid, signal.SIGTERM)
    for sig, wait in ((signal.SIGKILL, timeout), (None, 5.0)):
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            for pid in list(pending):
                _reap(pid)
                if not alive(pid):
                    pending.discard(pid)
            if pending:
                time.sleep(0.05)
        if sig is not None:
            for pid in pending:
                _signal(pid, sig)
    return sorted(pending)


def _has_tty(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and int(fields[4]) != 0


def _ancestors() -> set[int]:
    pids = set()
    pid = os.getpid()
    while pid > 1:
        pids.add(pid)
        fields = _stat_fields(pid)
        if fields is None:
            break
        pid = int(fields[1])
    return pids


def _all_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _is_agent(pid: int) -> bool:
    """Whether the process is a berth agent (`python -m agent ...` or `berth-agent ...`), not its supervisor."""
    argv = (_read(f"/proc/{pid}/cmdline") or b"").split(b"\0")
    if b"-m" in argv:
        return argv[argv.index(b"-m") + 1:][:1] == [b"agent"]
    return any(os.path.basename(arg) == b"berth-agent" for arg in argv[:2])


def find_processes(cdir: Path, namespaces: Iterable[str]) -> list[int]:
    """Live processes that belong to the cluster in `cdir`.

    A process belongs if its environment carries the cluster's mark, it runs in one of the cluster's
    network namespaces, or its command line names the cluster dir and it has no controlling terminal
    (a daemon, not someone's `tail -f .../agent.log`). This process and its parents never count.
    """
    mark = f"{ENV_MARK}={cdir}".encode()
    path_re = re.compile(re.escape(str(cdir)).encode() + rb"(?![\w.-])")
    ns_ids = set()
    for ns in namespaces:
        with contextlib.suppress(OSError):
            st = os.stat(os.path.join(netns.NETNS_DIR, ns))
            ns_ids.add((st.st_dev, st.st_ino))
    skip = _ancestors()
    found = []
    for pid in _all_pids():
        if pid in skip or not alive(pid):
            continue
        cmdline = _read(f"/proc/{pid}/cmdline")
        if not cmdline:  # kernel threads, or gone
            continue
        environ = _read(f"/proc/{pid}/environ") or b""
        if mark in environ.split(b"\0"):
            found.append(pid)
            continue
        if path_re.search(cmdline) and not _has_tty(pid):
            found.append(pid)
            continue
        if ns_ids:
            try:
                st = os.stat(f"/proc/{pid}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in ns_ids:
                found.append(pid)
    return found


def _spawn(
    role: str, argv: list[str], log: Path, env: dict[str, str], cwd: Path
) -> tuple[subprocess.Popen[bytes], Proc]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
    return proc, _record(role, proc, log)


def _record(role: str, proc: subprocess.Popen[bytes], log: Path) -> Proc:
    return Proc(role=role, pid=proc.pid, start_time=start_time(proc.pid) or 0, log=str(log))


def _child_env(cdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[ENV_MARK] = str(cdir)
    env["PYTHONUNBUFFERED"] = "1"
    # The berth packages come from this checkout even when it is not pip-installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


# ---------------------------------------------------------------------------------------------------------
# cluster.json


def _save(info: ClusterInfo) -> None:
    path = Path(info.state_dir) / CLUSTER_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n")
    tmp.replace(path)


def _try_load(cdir: Path) -> ClusterInfo | None:
    raw = _read(cdir / CLUSTER_FILE)
    if raw is None:
        return None
    try:
        return ClusterInfo.from_json(json.loads(raw))
    except (ValueError, TypeError, KeyError):
        return None


def load(name: str = DEFAULT_NAME, state_dir: Path | str = DEFAULT_STATE_DIR) -> ClusterInfo:
    """The ClusterInfo of a running dev cluster; NoClusterError if there is none."""
    _check_name(name)
    cdir = cluster_dir(name, state_dir)
    path = cdir / CLUSTER_FILE
    raw = _read(path)
    if raw is None:
        raise NoClusterError(f"no dev cluster {name!r} under {Path(state_dir)}; start one with berthctl dev up")
    try:
        return ClusterInfo.from_json(json.loads(raw))
    except (ValueError, TypeError, KeyError) as e:
        raise NoClusterError(
            f"{path} is damaged ({e}); remove the cluster with {_down_hint(name, Path(state_dir))}"
        ) from e


def _plan(name: str, hosts: int, net: ipaddress.IPv4Network, cdir: Path, berth: bool) -> ClusterInfo:
    gw = str(netns.gateway(net).ip)
    host_infos = []
    for i in range(1, hosts + 1):
        link = netns.host_link(name, net, i)
        ip = str(link.address.ip)
        hdir = cdir / "hosts" / f"host{i}"
        host_infos.append(
            HostInfo(
                name=f"host{i}",
                netns=link.netns,
                address=ip,
                agent_address=f"{ip}:{AGENT_PORT}",
                metrics_address=f"{ip}:{AGENT_METRICS_PORT}",
                state_dir=str(hdir),
                log=str(hdir / "agent.log"),
            )
        )
    return ClusterInfo(
        name=name,
        state_dir=str(cdir),
        subnet=str(net),
        bridge=netns.bridge_name(name),
        gateway=gw,
        etcd=etcd_server.client_url(gw),
        controller=f"{gw}:{CONTROLLER_PORT}",
        controller_metrics=f"{gw}:{CONTROLLER_METRICS_PORT}",
        registry=f"{gw}:{REGISTRY_PORT}",
        berth=berth,
        hosts=tuple(host_infos),
    )


# ---------------------------------------------------------------------------------------------------------
# up


def up(
    name: str = DEFAULT_NAME,
    hosts: int = 3,
    subnet: str = "10.77.0.0/24",
    state_dir: Path | str = DEFAULT_STATE_DIR,
    *,
    infra_only: bool = False,
    write_config: bool = True,
    progress: Progress | None = None,
    timeout: float = 90.0,
    controllers: int = 1,
    container_cidr: str = "",
    labels: Iterable[str] = (),
) -> ClusterInfo:
    """Create and start dev cluster `name`; returns once every host is NODE_READY (see module doc).
    `labels` are `[HOST:]KEY=VALUE` (issue 6): given to that host's agent (`--label`), or to every host's."""
    say: Progress = progress or (lambda _msg: None)
    _check_root()
    _check_name(name)
    if not 1 <= hosts <= MAX_HOSTS:
        raise DevError(f"--hosts must be between 1 and {MAX_HOSTS}, not {hosts}")
    if not 1 <= controllers <= 5:
        raise DevError(f"--controllers must be between 1 and 5, not {controllers}")
    try:
        netns.check_names(name, hosts)
    except netns.NetworkError as e:
        raise DevError(str(e)) from e
    net = _parse_subnet(subnet, hosts)
    host_labels = parse_host_labels(labels, hosts)  # issue 6
    state = Path(state_dir).absolute()
    cdir = cluster_dir(name, state)
    leftovers = [str(cdir)] if cdir.exists() else []
    leftovers += netns.cluster_namespaces(name) + netns.cluster_links(name)
    if leftovers:
        raise ClusterExistsError(
            f"dev cluster {name!r} already exists ({', '.join(leftovers)}); run {_down_hint(name, state)} first"
        )
    _check_tools()
    users = netns.subnet_users(net)
    if users:
        raise DevError(f"subnet {net} is already in use by {', '.join(users)}; choose another with --subnet")

    info = _plan(name, hosts, net, cdir, berth=not infra_only)
    if controllers > 1:  # controller i listens on 7070 + 10 (i - 1), its metrics one port up
        info = replace(info, controllers=",".join(
            f"{info.gateway}:{CONTROLLER_PORT + 10 * i}" for i in range(controllers)))
    shutil.rmtree(_failed_dir(cdir), ignore_errors=True)
    try:
        cdir.mkdir(parents=True)
        _save(info)
        info = _bring_up(info, net, write_config, say, timeout, container_cidr=container_cidr,
                         host_labels=host_labels)
    except BaseException as e:
        say(f"start failed; removing what was made for dev cluster {name!r}")
        _teardown_after_failure(e, name, state, cdir)
        if isinstance(e, OSError):
            raise DevError(f"dev cluster {name!r} could not start: {e}") from e
        raise
    return info


def _bring_up(
    info: ClusterInfo, net: ipaddress.IPv4Network, write_config: bool, say: Progress, timeout: float,
    container_cidr: str = "",
    host_labels: dict[str, list[str]] | None = None,
) -> ClusterInfo:
    from berthctl.dev.registry import start_registry
    from berthctl.dev.seed import seed_registry

    cdir = Path(info.state_dir)
    env = _child_env(cdir)
    running: dict[str, subprocess.Popen[bytes]] = {}

    def add(proc: subprocess.Popen[bytes], rec: Proc) -> None:
        nonlocal info
        running[rec.role] = proc
        info = replace(info, processes=(*info.processes, rec))
        _save(info)

    say(f"network: bridge {info.bridge} {info.gateway}, namespaces {', '.join(h.netns for h in info.hosts)}")
    netns.create_bridge(info.name, net)
    for i in range(1, len(info.hosts) + 1):
        netns.create_host(info.name, net, i)

    say(f"etcd: {info.etcd}")
    etcd_log = cdir / "etcd.log"
    proc = etcd_server.start(info.gateway, cdir / "etcd", etcd_log, env)
    add(proc, _record("etcd", proc, etcd_log))
    etcd_server.wait_healthy(info.etcd, proc, etcd_log, timeout=min(timeout, 30.0))

    say(f"registry: {info.registry}, seeding busybox")
    reg_log = cdir / "registry.log"
    try:
        reg = start_registry(cdir / "registry", info.registry, reg_log)
    except DevError:
        raise
    except Exception as e:
        raise StartError(f"the registry did not start at {info.registry}: {_first_line(e)}", reg_log) from e
    add(reg, _record("registry", reg, reg_log))
    seed_dir = cdir / "seed"
    try:
        seed_registry(info.registry, seed_dir)
    except DevError:
        raise
    except Exception as e:
        raise StartError(f"seeding the registry with busybox failed: {_first_line(e)}", reg_log) from e
    shutil.rmtree(seed_dir, ignore_errors=True)

    if info.berth:
        say(f"controller: {info.controller}")
        log = cdir / "controller.log"
        controller_cmd = [
            sys.executable, "-m", "controller",
            "--etcd", info.etcd,
            "--listen", info.controller,
            "--metrics-listen", info.controller_metrics,
        ]  # fmt: skip
        if container_cidr:  # issue 5: the containers' addresses (tests give each checkout its own)
            controller_cmd += ["--container-cidr", container_cidr]
        add(*_spawn("controller", controller_cmd, log, env, cdir))
        for i, address in enumerate(info.controller_list.split(",")[1:], start=2):
            port = int(address.rsplit(":", 1)[1])
            extra_cmd = [sys.executable, "-m", "controller", "--etcd", info.etcd, "--listen", address,
                         "--metrics-listen", f"{info.gateway}:{port + 1}"]
            if container_cidr:  # issue 5: every controller hands out subnets of the same CIDR
                extra_cmd += ["--container-cidr", container_cidr]
            add(*_spawn(f"controller{i}", extra_cmd, cdir / f"controller{i}.log", env, cdir))
        # Agents started before the controller answers would only sit in their reconnect back-off.
        _wait_controller(info, running, time.monotonic() + timeout)
        for host in info.hosts:
            say(f"agent {host.name}: {host.agent_address} in {host.netns}")
            Path(host.state_dir).mkdir(parents=True, exist_ok=True)
            agent_cmd = [
                sys.executable, "-m", "agent",
                "--netns", host.netns,
                "--controller", info.controller_list,
                "--name", host.name,
                "--address", host.address,
                "--listen", host.agent_address,
                "--metrics-listen", host.metrics_address,
                "--state-dir", host.state_dir,
                "--cgroup-parent", f"berth-{info.name}/{host.name}",
                "--registry-mirror", f"docker.io=http://{info.registry}",
                "--insecure-registry", info.registry,
            ]  # fmt: skip
            for label in (host_labels or {}).get(host.name, []):  # issue 6: dev up --label
                agent_cmd += ["--label", label]
            add(*_spawn(f"agent-{host.name}", agent_cmd, Path(host.log), env, cdir))
        say(f"waiting for {len(info.hosts)} hosts to be ready")
        _wait_nodes(info, running, time.monotonic() + timeout)

    if write_config:
        _write_config(info.controller_list)
    return info


def _first_line(error: BaseException) -> str:
    """An error's first line, without a trailing pointer to its log (we name the log ourselves)."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0].split("; log ")[0].rstrip(":")


def _check_running(info: ClusterInfo, running: dict[str, subprocess.Popen[bytes]]) -> None:
    for role, proc in running.items():
        if proc.poll() is not None:
            rec = info.process(role)
            raise StartError(
                f"{role} exited with status {proc.returncode} while the cluster started",
                Path(rec.log) if rec else None,
            )


def _wait_controller(info: ClusterInfo, running: dict[str, subprocess.Popen[bytes]], deadline: float) -> None:
    """Wait until the controller answers gRPC health (grpc.health.v1, service "") with SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from berth import rpc

    with rpc.sync_channel(info.controller) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            _check_running(info, running)
            try:
                resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise StartError(
                    f"the controller did not answer health checks at {info.controller}",
                    Path(info.state_dir) / "controller.log",
                )
            time.sleep(0.1)


def _wait_nodes(info: ClusterInfo, running: dict[str, subprocess.Popen[bytes]], deadline: float) -> None:
    """Wait until the controller lists every host as NODE_READY."""
    import grpc

    from berth import rpc
    from berth.api import control_pb2, control_pb2_grpc, types_pb2

    want = {h.name for h in info.hosts}
    ready: set[str] = set()
    with rpc.sync_channel(info.controller) as channel:
        control = control_pb2_grpc.ControlStub(channel)
        while True:
            _check_running(info, running)
            try:
                nodes = control.ListNodes(control_pb2.ListNodesRequest(), timeout=2.0).nodes
                ready = {n.name for n in nodes if n.state == types_pb2.NODE_READY}
                if want <= ready:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                missing = sorted(want - ready, key=lambda n: int(n[4:]))
                first = next(h for h in info.hosts if h.name == missing[0])
                raise StartError(
                    f"{len(want & ready)}/{len(want)} hosts ready (not ready: {', '.join(missing)})",
                    Path(first.log),
                )
            time.sleep(0.2)


def _write_config(controller: str) -> None:
    path = config_path()
    data: dict[str, Any] = {}
    raw = _read(path)
    if raw:
        with contextlib.suppress(ValueError):
            loaded = json.loads(raw)
            if isinstance(loaded, dict):
                data = loaded
    data["controller"] = controller
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _teardown_after_failure(error: BaseException, name: str, state: Path, cdir: Path) -> None:
    """Undo a failed `up`, keeping its logs in <name>.failed; rewrite the error to point there."""
    failed = _failed_dir(cdir)
    with contextlib.suppress(OSError):
        for log in cdir.rglob("*.log"):
            dest = failed / log.relative_to(cdir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(log, dest)
    try:
        down(name, state, _keep_failed=True)
    except DevError as e:
        error.add_note(f"also, the teardown was incomplete: {e}")
    if isinstance(error, StartError) and error.log is not None:
        with contextlib.suppress(ValueError):
            error.log = failed / error.log.relative_to(cdir)
            error.args = (f"{error.message}; read {error.log}",)


def usage(info: ClusterInfo, seconds: float | None = None) -> str:
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    lines: list[str] = []
    if info.berth:
        lines += [
            f"dev cluster {info.name!r} is up{took}: {len(info.hosts)} hosts, controller {info.controller}",
            f"berthctl now talks to it ({config_path()}). Try:",
            "  berthctl node ls",
            "  berthctl run busybox echo hello",
        ]
    else:
        lines += [
            f"dev cluster {info.name!r} infrastructure is up{took} (no controller or agents): "
            f"etcd {info.etcd}, registry {info.registry}",
            f"hosts: {', '.join(f'{h.netns} {h.address}' for h in info.hosts)}",
        ]
    extra = "" if Path(info.state_dir).parent == DEFAULT_STATE_DIR else f" --state-dir {Path(info.state_dir).parent}"
    lines += [
        f"  berthctl dev status --name {info.name}{extra}",
        f"  berthctl dev down --name {info.name}{extra}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# status


def _supervisor_pid(host_state_dir: str | Path) -> int | None:
    """The pid in <host state dir>/supervisor.pid, written by the host's supervisor."""
    raw = _read(Path(host_state_dir) / "supervisor.pid")
    try:
        return int(raw.strip()) if raw else None
    except ValueError:
        return None


def status(info: ClusterInfo) -> dict[str, Any]:
    """cluster.json plus whether each process is alive (and each host's supervisor, from its pid file)."""
    data = info.to_json()
    for proc in data["processes"]:
        proc["alive"] = alive(proc["pid"], proc["start_time"])
    for host_data, host in zip(data["hosts"], info.hosts, strict=True):
        pid = _supervisor_pid(host.state_dir)
        host_data["supervisor"] = {"pid": pid, "alive": pid is not None and alive(pid)}
    return data


def status_json(info: ClusterInfo) -> str:
    return json.dumps(status(info), indent=2)


def status_table(info: ClusterInfo) -> str:
    data = status(info)
    procs = {p["role"]: p for p in data["processes"]}

    def state(role: str) -> tuple[str, str]:
        p = procs.get(role)
        if p is None:
            return "-", "not started"
        return str(p["pid"]), "running" if p["alive"] else "dead"

    rows = [("COMPONENT", "ADDRESS", "PID", "STATE", "DETAIL")]
    rows.append(("etcd", info.etcd, *state("etcd"), ""))
    rows.append(("registry", info.registry, *state("registry"), ""))
    if info.berth:
        rows.append(("controller", info.controller, *state("controller"), f"metrics {info.controller_metrics}"))
    for host, hd in zip(info.hosts, data["hosts"], strict=True):
        detail = f"netns {host.netns}, metrics {host.metrics_address}"
        if info.berth:
            rows.append((f"agent {host.name}", host.agent_address, *state(f"agent-{host.name}"), detail))
            sup = hd["supervisor"]
            sup_state = "running" if sup["alive"] else ("dead" if sup["pid"] else "unknown")
            rows.append((f"supervisor {host.name}", "", str(sup["pid"] or "-"), sup_state, ""))
        else:
            rows.append((f"host {host.name}", host.address, "-", "-", f"netns {host.netns}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    header = f"dev cluster {info.name!r}: subnet {info.subnet}, bridge {info.bridge}, state {info.state_dir}"
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([header, *body])


# ---------------------------------------------------------------------------------------------------------
# down

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


def _umount_lazy(path: str) -> None:
    """umount2(path, MNT_DETACH); a path that is no longer a mount point is fine."""
    if _libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, os.strerror(err), path)


def _unescape(field_: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space and so on)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount in this mount namespace."""
    mounts = []
    for line in (_read("/proc/self/mountinfo") or b"").decode().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and right:
            mounts.append((_unescape(fields[4]), right.split()[0]))
    return mounts


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/")
    return [m for m, _ in _mountinfo() if m == prefix or m.startswith(prefix + "/")]


def cgroup_dirs(name: str) -> list[Path]:
    """berth-<name> under every mounted cgroup hierarchy (v1 controllers, named, and v2) that has one."""
    found = []
    for mount, fstype in _mountinfo():
        if fstype in ("cgroup", "cgroup2"):
            path = Path(mount) / f"berth-{name}"
            if path.is_dir() and path not in found:
                found.append(path)
    return found


def _cgroup_tree(root: Path) -> list[Path]:
    """root and all its descendants, deepest first."""
    dirs = [Path(d) for d, _, _ in os.walk(root)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _write(path: Path, value: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(value)


def _clean_cgroup(root: Path, timeout: float) -> str | None:
    """Kill every process in cgroup `root` and its descendants, then remove them; returns a problem or None."""
    for d in _cgroup_tree(root):  # frozen tasks cannot die
        if (d / "cgroup.freeze").exists():
            _write(d / "cgroup.freeze", "0")
        if (d / "freezer.state").exists():
            _write(d / "freezer.state", "THAWED")
    if (root / "cgroup.kill").exists():
        _write(root / "cgroup.kill", "1")
    deadline = time.monotonic() + timeout
    while True:
        pids = set()
        tree = _cgroup_tree(root) if root.exists() else []
        for d in tree:
            for line in (_read(d / "cgroup.procs") or b"").split():
                pids.add(int(line))
        for pid in pids:
            _signal(pid, signal.SIGKILL)
            _reap(pid)
        if not pids:
            busy: OSError | None = None
            for d in tree:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    busy = e
                    break
            if busy is None:
                return None
            if time.monotonic() > deadline:
                return f"cgroup {busy.filename}: {busy.strerror}"
        elif time.monotonic() > deadline:
            return f"cgroup {root}: processes {sorted(pids)} would not die"
        time.sleep(0.05)


def down(
    name: str = DEFAULT_NAME,
    state_dir: Path | str = DEFAULT_STATE_DIR,
    *,
    progress: Progress | None = None,
    timeout: float = 10.0,
    _keep_failed: bool = False,
) -> None:
    """Remove every trace of dev cluster `name` (see module doc). Quiet and successful if there is none."""
    say: Progress = progress or (lambda _msg: None)
    _check_root()
    _check_name(name)
    state = Path(state_dir).absolute()
    cdir = cluster_dir(name, state)
    info = _try_load(cdir)
    problems: list[str] = []

    def attempt(what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except (OSError, DevError) as e:
            problems.append(f"{what}: {e}")

    # 1. Agents first, so that none restarts a supervisor or a container behind our back: the recorded ones,
    # and any started again since (a test's respawn): stopped with the rest, one restarted its supervisor while
    # dying and left it running (session 6, CI).
    recorded = [p for p in (info.processes if info else ()) if alive(p.pid, p.start_time)]
    namespaces = netns.cluster_namespaces(name)
    agents = sorted({p.pid for p in recorded if p.role.startswith("agent-")}
                    | {pid for pid in find_processes(cdir, namespaces) if _is_agent(pid)})
    if agents:
        say(f"stopping {len(agents)} agents")
        problems += [f"agent pid {pid} would not die" for pid in terminate(agents, timeout)]

    # 2. Supervisors, the controller, registry, etcd, and anything else marked as ours.
    others = {p.pid for p in recorded if not p.role.startswith("agent-")}
    for hdir in sorted(cdir.glob("hosts/*")):
        pid = _supervisor_pid(hdir)
        if pid is not None and alive(pid):
            others.add(pid)
    others.update(find_processes(cdir, namespaces))
    if others:
        say(f"stopping {len(others)} processes")
        problems += [f"pid {pid} would not die" for pid in terminate(others, timeout)]

    # 3. Containers: whatever is left in the cluster's cgroups.
    for cg in cgroup_dirs(name):
        say(f"removing cgroup {cg}")
        problem = _clean_cgroup(cg, timeout)
        if problem:
            problems.append(problem)

    # 4. Stragglers forked while we worked.
    late = find_processes(cdir, namespaces)
    if late:
        problems += [f"pid {pid} would not die" for pid in terminate(late, timeout)]

    # 5. Mounts under the state dir, deepest first (lazily: a busy one goes once its users have).
    for _ in range(10):
        mounts = mounts_under(cdir)
        if not mounts:
            break
        say(f"unmounting {len(mounts)} mounts under {cdir}")
        for m in sorted(set(mounts), key=lambda p: p.count("/"), reverse=True):
            attempt(f"unmount {m}", lambda m=m: _umount_lazy(m))  # type: ignore[misc]
    else:
        problems.append(f"mounts remain under {cdir}: {mounts_under(cdir)}")

    # 5b. Containers' network namespaces (issue 5), bind-mounted outside the state dir by each agent.
    from agent.network.host import netns_dir, remove_netns

    for hdir in sorted(cdir.glob("hosts/*")):
        nsdir = netns_dir(hdir)
        if nsdir.is_dir():
            say(f"removing container network namespaces in {nsdir}")
            for f in nsdir.iterdir():
                attempt(f"remove {f}", lambda f=f: remove_netns(f))  # type: ignore[misc]
            attempt(f"remove {nsdir}", nsdir.rmdir)

    # 6. Network: namespaces, veths, bridge.
    if namespaces or netns.cluster_links(name):
        say(f"removing network namespaces and links of {name!r}")
        attempt("network", lambda: netns.remove_all(name, timeout))

    # 7. Files, and the CLI config if it points at this cluster.
    for d in (cdir, None if _keep_failed else _failed_dir(cdir)):
        if d is not None and d.exists():
            say(f"removing {d}")
            attempt(f"remove {d}", lambda d=d: shutil.rmtree(d))  # type: ignore[misc]
    if info is not None and not _keep_failed:
        _forget_config(info.controller_list)

    if problems:
        raise TeardownError(
            f"dev cluster {name!r} was not fully removed: {'; '.join(problems)}; "
            f"fix that and run {_down_hint(name, state)} again"
        )


def _forget_config(controller: str) -> None:
    path = config_path()
    raw = _read(path)
    if not raw:
        return
    try:
        data = json.loads(raw)
    except ValueError:
        return
    if isinstance(data, dict) and data.get("controller") == controller:
        del data["controller"]
        with contextlib.suppress(OSError):
            if data:
                path.write_text(json.dumps(data, indent=2) + "\n")
            else:
                path.unlink()
