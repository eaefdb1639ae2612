"""Fixtures shared by all tests.

- `cluster`: one real dev cluster for the whole session (name `btest`, 3 hosts, 10.77.9.0/24) made with
  `berthctl.dev.cluster.up` under $TMPDIR/berth-test-state, and removed with `down` at the end even when
  tests fail. Tests that need a cluster of their own use another name and subnet.
- `berthctl`: runs `python -m berthctl ARGS...` against that cluster's controller.
- `exclusive(name)`: a machine-wide lock; test sessions running at the same time on one machine take
  turns with a cluster name instead of tearing down each other's cluster.

Tests run as root on a machine prepared by scripts/install-deps; nothing is skipped.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from berthctl.dev import cluster as dev_cluster

# BERTH_TEST_SLOT=N (0-9) gives a test session its own cluster names, subnets (10.77+N.x.0/24) and loopback
# addresses, so that sessions in separate checkouts on one machine run side by side instead of in turns.
SLOT = int(os.environ.get("BERTH_TEST_SLOT", "0"))
# The loopback addresses 127.0.<slot>.N that tests (and benchmarks) use, each listed here with who uses it, so that
# a new one does not take one in use (tests/test_loopback_addresses.py checks that every one used is listed):
#   .53-.57, .60-.64  tests/agent/test_dns.py: a DNS server (.53, .57), its client, upstream, a silent address;
#                     records' addresses (.60-.64)
#   .77               tests/controller/conftest.py HOST: the module's etcd and controller, the servers tests start
#   .78, .79          tests/controller/test_run_etcd_down.py: its own etcd (stopped by the test), another address;
#                     .78 also bench/reports.py's etcd (a bench and that test in one slot at once would clash)
#   .134, .135        tests/controller/test_start_stop_etcd_down.py: start's and stop's own etcd (stopped by the test)
#   .136              tests/controller/test_stop_etcd_fails.py: its own etcd (stopped by the test while Stop waits)


def slot_name(base: str) -> str:
    return base if SLOT == 0 else f"{base}{SLOT}"


def slot_subnet(subnet: str) -> str:
    """10.77.9.0/24 -> 10.(77+SLOT).9.0/24."""
    a, b, rest = subnet.split(".", 2)
    return f"{a}.{int(b) + SLOT}.{rest}"


CLUSTER_NAME = slot_name("btest")
CLUSTER_SUBNET = slot_subnet("10.77.9.0/24")
CLUSTER_HOSTS = 3
# Containers' addresses (issue 5): 10.(88+2*SLOT).0.0/16, apart from other slots' clusters.
CONTAINER_CIDR = f"10.{88 + 2 * SLOT}.0.0/16"
LOCK_DIR = Path(tempfile.gettempdir()) / "berth-test-locks"

RunBerthctl = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="session")
def cluster_state_dir() -> Path:
    """A fixed place under the temp dir, so that a run killed half-way is cleaned up by the next one."""
    return Path(tempfile.gettempdir()) / "berth-test-state"


@contextmanager
def exclusive(name: str, timeout: float = 240.0) -> Iterator[None]:
    """Hold a machine-wide lock named `name` while dev clusters of that name are in use.

    Test sessions started at the same time on one machine (several people, or CI and a person) would
    otherwise tear down each other's clusters, which are global: namespaces, links and addresses. The
    lock is an flock, so a session that dies releases it, and whoever takes it next may remove what
    that session left behind.
    """
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    path = LOCK_DIR / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = path.read_text().strip() or "unknown"
                    raise RuntimeError(
                        f"another test session (pid {holder}) has held {path} for {timeout:.0f}s; wait for it to finish"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def cluster(cluster_state_dir: Path) -> Iterator[dev_cluster.ClusterInfo]:
    """A running 3-host dev cluster, shared by the session."""
    with exclusive(CLUSTER_NAME):
        # Holding the lock, any cluster of this name was left by a session that died: remove it.
        dev_cluster.down(CLUSTER_NAME, cluster_state_dir)
        # A failed up removes what it made itself and keeps its logs in <state-dir>/btest.failed.
        info = dev_cluster.up(CLUSTER_NAME, CLUSTER_HOSTS, CLUSTER_SUBNET, cluster_state_dir, write_config=False,
                              container_cidr=CONTAINER_CIDR)
        try:
            yield info
        finally:
            dev_cluster.down(CLUSTER_NAME, cluster_state_dir)


def run_berthctl(
    controller: str | None, *args: str, timeout: float = 60.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run berthctl in a child process; BERTH_CONTROLLER points it at `controller`."""
    env = dict(os.environ)
    if controller is not None:
        env["BERTH_CONTROLLER"] = controller
    return subprocess.run(
        [sys.executable, "-m", "berthctl", *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def berthctl(cluster: dev_cluster.ClusterInfo) -> RunBerthctl:
    """`berthctl("ps", "-a")` -> CompletedProcess (text) from the session cluster's controller."""

    def run(*args: str, timeout: float = 60.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_berthctl(cluster.controller, *args, timeout=timeout, input=input)

    return run
