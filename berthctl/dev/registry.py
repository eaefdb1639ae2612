"""A local image registry for the dev cluster and the tests: Debian's docker-registry (CNCF Distribution)
with filesystem storage, plain HTTP, deletes enabled.

    proc = start_registry(root, "127.0.0.1:5000", log_path)   # returns once GET /v2/ answers
    ...
    stop_registry(proc)
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_TIMEOUT_S = 15.0


class RegistryStartError(RuntimeError):
    """The registry process did not come up; the message carries the tail of its log."""


@dataclass(frozen=True)
class TokenAuth:
    """Distribution's token authentication: clients are sent to `realm` for a JWT signed by a certificate in
    `rootcertbundle` (used by tests of the bearer-token flow)."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


def _log_tail(log_path: Path, lines: int = 20) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError as err:
        return f"(no log: {err})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def write_config(root: Path, listen: str, token_auth: TokenAuth | None = None) -> Path:
    """Write the Distribution config for `root` and `listen`; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    storage = root / "storage"
    storage.mkdir(exist_ok=True)
    q = json.dumps  # a JSON string is a valid YAML scalar, quoted and escaped
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n"
        "  level: info\n"
        "  formatter: text\n"
        "  accesslog:\n"
        "    disabled: false\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {q(str(storage))}\n"
        "  delete:\n"
        "    enabled: true\n"
        "  maintenance:\n"
        "    uploadpurging:\n"
        "      enabled: false\n"
        "http:\n"
        f"  addr: {q(listen)}\n"
        "  headers:\n"
        "    X-Content-Type-Options: [nosniff]\n"
    )
    if token_auth is not None:
        with config.open("a") as out:
            out.write(
                "auth:\n"
                "  token:\n"
                f"    realm: {q(token_auth.realm)}\n"
                f"    service: {q(token_auth.service)}\n"
                f"    issuer: {q(token_auth.issuer)}\n"
                f"    rootcertbundle: {q(str(token_auth.rootcertbundle))}\n"
            )
    return config


def storage_dir(root: Path) -> Path:
    """Where the registry started on `root` keeps its data (docker/registry/v2/... below it)."""
    return root / "storage"


def start_registry(
    root: Path, listen: str, log_path: Path, token_auth: TokenAuth | None = None
) -> subprocess.Popen[bytes]:
    """Start docker-registry serving `root` on `listen` (host:port); returns once GET /v2/ answers (200, or
    401 with token auth). Raises RegistryStartError with the log tail if it exits or does not answer within
    the deadline."""
    config = write_config(root, listen, token_auth)
    ready = {200, 401} if token_auth is not None else {200}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://{listen}/v2/"
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer yet"
    with httpx.Client(timeout=1.0, trust_env=False) as client:
        while True:
            code = proc.poll()
            if code is not None:
                raise RegistryStartError(
                    f"docker-registry on {listen} exited with status {code} before answering; log "
                    f"{log_path}:\n{_log_tail(log_path)}"
                )
            try:
                response = client.get(url)
                if response.status_code in ready:
                    return proc
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as err:
                last = str(err) or type(err).__name__
            if time.monotonic() > deadline:
                stop_registry(proc)
                raise RegistryStartError(
                    f"docker-registry on {listen} did not answer {url} within {START_TIMEOUT_S:.0f}s "
                    f"({last}); log {log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(0.05)  # polling interval of a condition wait with a deadline


def stop_registry(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; returns once the process is reaped. Idempotent."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
