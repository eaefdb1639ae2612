"""Start, wait for and stop the dev cluster's single-member etcd (the Debian `etcd-server` binary).

etcd listens on the bridge address only: clients on :2379, peers on :2380, member name `dev`. It runs
detached in its own session so that it outlives `berthctl dev up`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from berthctl.dev import StartError

ETCD_BINARY = "/usr/bin/etcd"
MAX_TXN_OPS = 1024


def client_url(host: str) -> str:
    return f"http://{host}:2379"


def peer_url(host: str) -> str:
    return f"http://{host}:2380"


def find_binary() -> str:
    if os.access(ETCD_BINARY, os.X_OK):
        return ETCD_BINARY
    found = shutil.which("etcd")
    if found is None:
        raise StartError("etcd is not installed; run scripts/install-deps (Debian package etcd-server)")
    return found


def command(host: str, data_dir: Path) -> list[str]:
    return [
        find_binary(),
        "--name=dev",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url(host)}",
        f"--advertise-client-urls={client_url(host)}",
        f"--listen-peer-urls={peer_url(host)}",
        f"--initial-advertise-peer-urls={peer_url(host)}",
        f"--initial-cluster=dev={peer_url(host)}",
        "--initial-cluster-state=new",
        "--initial-cluster-token=berth-dev",
        # issue 6: the controller's big batches (berth-controller --max-txn-ops); etcd's default is 128
        f"--max-txn-ops={MAX_TXN_OPS}",
    ]


def start(host: str, data_dir: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start etcd detached; returns at once (call `wait_healthy` next)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command(host, data_dir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def healthy(url: str) -> bool:
    """True when etcd's /health says so."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            body = json.loads(resp.read() or b"{}")
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and body.get("health") == "true"


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 30.0) -> None:
    """Poll /health until it answers; fail early if etcd exits."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if proc.poll() is not None:
            raise StartError(f"etcd exited with status {proc.returncode} while starting", log_path)
        if time.monotonic() > deadline:
            raise StartError(f"etcd did not become healthy at {url} within {timeout:.0f}s", log_path)
        time.sleep(0.1)
