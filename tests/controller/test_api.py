"""The control API against a real controller process and a real etcd, without hosts: validation,
name uniqueness, pending placement with its reason, metrics, and the CLI's error messages."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest

from berth.api import control_pb2, control_pb2_grpc
from berth.api import types_pb2 as t
from tests.conftest import run_berthctl
from tests.controller.conftest import HOST, Controller, etcd_keys


@pytest.fixture
def control(controller: Controller) -> control_pb2_grpc.ControlStub:
    with grpc.insecure_channel(controller.address) as channel:
        yield control_pb2_grpc.ControlStub(channel)


def run_detached(control: control_pb2_grpc.ControlStub, **spec: object) -> t.Container:
    events = list(control.Run(control_pb2.RunRequest(spec=t.ContainerSpec(**spec)), timeout=10))  # type: ignore[arg-type]
    assert len(events) == 1
    return events[0].started


def test_no_hosts_leaves_it_pending_with_the_reason(
    control: control_pb2_grpc.ControlStub, controller: Controller
) -> None:
    c = run_detached(control, name="lonely", image="busybox")
    assert c.status.state == t.STATE_PENDING
    assert c.pending_reason.startswith("no hosts")
    listed = control.List(control_pb2.ListRequest(all=True)).containers
    assert [x.spec.name for x in listed] == ["lonely"]
    assert "/berth/names/lonely" in etcd_keys(controller.etcd_url)
    control.Remove(control_pb2.RemoveRequest(ref="lonely"))
    assert etcd_keys(controller.etcd_url, "/berth/containers/") == []
    assert etcd_keys(controller.etcd_url, "/berth/names/") == []


def test_name_in_use(control: control_pb2_grpc.ControlStub, controller: Controller) -> None:
    first = run_detached(control, name="web", image="busybox")
    try:
        with pytest.raises(grpc.RpcError) as err:
            run_detached(control, name="web", image="busybox")
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert err.value.details() == (
            f"name 'web' is in use by container {first.id[:12]}: remove it (berthctl rm web) "
            "or choose another name with --name"
        )
        assert len(etcd_keys(controller.etcd_url, "/berth/containers/")) == 1
    finally:
        control.Remove(control_pb2.RemoveRequest(ref=first.id[:8]))
    for prefix in ("/berth/containers/", "/berth/names/", "/berth/status/", "/berth/assignments/"):
        assert etcd_keys(controller.etcd_url, prefix) == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"image": ""}, "no image given"),
        ({"image": "busybox", "name": "bad name"}, "invalid name 'bad name'"),
        ({"image": "busybox", "memory_bytes": 1000}, "--memory must be at least 6m"),
        ({"image": "busybox", "env": ["NOEQUALS"]}, "invalid environment variable 'NOEQUALS'"),
    ],
)
def test_invalid_specs_are_refused_and_leave_no_key(
    control: control_pb2_grpc.ControlStub, controller: Controller, spec: dict[str, object], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        run_detached(control, **spec)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    assert etcd_keys(controller.etcd_url, "/berth/containers/") == []


def test_unknown_container(control: control_pb2_grpc.ControlStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        control.Inspect(control_pb2.ContainerRef(ref="nosuch"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no such container: nosuch"


def test_metrics_pass_promtool(controller: Controller) -> None:
    body = urllib.request.urlopen(f"http://{controller.metrics}/metrics", timeout=5).read()
    for name in (b"berth_containers", b"berth_nodes", b"berth_scheduling_latency_seconds_bucket"):
        assert name in body
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_cli_errors(controller: Controller) -> None:
    out = run_berthctl(controller.address, "run", "--memory", "lots", "busybox")
    assert out.returncode == 125
    assert out.stderr == (
        "berthctl: invalid --memory 'lots': write a number with an optional unit b, k, m or g (for example 256m)\n"
    )
    assert etcd_keys(controller.etcd_url, "/berth/containers/") == []

    out = run_berthctl(controller.address, "rm", "nosuch")
    assert (out.returncode, out.stderr) == (1, "berthctl: no such container: nosuch\n")

    out = run_berthctl(f"{HOST}:1", "ps")
    assert out.returncode == 125
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"berthctl: cannot reach the controller at {HOST}:1 (connection refused)")
    assert "BERTH_CONTROLLER" in out.stderr


def test_cli_config_file(controller: Controller, tmp_path: Path) -> None:
    (tmp_path / "berth").mkdir()
    (tmp_path / "berth" / "config.json").write_text(f'{{"controller": "{controller.address}"}}')
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "BERTH_CONTROLLER"}
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "berthctl", "node", "ls", "-o", "json"],
                         env=env, capture_output=True, text=True, check=False, timeout=30)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


def test_cli_run_on_a_cluster_without_hosts_says_it_is_pending(controller: Controller) -> None:
    out = run_berthctl(controller.address, "run", "--name", "nowhere", "busybox", "true")
    try:
        assert out.returncode == 125
        assert out.stderr == (
            "berthctl: cannot attach: container nowhere is pending: no hosts: start an agent (berth-agent) or a "
            "dev cluster (berthctl dev up); it starts when a host fits (berthctl ps -a), or remove it with "
            "berthctl rm nowhere\n"
        )
        detached = run_berthctl(controller.address, "run", "-d", "--name", "nowhere2", "busybox", "true")
        assert detached.returncode == 0
        assert len(detached.stdout.strip()) == 64
        assert detached.stderr.startswith("berthctl: warning: container nowhere2 is pending: no hosts")
    finally:
        run_berthctl(controller.address, "rm", "nowhere", "nowhere2")
    assert etcd_keys(controller.etcd_url, "/berth/containers/") == []


@pytest.mark.parametrize(("spec", "message"), [
    ({"constraints": ["disk==ssd"]}, "bad constraint 'disk==ssd': use node.labels.KEY==VALUE"),
    ({"placement_strategy": "random"}, "invalid placement strategy 'random': spread or binpack"),
    ({"restart_policy": "sometimes"}, "invalid restart policy 'sometimes'"),
])
def test_bad_placement_fields_are_refused_and_leave_nothing(
    control: control_pb2_grpc.ControlStub, controller: Controller, spec: dict[str, object], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        run_detached(control, name="bad", image="busybox", **spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")
    assert etcd_keys(controller.etcd_url, "/berth/containers/") == []
    assert etcd_keys(controller.etcd_url, "/berth/names/") == []
