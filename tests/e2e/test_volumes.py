"""Named volumes and bind mounts through the whole path, issue 3b: `volume create|ls|inspect|rm`, a
volume outlives the container's `rm` and is removed only by `volume rm` (refused while in use), a
container using an existing volume is placed on its host, and `-v /host:/dir:ro` and --tmpfs work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from berthctl.dev.cluster import ClusterInfo
from tests.conftest import RunBerthctl
from tests.e2e.test_spine import by_name, host_of


def volumes(berthctl: RunBerthctl) -> list[dict[str, Any]]:
    out = berthctl("volume", "ls", "-o", "json")
    assert out.returncode == 0, out.stderr
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


def test_named_volume_lifecycle(cluster: ClusterInfo, berthctl: RunBerthctl) -> None:
    try:
        out = berthctl("volume", "create", "pgdata")
        assert out.returncode == 125 and "say which one with --node HOST" in out.stderr  # 3 hosts
        out = berthctl("volume", "create", "--node", "host2", "--label", "app=db", "pgdata")
        assert (out.returncode, out.stdout) == (0, "pgdata\n"), out.stderr
        [vol] = [v for v in volumes(berthctl) if v["name"] == "pgdata"]
        assert vol["node"] == "host2" and vol["labels"] == {"app": "db"} and vol["used_by"] == []
        assert Path(vol["mountpoint"]).is_dir()
        assert Path(vol["mountpoint"]).is_relative_to(host_of(cluster, "host2").state_dir)

        # The container goes to the volume's host, writes, and is removed: the data stays.
        out = berthctl("run", "--name", "writer", "-v", "pgdata:/data", "busybox", "sh", "-c", "echo kept > /data/f")
        assert out.returncode == 0, out.stderr
        assert by_name(berthctl, "writer")["node"] == "host2"
        out = berthctl("volume", "rm", "pgdata")
        assert out.returncode == 1 and "volume pgdata is in use by container" in out.stderr
        assert berthctl("rm", "writer").returncode == 0
        assert (Path(vol["mountpoint"]) / "f").read_text() == "kept\n"
        out = berthctl("run", "--rm", "-v", "pgdata:/data:ro", "busybox", "sh", "-c",
                       "cat /data/f; echo x > /data/g 2>/dev/null || echo read-only")
        assert (out.returncode, out.stdout) == (0, "kept\nread-only\n"), out.stderr

        inspect = berthctl("volume", "inspect", "pgdata")
        assert inspect.returncode == 0 and json.loads(inspect.stdout)[0]["node"] == "host2"
        out = berthctl("volume", "rm", "pgdata")
        assert (out.returncode, out.stdout) == (0, "pgdata\n"), out.stderr
        assert not Path(vol["mountpoint"]).exists()
        assert "pgdata" not in [v["name"] for v in volumes(berthctl)]
        out = berthctl("volume", "inspect", "pgdata")
        assert out.returncode == 125 and "no such volume: pgdata" in out.stderr
    finally:
        berthctl("rm", "-f", "writer")
        berthctl("volume", "rm", "pgdata")


def test_volume_made_on_first_use_and_bind_and_tmpfs(
    cluster: ClusterInfo, berthctl: RunBerthctl, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in").write_text("host file\n")
    try:
        out = berthctl(
            "run", "--name", "mixed", "-v", "auto1:/auto", "-v", f"{shared}:/in:ro", "-v", f"{shared}:/out",
            "--tmpfs", "/scratch:size=1m", "busybox", "sh", "-c",
            "cat /in/in; echo back > /out/written; echo y > /in/z 2>/dev/null || echo in-ro;"
            " grep ' /scratch ' /proc/mounts | cut -d' ' -f3; echo a > /auto/a",
        )
        assert (out.returncode, out.stdout) == (0, "host file\nin-ro\ntmpfs\n"), out.stderr
        assert (shared / "written").read_text() == "back\n"
        node = by_name(berthctl, "mixed")["node"]
        [vol] = [v for v in volumes(berthctl) if v["name"] == "auto1"]
        assert vol["node"] == node  # made where the container ran
        assert berthctl("rm", "mixed").returncode == 0
        assert berthctl("volume", "rm", "auto1").returncode == 0
    finally:
        berthctl("rm", "-f", "mixed")
        berthctl("volume", "rm", "auto1")
