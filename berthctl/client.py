"""The CLI's connection to a controller, and the translation of gRPC failures into one-line messages.

Exceptions:

    CLIError           a message for the user and the exit code to leave with (Docker's: 125 for an
                       error of berth itself, 126 for a command that cannot be invoked, 127 for a
                       command not found)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from berth.api import control_pb2_grpc

DEFAULT_CONTROLLER = "127.0.0.1:7070"


class CLIError(Exception):
    def __init__(self, message: str, code: int = 125) -> None:
        super().__init__(message)
        self.code = code


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "berth" / "config.json"


def controller_address(flag: str | None) -> str:
    """--controller, else BERTH_CONTROLLER, else the config file (written by `berthctl dev up`)."""
    if flag:
        return flag
    env = os.environ.get("BERTH_CONTROLLER")
    if env:
        return env
    path = config_path()
    if path.exists():
        try:
            value = json.loads(path.read_text()).get("controller")
        except (OSError, ValueError, AttributeError) as exc:
            raise CLIError(f"cannot read {path}: {exc}; fix or delete it") from None
        if isinstance(value, str) and value:
            return value
    return DEFAULT_CONTROLLER


class Connection:
    """A lazily opened channel to a controller. Given several addresses (comma-separated), a call that cannot
    connect to one is tried on the next (issue 6: any controller serves the API)."""

    def __init__(self, address: str) -> None:
        self.addresses = [a.strip() for a in address.split(",") if a.strip()] or [DEFAULT_CONTROLLER]
        self.address = self.addresses[0]
        self._channel: grpc.Channel | None = None

    def _open(self, address: str) -> grpc.Channel:
        from berth import rpc

        if self._channel is None or address != self.address:
            if self._channel is not None:
                self._channel.close()
            self.address = address
            self._channel = rpc.sync_channel(address)
        return self._channel

    @property
    def control(self) -> control_pb2_grpc.ControlStub:
        from berth.api import control_pb2_grpc

        if len(self.addresses) == 1:
            return control_pb2_grpc.ControlStub(self._open(self.address))
        return _FailoverStub(self)  # type: ignore[return-value]

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def error(self, exc: grpc.RpcError) -> CLIError:
        """A one-line message for a failed call."""
        import grpc

        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
        if code == grpc.StatusCode.UNAVAILABLE and _is_connect_failure(details):
            return CLIError(
                f"cannot reach the controller at {self.address} ({_short(details)}); start one "
                "(berthctl dev up) or point --controller or BERTH_CONTROLLER at it"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CLIError(f"the controller at {self.address} did not answer in time: {details}")
        if code == grpc.StatusCode.FAILED_PRECONDITION and "executable file not found" in details:
            return CLIError(details, 127)
        if code == grpc.StatusCode.FAILED_PRECONDITION and "permission denied" in details:
            return CLIError(details, 126)
        return CLIError(details)


def _is_connect_failure(details: str) -> bool:
    lowered = details.lower()
    return any(s in lowered for s in ("failed to connect", "connection refused", "connect failed",
                                      "no route to host", "dns resolution", "unreachable"))


def _short(details: str) -> str:
    lowered = details.lower()
    for reason in ("connection refused", "no route to host", "timeout", "network is unreachable"):
        if reason in lowered:
            return reason
    return details.splitlines()[0][:120]


class _FailoverStub:
    """ControlStub's methods, each tried on the connection's addresses in turn while the controller there
    cannot be reached (the request never left, so trying again is safe)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __getattr__(self, method: str) -> Any:
        import grpc

        from berth.api import control_pb2_grpc

        conn = self._conn

        def call(*args: Any, **kwargs: Any) -> Any:
            start = conn.addresses.index(conn.address)
            last: grpc.RpcError | None = None
            for i in range(len(conn.addresses)):
                address = conn.addresses[(start + i) % len(conn.addresses)]
                fn = getattr(control_pb2_grpc.ControlStub(conn._open(address)), method)
                try:
                    result = fn(*args, **kwargs)
                    if isinstance(fn, grpc.UnaryStreamMultiCallable):
                        return _peeked(result)  # a stream fails to connect on its first message
                    return result
                except grpc.RpcError as exc:
                    if not _unreachable(exc):
                        raise
                    last = exc
            assert last is not None
            raise last

        return call


def _peeked(stream: Any) -> Any:
    import itertools

    try:
        first = next(stream)
    except StopIteration:
        return iter(())
    return itertools.chain([first], stream)


def _unreachable(exc: Exception) -> bool:
    import grpc

    if not isinstance(exc, grpc.Call) or exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return _is_connect_failure(exc.details() or "")
