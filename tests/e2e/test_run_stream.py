"""RunStream (issue 6) on the real 3-host dev cluster: one stream of good and bad requests, in two batches
(indexes count requests across them). The good ones run
on the agents; each bad one (an invalid spec, a name in use before or twice on the stream, a network that does
not exist, attach, an image that does not exist) gets its own error, ends neither the stream nor the others,
and leaves nothing behind (no etcd key, cgroup or state dir)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from berthctl.dev.cluster import ClusterInfo
from tests.conftest import RunBerthctl
from tests.e2e.test_spine import assert_nothing_left, by_name, cleanup, etcd_keys

__all__ = ["cleanup"]  # the fixture, used here


def _spec(name: str, image: str = "busybox", **fields: object) -> t.ContainerSpec:
    return t.ContainerSpec(name=name, image=image, command=["sleep", "1000"], **fields)  # type: ignore[arg-type]


def test_good_and_bad_requests_on_one_stream(
    cluster: ClusterInfo, berthctl: RunBerthctl, cleanup: Callable[[str], None]
) -> None:
    for name in ("rs-taken", "rs-a", "rs-b", "rs-c", "rs-twin"):
        cleanup(name)
    assert berthctl("run", "-d", "--name", "rs-taken", "busybox", "sleep", "1000").returncode == 0
    requests = [
        control_pb2.RunRequest(spec=_spec("rs-a")),
        control_pb2.RunRequest(spec=_spec("rs-bad", memory_bytes=1000)),
        control_pb2.RunRequest(spec=_spec("rs-taken")),
        control_pb2.RunRequest(spec=_spec("rs-b")),
        control_pb2.RunRequest(spec=_spec("rs-net", network="rs-nonet")),
        control_pb2.RunRequest(spec=_spec("rs-attach"), attach=True),
        control_pb2.RunRequest(spec=_spec("rs-ghost", image="nosuchimage")),
        control_pb2.RunRequest(spec=_spec("rs-c")),
        control_pb2.RunRequest(spec=_spec("rs-twin")),
        control_pb2.RunRequest(spec=_spec("rs-twin")),
    ]
    batches = [control_pb2.RunBatch(requests=requests[:4]), control_pb2.RunBatch(requests=requests[4:])]
    with grpc.insecure_channel(cluster.controller) as channel:
        messages = list(control_pb2_grpc.ControlStub(channel).RunStream(iter(batches), timeout=120))
    replies = [r for m in messages for r in m.events]
    assert sorted(r.index for r in replies) == list(range(len(requests)))  # one reply each, the stream not ended
    by_index = {r.index: r for r in replies}
    for i in (0, 3, 7):
        started = by_index[i].started
        assert by_index[i].WhichOneof("result") == "started"
        assert (started.spec.name, started.status.state) == (requests[i].spec.name, t.STATE_RUNNING)
        assert by_name(berthctl, started.spec.name)["state"] == "running"

    def error(i: int) -> tuple[grpc.StatusCode, str]:
        assert by_index[i].WhichOneof("result") == "error", by_index[i]
        code = next(c for c in grpc.StatusCode if c.value[0] == by_index[i].error.code)
        return code, by_index[i].error.message

    assert error(1) == (grpc.StatusCode.INVALID_ARGUMENT, "--memory must be at least 6m")
    code, message = error(2)
    assert code == grpc.StatusCode.ALREADY_EXISTS and message.startswith("name 'rs-taken' is in use")
    assert "berthctl rm rs-taken" in message
    code, message = error(4)
    assert code == grpc.StatusCode.NOT_FOUND and message.startswith("network 'rs-nonet' not found")
    code, message = error(5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("attach is not served on RunStream")
    code, message = error(6)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message.startswith("image not found: docker.io/library/nosuchimage:latest")
    # the twins: exactly one runs, the other is told its name is in use
    twins = sorted(by_index[i].WhichOneof("result") for i in (8, 9))
    assert twins == ["error", "started"]
    loser = 8 if by_index[8].WhichOneof("result") == "error" else 9
    assert error(loser)[0] == grpc.StatusCode.ALREADY_EXISTS
    assert by_name(berthctl, "rs-twin")["state"] == "running"
    assert "\n" not in "".join(r.error.message for r in replies)

    for name in ("rs-bad", "rs-net", "rs-attach", "rs-ghost"):
        assert_nothing_left(cluster, berthctl, name)
    names = [key.rsplit("/", 1)[1] for key in etcd_keys(cluster, "/berth/names/")]
    assert sorted(n for n in names if n.startswith("rs-")) == ["rs-a", "rs-b", "rs-c", "rs-taken", "rs-twin"]
