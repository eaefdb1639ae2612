"""Fixtures shared by all tests.

- `cluster`: one real dev cluster for the whole session (name `btest`, 3 hosts, 10.77.9.0/24) made with
  `berthctl.dev.cluster.up` under a temporary state dir, and removed with `down` at the end even when
  tests fail. Tests that need a cluster of their own use another name and subnet.
- `berthctl`: runs `python -m berthctl ARGS...` against that cluster's controller.

Tests run as root on a machine prepared by scripts/install-deps; nothing is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from berthctl.dev import cluster as dev_cluster

CLUSTER_NAME = "btest"
CLUSTER_SUBNET = "10.77.9.0/24"
CLUSTER_HOSTS = 3

RunBerthctl = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="session")
def cluster_state_dir() -> Path:
    """A fixed place under the temp dir, so that a run killed half-way is cleaned up by the next one."""
    return Path(tempfile.gettempdir()) / "berth-test-state"


@pytest.fixture(scope="session")
def cluster(cluster_state_dir: Path) -> Iterator[dev_cluster.ClusterInfo]:
    """A running 3-host dev cluster, shared by the session."""
    # A previous run that was killed may have left this cluster behind.
    dev_cluster.down(CLUSTER_NAME, cluster_state_dir)
    try:
        info = dev_cluster.up(CLUSTER_NAME, CLUSTER_HOSTS, CLUSTER_SUBNET, cluster_state_dir, write_config=False)
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
