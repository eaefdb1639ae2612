"""How fast berth pulls a ~200 MB multi-layer image from a registry on loopback into an empty store, unpacking
included, against `skopeo copy docker://... oci:DIR` (download only) of the same image in the same run.

The image is built here: LAYERS layers of incompressible (random) files, gzip-compressed, pushed with skopeo
to a docker-registry on a free 127.0.0.1 port. Each tool then pulls it RUNS times, alternating, into a fresh
empty directory; the medians are compared.

Prints one last line: RESULT {"berth_s": ..., "skopeo_s": ..., "ratio": berth/skopeo, ...}: medians of wall
time, and of CPU time (berth_cpu_s, skopeo_cpu_s, cpu_ratio), which a busy machine disturbs less.

    sudo .venv/bin/python bench/pull.py [--mb 200] [--layers 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.images.registry import RegistryConfig  # noqa: E402
from agent.images.store import ImageStore  # noqa: E402
from berthctl.dev.registry import start_registry, stop_registry  # noqa: E402
from berthctl.dev.seed import Entry, push_layout, tar_layer, write_image  # noqa: E402
from tests.support_registry import free_port  # noqa: E402


def build(layout: Path, mb: int, layers: int) -> int:
    """An OCI layout of `layers` layers, `mb` MB of random files in all; returns the compressed bytes."""
    per_layer = (mb << 20) // layers
    tars = []
    for i in range(layers):
        files = [Entry(f"data{i}/", "dir", mode=0o755)]
        chunk = 4 << 20
        for j in range(max(1, per_layer // chunk)):
            files.append(Entry(f"data{i}/f{j}", data=os.urandom(chunk)))
        tars.append(tar_layer(files))
    write_image(layout, "v1", tars, {"Cmd": ["sh"]})
    return sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())


def berth_pull(ref: str, root: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of a pull into the empty store `root`; CPU counts every thread of this process."""
    store = ImageStore(root, RegistryConfig())
    t0, c0 = time.perf_counter(), time.process_time()
    asyncio.run(store.pull(ref))
    return time.perf_counter() - t0, time.process_time() - c0


def skopeo_pull(ref: str, dest: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of skopeo copying the image into an OCI layout at `dest`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{dest}:v1"],
                   check=True)  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="berth-bench-pull-"))
    address = f"127.0.0.1:{free_port()}"
    proc = start_registry(work / "registry", address, work / "registry.log")
    try:
        size = build(work / "layout", args.mb, args.layers)
        push_layout(work / "layout", "v1", address, "bench/big")
        shutil.rmtree(work / "layout")
        ref = f"{address}/bench/big:v1"
        berth: list[tuple[float, float]] = []
        skopeo: list[tuple[float, float]] = []
        for i in range(args.runs):
            skopeo.append(skopeo_pull(ref, work / f"skopeo{i}"))
            shutil.rmtree(work / f"skopeo{i}")
            berth.append(berth_pull(ref, work / f"store{i}"))
            shutil.rmtree(work / f"store{i}")
            print(f"run {i + 1}: berth {berth[-1][0]:.2f} s ({berth[-1][1]:.2f} s CPU), "
                  f"skopeo {skopeo[-1][0]:.2f} s ({skopeo[-1][1]:.2f} s CPU)", flush=True)  # fmt: skip
        b, s = statistics.median(w for w, _ in berth), statistics.median(w for w, _ in skopeo)
        bc, sc = statistics.median(c for _, c in berth), statistics.median(c for _, c in skopeo)
        result = {"berth_s": round(b, 3), "skopeo_s": round(s, 3), "ratio": round(b / s, 3),
                  "berth_cpu_s": round(bc, 3), "skopeo_cpu_s": round(sc, 3), "cpu_ratio": round(bc / sc, 3),
                  "mb": round(size / 1e6, 1), "layers": args.layers, "runs": args.runs}  # fmt: skip
        print("RESULT " + json.dumps(result))
    finally:
        stop_registry(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
