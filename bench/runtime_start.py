"""The agent runtime's start cost against runc: create + start + wait of `true` in a busybox root filesystem
through LinuxExecutor (and the host's berth-supervisor), against `runc run` of an OCI bundle whose rootfs is
the same unpacked layer, alternating, N runs each, in one run.

The layer is a busybox image's: /bin/busybox (busybox-static) with a symlink per applet, /etc/passwd, /etc/group,
as tests/agent/conftest.py builds it. Berth's remove after each run is not timed (runc run deletes its
container as part of the run it is timed for, so that favours berth slightly; see docs/benchmarks.md).

Prints one last line: RESULT {"runs", "berth_ms", "runc_ms", "ratio"} (medians; ratio = berth / runc).

    sudo .venv/bin/python bench/runtime_start.py [--runs 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.executor import ContainerConfig, ProcessState  # noqa: E402
from agent.runtime.linux import LinuxExecutor  # noqa: E402

BUSYBOX = Path("/bin/busybox")


def make_layer(root: Path) -> None:
    """An unpacked busybox image layer."""
    for d in ("bin", "etc", "proc", "sys", "dev", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(mode=0o1777)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True).stdout.split()
    for name in applets:
        if name != "busybox":
            (root / "bin" / name).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")


def remove_cgroup_parent(parent: str) -> None:
    """The supervisor removes each container's cgroup but never the parent: the bench made it, so it goes."""
    for d in Path("/sys/fs/cgroup").glob(f"*/{parent}"):
        d.rmdir()
    if Path(f"/sys/fs/cgroup/{parent}/cgroup.procs").exists():
        Path(f"/sys/fs/cgroup/{parent}").rmdir()


def make_bundle(bundle: Path, layer: Path) -> None:
    """An OCI bundle for `true` on the layer (read-only root: runc writes nothing into it)."""
    bundle.mkdir()
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"] = {"path": str(layer), "readonly": True}
    spec["process"]["args"] = ["true"]
    spec["process"]["terminal"] = False
    (bundle / "config.json").write_text(json.dumps(spec))


def runc_once(bundle: Path, state_root: Path) -> float:
    cid = f"bench-{uuid.uuid4().hex[:12]}"
    t0 = time.perf_counter()
    subprocess.run(["runc", "--root", str(state_root), "run", "--bundle", str(bundle), cid],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


async def berth_once(ex: LinuxExecutor, layer: Path, n: int) -> float:
    cid = f"bench{n}"
    cfg = ContainerConfig(id=cid, name=cid, hostname=cid, layers=(layer,), args=("true",))
    t0 = time.perf_counter()
    await ex.create(cfg)
    await ex.start(cid)
    info = await ex.wait(cid)
    elapsed = time.perf_counter() - t0
    if info.state is not ProcessState.EXITED or info.exit_code != 0:
        raise SystemExit(f"berth run {n}: {info}")
    await ex.remove(cid)
    return elapsed


async def main_async(runs: int, work: Path) -> dict[str, float]:
    layer = work / "layer"
    make_layer(layer)
    make_bundle(work / "bundle", layer)
    runc_root = work / "runc"
    parent = f"berth-bench-{uuid.uuid4().hex[:8]}"
    ex = LinuxExecutor(work / "state", parent)
    berth: list[float] = []
    runc: list[float] = []
    try:
        await berth_once(ex, layer, -1)  # start the supervisor; warm caches for both
        await asyncio.to_thread(runc_once, work / "bundle", runc_root)
        for i in range(runs):
            berth.append(await berth_once(ex, layer, i))
            runc.append(await asyncio.to_thread(runc_once, work / "bundle", runc_root))
    finally:
        await ex.close()
        pid_file = work / "state" / "supervisor.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), 15)
        remove_cgroup_parent(parent)
    b, r = statistics.median(berth) * 1000, statistics.median(runc) * 1000
    return {"runs": runs, "berth_ms": round(b, 2), "runc_ms": round(r, 2), "ratio": round(b / r, 3),
            "berth_p90_ms": round(sorted(berth)[int(0.9 * runs)] * 1000, 2),
            "runc_p90_ms": round(sorted(runc)[int(0.9 * runs)] * 1000, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("runtime_start: run as root (namespaces, cgroups, mounts)")
    if shutil.which("runc") is None:
        raise SystemExit("runtime_start: runc is not installed")
    work = Path(tempfile.mkdtemp(prefix="berth-bench-start-"))
    try:
        result = asyncio.run(main_async(args.runs, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"berth: create+start+wait of true {result['berth_ms']} ms; runc run {result['runc_ms']} ms")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
