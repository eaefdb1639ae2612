"""agent.images against a real docker-registry seeded with busybox (tests/support_registry.py), and the layer
unpacker against real overlayfs. Runs as root."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.images import (
    DigestMismatch,
    ImageNotFound,
    InvalidLayer,
    InvalidReference,
    RegistryUnreachable,
    UnsafeLayer,
    UnsupportedImage,
)
from agent.images.reference import Reference, normalise, parse
from agent.images.registry import RegistryConfig, endpoints, host_platform
from agent.images.store import Image, ImageStore
from agent.images.unpack import unpack_layer
from berthctl.dev.seed import (
    Entry,
    build_busybox_layout,
    gzip_layer,
    push_layout,
    tar_layer,
    write_image,
    write_index,
)
from tests.support_registry import (
    FlakyProxy,
    RegistryHandle,
    RequestLog,
    busybox_base,
    free_port,
    running_registry,
    running_token_registry,
)

NOT_FOUND = "image not found: {} (the registry has no such repository or tag; check the name, or push the image first)"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryHandle]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def mirrored(registry: RegistryHandle) -> RegistryConfig:
    """docker.io served by the test registry, as the dev cluster's agents see it."""
    return RegistryConfig(mirrors={"docker.io": registry.url})


def tree(root: Path) -> set[str]:
    """Every path under root (relative), to show that nothing else appeared."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- references --------------------------------------------------------------------------------------------

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("user/app:1", "docker.io/user/app:1"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/user/app", "docker.io/user/app:latest"),
        ("localhost/x", "localhost/x:latest"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        (f"host:5000/x/y@{DIGEST}", f"host:5000/x/y@{DIGEST}"),
        (f"busybox:1@{DIGEST}", f"docker.io/library/busybox:1@{DIGEST}"),
        ("ghcr.io/org/team/tool:v1.2-rc_3", "ghcr.io/org/team/tool:v1.2-rc_3"),
        ("10.77.0.1:5000/a.b/c__d-e", "10.77.0.1:5000/a.b/c__d-e:latest"),
        ("Host/app", "Host/app:latest"),
    ],
)
def test_reference_normalisation(text: str, expected: str) -> None:
    assert normalise(text) == expected
    assert normalise(expected) == expected


def test_reference_fields() -> None:
    assert parse("host:5000/x/y@" + DIGEST) == Reference("host:5000", "x/y", None, DIGEST)
    assert parse("user/app:1") == Reference("docker.io", "user/app", "1", None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("Busybox", "repository name must be lowercase"),
        ("busybox:", "invalid tag ''"),
        ("busybox:-x", "invalid tag '-x'"),
        ("busybox@sha256:abc", "invalid digest"),
        ("busybox@sha256:" + "AB" * 32, "64 lower-case hex"),
        ("a//b", "invalid repository name component ''"),
        ("bad_-name", "invalid repository name component 'bad_-name'"),
        ("busy box", "whitespace"),
        ("host:5000/", "invalid repository name component ''"),
        ("x" * 300, "longer than 255"),
    ],
)
def test_reference_errors(text: str, reason: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        parse(text)
    assert str(caught.value).startswith(f"invalid reference {text!r}: ")
    assert reason in str(caught.value)


def test_endpoints() -> None:
    config = RegistryConfig(
        mirrors={"docker.io": "http://10.77.0.1:5000/", "quay.io": "10.77.0.2:5000"},
        insecure={"10.77.0.1:5000", "10.77.0.2:5000", "myreg:5000"},
    )
    assert [e.base_url for e in endpoints(config, "docker.io")] == [
        "http://10.77.0.1:5000",
        "https://registry-1.docker.io",
    ]
    assert [e.base_url for e in endpoints(config, "quay.io")] == ["http://10.77.0.2:5000", "https://quay.io"]
    assert [e.base_url for e in endpoints(config, "myreg:5000")] == ["http://myreg:5000"]
    assert [e.base_url for e in endpoints(config, "ghcr.io")] == ["https://ghcr.io"]
    assert [e.base_url for e in endpoints(config, "localhost:5000")] == ["http://localhost:5000"]
    assert [e.base_url for e in endpoints(config, "127.0.0.1:5000")] == ["http://127.0.0.1:5000"]
    assert endpoints(config, "docker.io")[0].host == "10.77.0.1:5000"


# -- pulling -----------------------------------------------------------------------------------------------


def test_pull_busybox_through_mirror(registry: RegistryHandle, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", mirrored(registry))
    image = asyncio.run(store.pull("busybox"))

    assert image.reference == "docker.io/library/busybox:latest"
    assert image.digest.startswith("sha256:")
    assert image.config.cmd == ("sh",)
    assert image.config.entrypoint == ()
    assert image.config.env == ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    assert len(image.layers) == 1
    base = image.layers[0]
    assert base.parent == tmp_path / "store" / "l"  # a short link (overlay options fit in a page)
    assert base.resolve().parent == tmp_path / "store" / "layers" / "sha256"
    busybox = base / "bin" / "busybox"
    assert stat.S_ISREG(busybox.lstat().st_mode) and busybox.stat().st_mode & 0o111
    assert busybox.read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(base / "bin" / "sh") == "busybox"
    assert stat.S_IMODE((base / "tmp").stat().st_mode) == 0o1777
    assert (base / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    assert int((base / "bin" / "busybox").stat().st_mtime) == 946684800

    # The layer is a working root: its sh, found through the applet symlinks, runs in a chroot of it.
    out = subprocess.run(
        ["/usr/sbin/chroot", str(base), "/bin/sh", "-c", "echo hello from $(whoami) in $(pwd); ls /bin/ls"],
        capture_output=True, text=True, check=True, env={"PATH": "/bin"},
    )  # fmt: skip
    assert out.stdout == "hello from root in /\n/bin/ls\n"

    assert store.get("busybox") == image
    assert store.get(f"docker.io/library/busybox@{image.digest}") is not None
    assert store.get("busybox:other") is None
    # Compressed blobs are kept for later save/push.
    assert len(list((tmp_path / "store" / "blobs" / "sha256").iterdir())) == 3  # manifest, config, layer


def test_second_pull_does_no_network_work(registry: RegistryHandle, tmp_path: Path) -> None:
    requests = RequestLog()
    store = ImageStore(tmp_path / "store", mirrored(registry), event_hooks=requests.hooks())
    first = asyncio.run(store.pull("busybox"))
    assert len(requests.blobs()) == 2  # config + layer

    requests.clear()
    assert asyncio.run(store.ensure("busybox")) == first
    assert requests.paths == []  # ensure: local, no network at all

    again = asyncio.run(store.pull("busybox"))
    assert again == first
    assert requests.blobs() == []  # pull re-resolves the tag, downloads nothing
    assert requests.paths == ["/v2/library/busybox/manifests/latest"]

    # A fresh store object over the same directory finds the image on disk, and drops what a crashed pull
    # left behind.
    (tmp_path / "store" / "layers" / "sha256" / ".unpack-crashed").mkdir()
    (tmp_path / "store" / "blobs" / "sha256" / ".download-crashed").write_bytes(b"partial")
    requests.clear()
    reopened = ImageStore(tmp_path / "store", mirrored(registry), event_hooks=requests.hooks())
    assert asyncio.run(reopened.ensure("docker.io/library/busybox:latest")) == first
    assert requests.paths == []
    assert not list((tmp_path / "store" / "layers" / "sha256").glob(".*"))
    assert not list((tmp_path / "store" / "blobs" / "sha256").glob(".*"))


def test_shared_base_layer_is_downloaded_once(registry: RegistryHandle, tmp_path: Path) -> None:
    app_layer = [Entry("app/", "dir", mode=0o755), Entry("app/hello.txt", data=b"hello from app\n")]
    registry.push("team/app", "1", [busybox_base(), app_layer], {"Cmd": ["cat", "/app/hello.txt"]})

    requests = RequestLog()
    store = ImageStore(tmp_path / "store", RegistryConfig(), event_hooks=requests.hooks())
    busybox = asyncio.run(store.pull(f"{registry.address}/library/busybox"))
    had = set(os.listdir(tmp_path / "store" / "blobs" / "sha256"))  # busybox's manifest, config, layer
    requests.clear()
    app = asyncio.run(store.pull(f"{registry.address}/team/app:1"))

    assert app.layers[0] == busybox.layers[0]  # one directory, shared
    assert (app.layers[1] / "app" / "hello.txt").read_text() == "hello from app\n"
    assert app.config.cmd == ("cat", "/app/hello.txt")
    blob_requests = requests.blobs()
    assert len(blob_requests) == 2, blob_requests  # the app's config and its own layer, not the base
    assert not any(p.rsplit(":", 1)[1] in had for p in blob_requests)
    assert len(list((tmp_path / "store" / "layers" / "sha256").iterdir())) == 2


def test_concurrent_pulls_do_the_work_once(registry: RegistryHandle, tmp_path: Path) -> None:
    registry.push("team/twin", "1", [busybox_base(), [Entry("twin.txt", data=b"twin\n")]])
    requests = RequestLog()
    store = ImageStore(tmp_path / "store", RegistryConfig(), event_hooks=requests.hooks())

    async def many() -> list[object]:
        return list(
            await asyncio.gather(
                store.pull(f"{registry.address}/library/busybox"),
                store.pull(f"{registry.address}/library/busybox:latest"),
                store.ensure(f"{registry.address}/library/busybox"),
                store.pull(f"{registry.address}/team/twin:1"),
                store.pull(f"{registry.address}/team/twin:1"),
            )
        )

    images = asyncio.run(many())
    assert len({id(i) for i in images[:3]}) == 1  # one shared pull
    blobs = requests.blobs()
    assert len(blobs) == len(set(blobs)), blobs  # no blob fetched twice
    # busybox: config + base layer; twin: config + its own layer (the base is shared)
    assert len(blobs) == 4


def test_missing_image(registry: RegistryHandle, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", RegistryConfig())
    ref = f"{registry.address}/nosuch"
    with pytest.raises(ImageNotFound) as caught:
        asyncio.run(store.pull(ref))
    assert str(caught.value) == NOT_FOUND.format(f"{registry.address}/nosuch:latest")

    with pytest.raises(ImageNotFound) as caught:
        asyncio.run(store.pull(f"{registry.address}/library/busybox:nosuchtag"))
    assert str(caught.value) == NOT_FOUND.format(f"{registry.address}/library/busybox:nosuchtag")

    # Through the docker.io mirror: the mirror's "not found" is reported; docker.io itself is unreachable
    # here (no internet), which is mentioned after it.
    store = ImageStore(tmp_path / "store", mirrored(registry))
    with pytest.raises(ImageNotFound) as caught:
        asyncio.run(store.ensure("nosuch"))
    assert str(caught.value).startswith(NOT_FOUND.format("docker.io/library/nosuch:latest"))
    assert tree(tmp_path / "store" / "layers") == {"sha256"}
    assert tree(tmp_path / "store" / "refs") == set()


def test_unreachable_registry(tmp_path: Path) -> None:
    port = free_port()
    store = ImageStore(tmp_path / "store", RegistryConfig())
    with pytest.raises(RegistryUnreachable) as caught:
        asyncio.run(store.pull(f"127.0.0.1:{port}/x/y:1"))
    assert str(caught.value).startswith(f"cannot reach registry 127.0.0.1:{port}: ")
    assert str(caught.value) == f"cannot reach registry 127.0.0.1:{port}: connection refused"

    # A dead mirror, and docker.io unreachable too: both are named.
    store = ImageStore(tmp_path / "store", RegistryConfig(mirrors={"docker.io": f"http://127.0.0.1:{port}"}))
    with pytest.raises(RegistryUnreachable) as caught:
        asyncio.run(store.pull("busybox"))
    assert str(caught.value).startswith(f"cannot reach registry 127.0.0.1:{port}: ")
    assert "registry-1.docker.io" in str(caught.value)


def test_corrupt_blob_is_refused_and_leaves_nothing(registry: RegistryHandle, tmp_path: Path) -> None:
    layout = registry.push("team/corrupt", "1", [[Entry("data.bin", data=os.urandom(200_000))]])
    manifest_digest = _tag_digest(layout, "1")
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest.split(":")[1]).read_bytes())
    layer_digest = manifest["layers"][0]["digest"]
    stored = registry.blob_data_path(layer_digest)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    stored.write_bytes(bytes(data))

    store = ImageStore(tmp_path / "store", RegistryConfig())
    with pytest.raises(DigestMismatch) as caught:
        asyncio.run(store.pull(f"{registry.address}/team/corrupt:1"))
    assert layer_digest in str(caught.value)
    assert "does not match its digest" in str(caught.value)
    assert tree(tmp_path / "store" / "layers") == {"sha256"}
    assert tree(tmp_path / "store" / "refs") == set()
    blobs = tree(tmp_path / "store" / "blobs" / "sha256")
    assert layer_digest.split(":")[1] not in blobs
    assert not any(name.startswith(".") for name in blobs)


def test_cut_download_is_retried(registry: RegistryHandle, tmp_path: Path) -> None:
    payload = os.urandom(400_000)  # incompressible: the cut falls inside the layer's body
    layout = registry.push("team/flaky", "1", [[Entry("payload.bin", data=payload)]])
    manifest = json.loads((layout / "blobs" / "sha256" / _tag_digest(layout, "1").split(":")[1]).read_bytes())
    marker = f"/blobs/{manifest['layers'][0]['digest']}".encode()
    delays: list[float] = []

    async def no_wait(seconds: float) -> None:
        delays.append(seconds)

    async def pull_through_proxy(cuts: int, store_dir: Path) -> Image:
        proxy = FlakyProxy(registry.address, marker, cut_after=100_000, times=cuts)
        address = await proxy.start()
        try:
            store = ImageStore(store_dir, RegistryConfig(), download_attempts=3, sleep=no_wait)
            return await store.pull(f"{address}/team/flaky:1")
        finally:
            await proxy.close()

    image = asyncio.run(pull_through_proxy(2, tmp_path / "a"))
    assert (image.layers[0] / "payload.bin").read_bytes() == payload
    assert delays == [0.5, 1.0]

    delays.clear()
    with pytest.raises(RegistryUnreachable) as caught:
        asyncio.run(pull_through_proxy(3, tmp_path / "b"))
    assert "while downloading" in str(caught.value)
    assert delays == [0.5, 1.0]
    assert tree(tmp_path / "b" / "layers") == {"sha256"}
    assert not any(name.startswith(".") for name in tree(tmp_path / "b" / "blobs" / "sha256"))


def _tag_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry["annotations"]["org.opencontainers.image.ref.name"] == tag:
            return str(entry["digest"])
    raise AssertionError(f"no tag {tag} in {layout}")


def test_multi_platform_index_picks_this_host(registry: RegistryHandle, tmp_path: Path) -> None:
    layout = registry.work / "multi"
    here = host_platform()
    other = "s390x" if here.architecture != "s390x" else "amd64"
    native = write_image(layout, "native", [tar_layer([Entry("arch", data=b"native\n")])], {}, here.architecture)
    foreign = write_image(layout, "foreign", [tar_layer([Entry("arch", data=b"foreign\n")])], {}, other)
    index = write_index(
        layout,
        "multi",
        [
            (foreign, {"os": "linux", "architecture": other}),
            (native, {"os": "linux", "architecture": here.architecture}),
        ],
    )
    only_other = write_index(layout, "other", [(foreign, {"os": "linux", "architecture": other})])
    push_layout(layout, "multi", registry.address, "team/multi", all_platforms=True)
    push_layout(layout, "other", registry.address, "team/multi", all_platforms=True)

    store = ImageStore(tmp_path / "store", RegistryConfig())
    image = asyncio.run(store.pull(f"{registry.address}/team/multi:multi"))
    assert image.digest == index  # the reference's digest is the index's, as in Docker's RepoDigests
    assert (image.layers[0] / "arch").read_text() == "native\n"
    assert store.get(f"{registry.address}/team/multi@{index}") is not None

    # The same as a Docker manifest list of Docker schema 2 manifests (skopeo converts).
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--all", "--format", "v2s2", "--dest-tls-verify=false",
         f"oci:{layout}:multi", f"docker://{registry.address}/team/multi-docker:multi"],
        check=True, capture_output=True,
    )  # fmt: skip
    docker = asyncio.run(store.pull(f"{registry.address}/team/multi-docker:multi"))
    assert docker.digest != index
    assert (docker.layers[0] / "arch").read_text() == "native\n"
    media_types = {
        json.loads(blob.read_bytes()).get("mediaType")
        for blob in (tmp_path / "store" / "blobs" / "sha256").iterdir()
        if blob.stat().st_size < 4096 and blob.read_bytes().startswith(b"{")
    }
    assert "application/vnd.docker.distribution.manifest.v2+json" in media_types

    with pytest.raises(UnsupportedImage) as caught:
        asyncio.run(store.pull(f"{registry.address}/team/multi:other"))
    assert f"has no image for this host's platform {here}" in str(caught.value)
    assert f"linux/{other}" in str(caught.value)
    assert only_other.startswith("sha256:")


# -- unpacking -----------------------------------------------------------------------------------------------


def _unpack(tmp: Path, name: str, entries: list[Entry], *, compress: bool = True) -> Path:
    tar = tar_layer(entries)
    blob = tmp / f"{name}.blob"
    blob.write_bytes(gzip_layer(tar) if compress else tar)
    (tmp / "layers").mkdir(exist_ok=True)
    dest = tmp / "layers" / name
    unpack_layer(blob, dest)
    return dest


def test_whiteouts_become_overlay_whiteouts(registry: RegistryHandle, tmp_path: Path) -> None:
    lower = [
        Entry("d/", "dir", mode=0o755),
        Entry("d/a", data=b"a\n"),
        Entry("d/b", data=b"b\n"),
        Entry("f", data=b"file\n"),
        Entry("keep", data=b"keep\n"),
    ]
    upper = [
        Entry(".wh.f", data=b""),
        Entry("d/", "dir", mode=0o755),
        Entry("d/.wh..wh..opq", data=b""),
        Entry("d/c", data=b"c\n"),
    ]
    registry.push("team/whiteout", "1", [lower, upper])
    store = ImageStore(tmp_path / "store", RegistryConfig())
    image = asyncio.run(store.pull(f"{registry.address}/team/whiteout:1"))
    top = image.layers[1]

    whiteout = (top / "f").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == os.makedev(0, 0)
    assert not (top / ".wh.f").exists()
    assert os.getxattr(top / "d", "trusted.overlay.opaque") == b"y"
    assert not (top / "d" / ".wh..wh..opq").exists()

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lowerdir = ":".join(str(p) for p in reversed(image.layers))  # overlayfs: topmost first
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}", str(mnt)], check=True)
    try:
        assert not (mnt / "f").exists()
        assert sorted(os.listdir(mnt / "d")) == ["c"]
        assert (mnt / "keep").read_text() == "keep\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_hostile_paths_stay_inside_the_layer(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret").write_text("untouched\n")
    before = tree(tmp_path)
    # The layer is unpacked in tmp_path/layers/.unpack-*: "../../victim" from there is tmp_path/victim.
    entries = [
        Entry("/abs.txt", data=b"absolute\n"),
        Entry("rel", "symlink", target="../../victim"),
        Entry("rel/written", data=b"through a relative symlink\n"),
        Entry("absl", "symlink", target=str(victim)),
        Entry("absl/written", data=b"through an absolute symlink\n"),
        Entry("absl/secret", data=b"overwritten?\n"),
        Entry("host-etc", "symlink", target="/etc"),
        Entry("host-etc/berth-test-x", data=b"x\n"),
    ]
    layer = _unpack(tmp_path, "hostile", entries)

    assert (layer / "abs.txt").read_text() == "absolute\n"
    # Symlinks are kept verbatim, and what was written "through" them landed inside the layer, as in a chroot.
    assert os.readlink(layer / "rel") == "../../victim"
    assert (layer / "victim" / "written").read_text() == "through a relative symlink\n"
    inside = layer / str(victim).lstrip("/")
    assert (inside / "written").read_text() == "through an absolute symlink\n"
    assert (inside / "secret").read_text() == "overwritten?\n"
    assert (layer / "etc" / "berth-test-x").read_text() == "x\n"  # /etc of the layer, not of the host
    assert os.readlink(layer / "host-etc") == "/etc"
    assert not Path("/etc/berth-test-x").exists()
    assert (victim / "secret").read_text() == "untouched\n"
    assert tree(tmp_path) - before == {
        str(p.relative_to(tmp_path)) for p in [tmp_path / "hostile.blob", tmp_path / "layers", *layer.rglob("*"), layer]
    }


def test_escaping_entries_refuse_the_layer(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret").write_text("untouched\n")
    cases = {
        "dotdot": [Entry("ok", data=b"ok\n"), Entry("../../etc/x", data=b"x\n")],
        "dotdot-inside": [Entry("a/", "dir", mode=0o755), Entry("a/../../victim/y", data=b"y\n")],
        "hardlink-out": [Entry("h", "hardlink", target="../../victim/secret")],
        "whiteout-dotdot": [Entry("a/", "dir", mode=0o755), Entry("a/.wh...", data=b"")],
        "whiteout-empty": [Entry("a/", "dir", mode=0o755), Entry("a/.wh.", data=b"")],
        "whiteout-dot": [Entry("a/", "dir", mode=0o755), Entry("a/.wh..", data=b"")],
    }
    for name, entries in cases.items():
        before = tree(tmp_path)
        with pytest.raises(UnsafeLayer) as caught:
            _unpack(tmp_path, name, entries)
        assert "outside the layer root" in str(caught.value) or "whites out" in str(caught.value)
        assert not (tmp_path / "layers" / name).exists()
        assert tree(tmp_path) - before <= {f"{name}.blob", "layers"}  # no layer, no temporary dir
    assert not (tmp_path / "etc").exists() and not Path("/etc/x").exists()
    assert sorted(os.listdir(victim)) == ["secret"]
    assert (victim / "secret").read_text() == "untouched\n"


def test_unpack_keeps_metadata_and_skips_devices(tmp_path: Path) -> None:
    entries = [
        Entry("bin/", "dir", mode=0o711, mtime=1000),
        Entry("bin/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1001, mtime=2000),
        Entry("bin/alias", "symlink", target="tool", uid=5, gid=6, mtime=3000),
        Entry("bin/same", "hardlink", target="bin/tool"),
        Entry("dev/", "dir", mode=0o755),
        Entry("dev/sda", "char", major=8, minor=0),
        Entry("fifo", "fifo", mode=0o600),
    ]
    layer = _unpack(tmp_path, "meta", entries, compress=False)
    tool = (layer / "bin" / "tool").lstat()
    assert stat.S_IMODE(tool.st_mode) == 0o4755 and (tool.st_uid, tool.st_gid) == (1000, 1001)
    assert tool.st_mtime == 2000
    alias = (layer / "bin" / "alias").lstat()
    assert (alias.st_uid, alias.st_gid, alias.st_mtime) == (5, 6, 3000)
    assert (layer / "bin" / "same").stat().st_ino == tool.st_ino
    bin_dir = (layer / "bin").stat()
    assert stat.S_IMODE(bin_dir.st_mode) == 0o711 and bin_dir.st_mtime == 1000
    assert not (layer / "dev" / "sda").exists()
    assert stat.S_ISFIFO((layer / "fifo").lstat().st_mode)


def test_unpack_checks_diff_id_and_compression(tmp_path: Path) -> None:
    tar = tar_layer([Entry("x", data=b"x\n")])
    blob = tmp_path / "blob"
    blob.write_bytes(gzip_layer(tar))
    (tmp_path / "layers").mkdir()
    with pytest.raises(DigestMismatch) as mismatch:
        unpack_layer(blob, tmp_path / "layers" / "bad", "sha256:" + "0" * 64)
    assert "does not match its diff_id" in str(mismatch.value)
    assert os.listdir(tmp_path / "layers") == []

    # zstd (through the zstd program on Python < 3.14), checked against the same diff_id.
    zstd = tmp_path / "zstd"
    zstd.write_bytes(subprocess.run(["zstd", "-c", "-q"], input=tar, capture_output=True, check=True).stdout)
    unpack_layer(zstd, tmp_path / "layers" / "zstd", "sha256:" + hashlib.sha256(tar).hexdigest())
    assert (tmp_path / "layers" / "zstd" / "x").read_text() == "x\n"

    bad_zstd = tmp_path / "bad-zstd"
    bad_zstd.write_bytes(b"\x28\xb5\x2f\xfd" + b"\xff" * 64)
    with pytest.raises(InvalidLayer) as caught:
        unpack_layer(bad_zstd, tmp_path / "layers" / "bad-zstd")
    assert "not a readable tar archive" in str(caught.value)
    assert os.listdir(tmp_path / "layers") == ["zstd"]

    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(InvalidLayer) as caught:
        unpack_layer(garbage, tmp_path / "layers" / "garbage")
    assert "not a readable tar archive" in str(caught.value)
    assert os.listdir(tmp_path / "layers") == ["zstd"]


def test_bearer_token_is_fetched_once_and_reused(tmp_path: Path) -> None:
    with running_token_registry(tmp_path / "auth") as (registry, tokens):
        tokens.scopes.clear()  # forget the seeding push
        requests = RequestLog()
        store = ImageStore(tmp_path / "store", RegistryConfig(), event_hooks=requests.hooks())
        image = asyncio.run(store.pull(f"{registry.address}/library/busybox"))
        assert (image.layers[0] / "bin" / "busybox").is_file()
        assert tokens.scopes == ["repository:library/busybox:pull"]  # one token, reused for every blob
        token_requests = [p for p in requests.paths if p == "/token"]
        assert len(token_requests) == 1
        # manifest (401, then with the token), config blob, layer blob
        assert [p.split("/")[-2] for p in requests.paths if p.startswith("/v2/")] == [
            "manifests", "manifests", "blobs", "blobs",
        ]  # fmt: skip


def test_seed_layout_is_deterministic(tmp_path: Path) -> None:
    build_busybox_layout(tmp_path / "a")
    build_busybox_layout(tmp_path / "b")
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((tmp_path / "a" / "blobs" / "sha256" / manifest_digest).read_bytes())
    config_digest = manifest["config"]["digest"].split(":")[1]
    config = json.loads((tmp_path / "a" / "blobs" / "sha256" / config_digest).read_bytes())
    assert config["os"] == "linux" and config["architecture"] == host_platform().architecture
    assert config["config"] == {
        "Cmd": ["sh"],
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    }
