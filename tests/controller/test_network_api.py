"""controller.network_api's translation of the user networks' errors into gRPC statuses (one line each, the
message kept), on top of the control API's own."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from controller import network_api
from controller.store import NotFound, StoreError, Unavailable
from controller.user_networks import AddressesExhausted, NetworkRequestError


class Aborted(Exception):
    pass


class Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> Any:
        raise Aborted(code, details)


@pytest.mark.parametrize(("exc", "code"), [
    (NetworkRequestError("network 'red' is in use by 1 container(s) or service(s) (web); remove them first"),
     grpc.StatusCode.FAILED_PRECONDITION),
    (NotFound("no such network: red"), grpc.StatusCode.NOT_FOUND),
    (Unavailable("etcd is unreachable: connection refused"), grpc.StatusCode.UNAVAILABLE),
    (AddressesExhausted("network 'red' has no free address left in 10.0.0.0/29"), grpc.StatusCode.ABORTED),
    (StoreError("networks kept changing while creating this one; try again"), grpc.StatusCode.ABORTED),
])
def test_errors_become_grpc_statuses(exc: StoreError, code: grpc.StatusCode) -> None:
    with pytest.raises(Aborted) as got:
        asyncio.run(network_api.abort(Context(), exc))  # type: ignore[arg-type]
    assert got.value.args == (code, str(exc))
