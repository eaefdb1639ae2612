"""Image verbs end to end on the shared dev cluster: berthctl -> controller -> agent's image store, with the
cluster's real registry and skopeo. Non-disruptive: every image and container made here is removed."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from berthctl.dev.cluster import ClusterInfo
from tests.conftest import RunBerthctl


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def images(berthctl: RunBerthctl, node: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(ok(berthctl("images", "--node", node, "-o", "json")))
    return found


def first_host(cluster: ClusterInfo) -> str:
    return cluster.hosts[0].name


def test_pull_images_tag_inspect_rmi(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    node = first_host(cluster)
    out = ok(berthctl("pull", "--node", node, "busybox"))
    assert f"Pulled docker.io/library/busybox:latest on {node}: digest sha256:" in out
    # not a terminal: plain lines, one per layer phase
    assert ": done" in out or ": exists" in out

    ok(berthctl("tag", "--node", node, "busybox", "e2e/tagged:1"))
    refs = {i["reference"] for i in images(berthctl, node)}
    assert {"docker.io/library/busybox:latest", "docker.io/e2e/tagged:1"} <= refs
    inspected = json.loads(ok(berthctl("image", "inspect", "--node", node, "e2e/tagged:1")))
    assert inspected["config"]["config"]["Cmd"] == ["sh"]

    removed = ok(berthctl("rmi", "--node", node, "e2e/tagged:1"))
    assert "Untagged: docker.io/e2e/tagged:1" in removed
    assert "docker.io/e2e/tagged:1" not in {i["reference"] for i in images(berthctl, node)}

    missing = berthctl("rmi", "--node", node, "e2e/never:1")
    assert missing.returncode != 0 and "no image e2e/never:1 on this host" in missing.stderr

    several = berthctl("tag", "busybox", "e2e/x:1")
    if len(cluster.hosts) > 1:
        assert several.returncode != 0 and "choose one with --node" in several.stderr


def test_commit_then_run_sees_the_committed_file(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    node = first_host(cluster)
    name = "e2e-commit-src"
    image = f"{cluster.registry}/e2e/committed:1"
    on_node = f"node.name=={node}"
    try:
        ok(berthctl("run", "--name", name, "--constraint", on_node, "busybox", "sh", "-c",
                    "echo committed-content > /committed.txt && rm /etc/group"))  # fmt: skip
        listed = json.loads(ok(berthctl("ps", "-a", "-o", "json")))
        assert next(c for c in listed if c["name"] == name)["node"] == node
        image_id = ok(berthctl("commit", name, image)).strip()
        assert image_id.startswith("sha256:")
        out = ok(berthctl("run", "--rm", "--pull", "never", "--constraint", on_node, image, "sh", "-c",
                          "cat /committed.txt; ls /etc/group 2>&1; ls /etc/passwd"))  # fmt: skip
        assert "committed-content" in out
        assert "No such file" in out  # the deletion is committed too (an OCI whiteout)
        assert "/etc/passwd" in out

        # push the committed image; skopeo reads it back with the same digest
        ok(berthctl("push", "--node", node, image))
        inspected = json.loads(ok(berthctl("image", "inspect", "--node", node, image)))
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{image}"],
                             capture_output=True, check=True).stdout  # fmt: skip
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == inspected["digest"]
        # the image is not on the other hosts: --pull never refuses there, --pull always fetches it
        if len(cluster.hosts) > 1:
            other = f"node.name=={cluster.hosts[1].name}"
            never = berthctl("run", "--rm", "--pull", "never", "--constraint", other, image, "true")
            assert never.returncode != 0 and "--pull never" in never.stderr
            out = ok(berthctl("run", "--rm", "--pull", "always", "--constraint", other, image, "cat",
                              "/committed.txt"))  # fmt: skip
            assert "committed-content" in out
    finally:
        berthctl("rm", "-f", name)
        for h in cluster.hosts:
            berthctl("rmi", "-f", "--node", h.name, image)


def test_save_load_import_and_pull_never(cluster: ClusterInfo, berthctl: RunBerthctl, tmp_path: Path) -> None:
    node = first_host(cluster)
    ok(berthctl("pull", "--node", node, "busybox"))
    archive = tmp_path / "bb.tar"
    ok(berthctl("save", "--node", node, "busybox", "-o", str(archive)))
    digest = json.loads(subprocess.run(["skopeo", "inspect", f"oci-archive:{archive}"], capture_output=True,
                                       check=True).stdout)["Digest"]  # fmt: skip
    loaded = ok(berthctl("load", "--node", node, "-i", str(archive), "--name", "e2e/loaded"))
    assert "Loaded image: docker.io/library/busybox:latest" in loaded
    assert digest in {i["digest"] for i in images(berthctl, node)}

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"imported rootfs\n"
        info = tarfile.TarInfo("imported.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tarball = tmp_path / "rootfs.tar.gz"
    tarball.write_bytes(gzip.compress(buf.getvalue()))
    try:
        image_id = ok(berthctl("import", "--node", node, str(tarball), "e2e/imported:1")).strip()
        assert image_id.startswith("sha256:")
        assert "docker.io/e2e/imported:1" in {i["reference"] for i in images(berthctl, node)}
        # pruning keeps every image that has a name
        ok(berthctl("image", "prune", "--node", node))
        assert "docker.io/e2e/imported:1" in {i["reference"] for i in images(berthctl, node)}
    finally:
        berthctl("rmi", "--node", node, "e2e/imported:1")



@pytest.mark.parametrize("verb", [["login", "reg.example:5000", "-u", "bob", "--password-stdin"]])
def test_login_keeps_credentials_private(verb: list[str], berthctl: RunBerthctl, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    out = berthctl(*verb, input="pa55word\n")
    assert out.returncode == 0, out.stderr
    assert "pa55word" not in out.stdout + out.stderr
    auth = tmp_path / "berth" / "auth.json"
    assert auth.stat().st_mode & 0o777 == 0o600
    assert "reg.example:5000" in json.loads(auth.read_text())["auths"]
    ok(berthctl("logout", "reg.example:5000"))
    assert json.loads(auth.read_text())["auths"] == {}


def test_pull_draws_progress_bars_in_a_terminal(cluster: ClusterInfo) -> None:
    import os
    import pty
    import sys

    main, child = pty.openpty()
    env = {**os.environ, "BERTH_CONTROLLER": cluster.controller}
    proc = subprocess.Popen([sys.executable, "-m", "berthctl", "pull", "--node", first_host(cluster), "busybox"],
                            stdout=child, stderr=child, env=env)  # fmt: skip
    os.close(child)
    output = b""
    try:
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            output += data
    finally:
        os.close(main)
        code = proc.wait(timeout=60)
    text = output.decode(errors="replace")
    assert code == 0, text
    assert "\x1b[2K" in text  # lines redrawn in place
    assert "[" + "=" * 30 + "]" in text  # a full bar per layer
    assert "Pulled docker.io/library/busybox:latest" in text
