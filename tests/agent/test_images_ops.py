"""Image operations beyond pull, against a real docker-registry and real skopeo: basic auth (htpasswd),
push, OCI archives (save/load) both ways with skopeo, import, commit (overlay whiteouts back to OCI ones,
checked through a real overlay mount), tag / rmi / prune / high-water GC, and a pull killed half way.
Runs as root."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.images import AuthenticationRequired, Image, InvalidLayer, StoreError
from agent.images.archive import commit, import_tarball, load_archive, save_archive
from agent.images.registry import RegistryConfig
from agent.images.store import ImageStore
from berthctl.dev.registry import REGISTRY_BINARY, stop_registry, write_config
from berthctl.dev.seed import Entry, gzip_layer, tar_layer
from tests.support_registry import RegistryHandle, free_port, running_registry, running_token_registry

SKOPEO = "/usr/bin/skopeo"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryHandle]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def mirrored(registry: RegistryHandle) -> RegistryConfig:
    return RegistryConfig(mirrors={"docker.io": registry.url})


def skopeo(*args: str) -> str:
    result = subprocess.run([SKOPEO, *args], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"skopeo {' '.join(args)}: {result.stderr}"
    return result.stdout


def registry_digest(ref: str) -> str:
    raw = subprocess.run(
        [SKOPEO, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"], capture_output=True, check=True
    ).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()


# -- basic auth ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def htpasswd_registry(tmp: Path, user: str, password: str) -> Iterator[str]:
    """A docker-registry with htpasswd basic auth; yields its address."""
    with _no_deprecation():
        import crypt  # bcrypt for Distribution's htpasswd (Python 3.11's crypt over libxcrypt)

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    (tmp / "htpasswd").write_text(f"{user}:{hashed}\n")
    address = f"127.0.0.1:{free_port()}"
    config = write_config(tmp / "registry", address)
    with config.open("a") as out:
        out.write(f'auth:\n  htpasswd:\n    realm: "berth-test"\n    path: "{tmp / "htpasswd"}"\n')
    log = open(tmp / "registry.log", "ab")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"http://{address}/v2/", timeout=1).status_code == 401:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "registry.log").read_text()
            time.sleep(0.05)
        yield address
    finally:
        stop_registry(proc)
        log.close()


@contextlib.contextmanager
def _no_deprecation() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def test_pull_through_htpasswd_basic_auth(registry: RegistryHandle, tmp_path: Path) -> None:
    with htpasswd_registry(tmp_path, "alice", "s3cret-pw") as address:
        skopeo("copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false", "--dest-creds",
               "alice:s3cret-pw", f"docker://{registry.address}/library/busybox:latest",
               f"docker://{address}/private/bb:1")  # fmt: skip
        anonymous = ImageStore(tmp_path / "anon", RegistryConfig())
        with pytest.raises(AuthenticationRequired, match=rf"berthctl login {address}"):
            asyncio.run(anonymous.pull(f"{address}/private/bb:1"))

        wrong = ImageStore(tmp_path / "wrong", RegistryConfig(credentials={address: ("alice", "not-it")}))
        with pytest.raises(AuthenticationRequired) as caught:
            asyncio.run(wrong.pull(f"{address}/private/bb:1"))
        assert "not-it" not in str(caught.value)

        store = ImageStore(tmp_path / "store", RegistryConfig(credentials={address: ("alice", "s3cret-pw")}))
        image = asyncio.run(store.pull(f"{address}/private/bb:1"))
        assert (image.layers[0] / "bin" / "busybox").exists()
        assert image.digest == registry_digest(f"{registry.address}/library/busybox:latest")

        # and push through basic auth: the same manifest under another name, digests kept
        digest = asyncio.run(store.push(f"{address}/private/bb:1", f"{address}/private/copy:2"))
        result = subprocess.run(
            [SKOPEO, "inspect", "--raw", "--tls-verify=false", "--creds", "alice:s3cret-pw",
             f"docker://{address}/private/copy:2"], capture_output=True, check=True,
        )  # fmt: skip
        assert "sha256:" + hashlib.sha256(result.stdout).hexdigest() == digest


# -- push, save, load: round trips with skopeo ------------------------------------------------------------


def _layers_of_oci_dir(layout: Path) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    return [layer["digest"] for layer in manifest["layers"]]


def test_import_push_and_skopeo_pulls_the_same_digests(registry: RegistryHandle, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", mirrored(registry))
    tarball = tmp_path / "store" / "rootfs.tar.gz"
    tarball.write_bytes(gzip_layer(tar_layer([Entry("hello.txt", data=b"imported\n"), Entry("etc/", "dir")])))
    name = f"{registry.address}/berth/imported:v1"
    image = asyncio.run(import_tarball(store, tarball, name))
    assert (image.layers[0] / "hello.txt").read_text() == "imported\n"
    assert not tarball.exists()  # moved into the store

    digest = asyncio.run(store.push(name))
    assert digest == image.digest == registry_digest(name)
    skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{name}", f"oci:{tmp_path / 'out'}:v1")
    manifest = store.manifest_of(store.record(name) or {})
    assert _layers_of_oci_dir(tmp_path / "out") == [layer["digest"] for layer in manifest["layers"]]
    # a second push uploads no blob again
    asyncio.run(store.push(name))


def test_save_is_read_by_skopeo_and_skopeo_archive_loads(registry: RegistryHandle, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", mirrored(registry))
    image = asyncio.run(store.pull("busybox"))
    archive = tmp_path / "busybox.tar"
    with open(archive, "wb") as out:
        save_archive(store, ["busybox"], out)
    inspected = json.loads(skopeo("inspect", f"oci-archive:{archive}"))
    assert inspected["Digest"] == image.digest
    skopeo("copy", "--quiet", f"oci-archive:{archive}", f"oci:{tmp_path / 'copied'}:x")
    assert len(_layers_of_oci_dir(tmp_path / "copied")) == 1

    # berth's archive loads into an empty store with the same digest and name
    fresh = ImageStore(tmp_path / "fresh", RegistryConfig())
    with open(archive, "rb") as source:
        loaded = asyncio.run(load_archive(fresh, source))
    assert [(i.reference, i.digest) for i in loaded] == [("docker.io/library/busybox:latest", image.digest)]
    assert (loaded[0].layers[0] / "bin" / "busybox").exists()

    # skopeo's archive (names only a tag) loads under the name given
    theirs = tmp_path / "skopeo.tar"
    skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{registry.address}/library/busybox:latest",
           f"oci-archive:{theirs}:v7")  # fmt: skip
    other = ImageStore(tmp_path / "other", RegistryConfig())
    with open(theirs, "rb") as source:
        got = asyncio.run(load_archive(other, source, "example.com/team/bb"))
    assert [(i.reference, i.digest) for i in got] == [("example.com/team/bb:v7", image.digest)]
    with open(theirs, "rb") as source, pytest.raises(Exception, match="names an image only 'v7'"):
        asyncio.run(load_archive(ImageStore(tmp_path / "third", RegistryConfig()), source))


def test_corrupt_archive_is_refused(registry: RegistryHandle, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", mirrored(registry))
    asyncio.run(store.pull("busybox"))
    archive = tmp_path / "a.tar"
    with open(archive, "wb") as out:
        save_archive(store, ["busybox"], out)
    data = bytearray(archive.read_bytes())
    spot = len(data) // 2  # inside the layer blob, by far the largest member
    data[spot] ^= 0xFF
    archive.write_bytes(bytes(data))
    fresh = ImageStore(tmp_path / "fresh", RegistryConfig())
    with open(archive, "rb") as source, pytest.raises(InvalidLayer, match="the archive is corrupt"):
        asyncio.run(load_archive(fresh, source))
    assert fresh.records() == []
    assert [p.name for p in (tmp_path / "fresh/layers/sha256").iterdir()] == []


# -- commit ----------------------------------------------------------------------------------------------


def test_commit_turns_overlay_whiteouts_into_oci_ones(registry: RegistryHandle, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", mirrored(registry))
    base = asyncio.run(store.pull("busybox"))
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "committed.txt").write_text("kept\n")
    os.mknod(upper / "etc" / "group", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # overlay whiteout: deleted
    (upper / "tmp").mkdir()
    os.setxattr(upper / "tmp", "trusted.overlay.opaque", b"y")
    (upper / "tmp" / "only").write_text("x")

    image = asyncio.run(commit(store, upper, "busybox", "local/committed:1", {"Cmd": ["cat", "/etc/committed.txt"]}))
    assert image.layers[:-1] == base.layers
    assert image.config.cmd == ("cat", "/etc/committed.txt")
    top = image.layers[-1]
    whiteout = (top / "etc" / "group").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.getxattr(top / "tmp", "trusted.overlay.opaque") == b"y"
    manifest = store.manifest_of(store.record("local/committed:1") or {})
    assert len(manifest["layers"]) == 2

    # stacked by a real overlay mount, as a container sees it
    merged, work, up2 = tmp_path / "merged", tmp_path / "work", tmp_path / "up2"
    for d in (merged, work, up2):
        d.mkdir()
    lower = ":".join(str(p) for p in reversed(image.layers))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={up2},workdir={work}", str(merged)], check=True)  # fmt: skip
    try:
        assert (merged / "etc" / "committed.txt").read_text() == "kept\n"
        assert not (merged / "etc" / "group").exists()
        assert (merged / "etc" / "passwd").exists()
        assert sorted(os.listdir(merged / "tmp")) == ["only"]
    finally:
        subprocess.run(["umount", str(merged)], check=True)

    # saved and read back by skopeo with the same digest
    archive = tmp_path / "c.tar"
    with open(archive, "wb") as out:
        save_archive(store, ["local/committed:1"], out)
    assert json.loads(skopeo("inspect", f"oci-archive:{archive}"))["Digest"] == image.digest


# -- tag, rmi, prune, high-water mark ---------------------------------------------------------------------


def test_tag_remove_and_collect(registry: RegistryHandle, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", mirrored(registry))
    image = asyncio.run(store.pull("busybox"))
    assert store.tag("busybox", "mine/bb:2") == "docker.io/mine/bb:2"
    assert store.get("mine/bb:2") is not None
    diff_ids = {f"sha256:{p.resolve().name}" for p in image.layers}

    with pytest.raises(StoreError, match="used by a container"):
        store.remove("busybox", diff_ids)
    assert store.remove("busybox", set()) == ["docker.io/library/busybox:latest"]  # the other tag keeps it
    assert asyncio.run(store.collect(set())) == ([], 0)
    assert store.get("mine/bb:2") is not None

    removed = store.remove("mine/bb:2", set())
    # the last tag of the image: its name@digest record goes with it
    assert removed == ["docker.io/mine/bb:2", f"docker.io/library/busybox@{image.digest}"]
    assert store.records() == []
    # a container still uses the layers: collection keeps them
    _, freed = asyncio.run(store.collect(diff_ids))
    assert all(p.is_dir() for p in image.layers)
    # once nothing uses them, everything goes
    _, freed2 = asyncio.run(store.collect(set()))
    assert freed + freed2 > 0
    assert list((tmp_path / "store/layers/sha256").iterdir()) == []
    assert list((tmp_path / "store/blobs/sha256").iterdir()) == []


def test_get_sees_every_change_of_the_records(registry: RegistryHandle, tmp_path: Path) -> None:
    """issue 6: get() keeps what it found in memory; a pull, tag, rmi or prune shows at once all the same."""
    ref = f"{registry.address}/cache/img:v1"
    registry.push("cache/img", "v1", [[Entry("a", data=b"first")]])
    store = ImageStore(tmp_path / "store", RegistryConfig())
    first = asyncio.run(store.pull(ref))
    assert store.get(ref) == first and store.get("cache/x:1") is None
    registry.push("cache/img", "v1", [[Entry("a", data=b"second")]])  # the tag moves: pulled again
    second = asyncio.run(store.pull(ref))
    assert second.digest != first.digest and store.get(ref) == second
    pinned = f"{registry.address}/cache/img@{first.digest}"  # the older pull's record
    assert store.tag(pinned, "cache/x:1") == "docker.io/cache/x:1" and _digest(store.get("cache/x:1")) == first.digest
    store.tag(ref, "cache/x:1")  # the tag moves
    assert _digest(store.get("cache/x:1")) == second.digest
    store.remove("cache/x:1", set())
    assert store.get("cache/x:1") is None and store.get(ref) == second
    assert store.get(pinned) is not None
    asyncio.run(store.collect(set(), unused_images=True))  # prune -a: every record goes
    assert store.get(ref) is None and store.get(pinned) is None


def _digest(image: Image | None) -> str:
    return image.digest if image is not None else ""


def test_high_water_mark_removes_least_recent_unused(registry: RegistryHandle, tmp_path: Path) -> None:
    registry.push("hw/one", "v1", [[Entry("one", data=os.urandom(200_000))]])
    registry.push("hw/two", "v1", [[Entry("two", data=os.urandom(200_000))]])
    store = ImageStore(tmp_path / "store", RegistryConfig())
    one = asyncio.run(store.pull(f"{registry.address}/hw/one:v1"))
    asyncio.run(store.pull(f"{registry.address}/hw/two:v1"))
    removed = asyncio.run(store.enforce_high_water(250_000, set()))
    assert removed and all("hw/one" in r for r in removed)
    assert store.get(f"{registry.address}/hw/two:v1") is not None
    assert not one.layers[0].exists()
    assert store.usage() <= 250_000


# -- a pull killed half way ------------------------------------------------------------------------------

_KILLED_PULL = """
import asyncio, os, signal, sys
from pathlib import Path
from agent.images.registry import RegistryConfig
from agent.images.store import ImageStore

def progress(digest, phase, done, total):
    if phase == "downloading" and done > total // 3:
        os.kill(os.getpid(), signal.SIGKILL)

store = ImageStore(Path(sys.argv[1]), RegistryConfig())
asyncio.run(store.pull(sys.argv[2], progress))
"""


def test_pull_killed_half_way_leaves_no_visible_layer(registry: RegistryHandle, tmp_path: Path) -> None:
    registry.push("big/one", "v1", [[Entry("blob", data=os.urandom(8 << 20))]])
    ref = f"{registry.address}/big/one:v1"
    root = tmp_path / "store"
    killed = subprocess.run([sys.executable, "-c", _KILLED_PULL, str(root), ref], check=False,
                            cwd=Path(__file__).parents[2])  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    visible = [p for p in (root / "layers/sha256").iterdir() if not p.name.startswith(".")]
    assert visible == []
    assert [p for p in (root / "refs").iterdir() if not p.name.startswith(".")] == []
    leftovers = [p.name for p in (root / "blobs/sha256").iterdir() if p.name.startswith(".download-")]
    assert leftovers  # the partial download is there, but only as a temporary

    store = ImageStore(root, RegistryConfig())  # a restarted agent: temporaries dropped, pull again
    image = asyncio.run(store.pull(ref))
    assert (image.layers[0] / "blob").stat().st_size == 8 << 20
    assert [p for p in (root / "blobs/sha256").iterdir() if p.name.startswith(".")] == []



def test_many_layers_fit_in_overlay_options(
    registry: RegistryHandle, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from agent.runtime.rootfs import overlay_options

    count = 60
    registry.push("many/layers", "v1", [[Entry(f"layer{i}.txt", data=f"{i}\n".encode())] for i in range(count)])
    short = Path(tempfile.mkdtemp(prefix="bi", dir="/tmp"))  # a root as short as /var/lib/berth/images
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    store = ImageStore(short, RegistryConfig())
    image = asyncio.run(store.pull(f"{registry.address}/many/layers:v1"))
    assert len(image.layers) == count
    merged, work, upper = short / "m", short / "w", short / "u"
    for d in (merged, work, upper):
        d.mkdir()
    full = overlay_options(tuple(str(p.resolve()) for p in image.layers), str(upper), str(work))
    assert len(full) > 4096  # full layer paths would not fit in the one page the kernel reads
    options = overlay_options(tuple(str(p) for p in image.layers), str(upper), str(work))
    assert len(options) < 4096
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    try:
        assert (merged / "layer0.txt").read_text() == "0\n"
        assert (merged / f"layer{count - 1}.txt").read_text() == f"{count - 1}\n"
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_bearer_token_with_credentials_and_push_scope(tmp_path: Path) -> None:
    import base64

    with running_token_registry(tmp_path) as (registry, tokens):
        host = registry.address
        creds = RegistryConfig(credentials={host: ("carol", "t0ken-pw")})
        store = ImageStore(tmp_path / "store", creds)
        image = asyncio.run(store.pull(f"{host}/library/busybox:latest"))
        basic = "Basic " + base64.b64encode(b"carol:t0ken-pw").decode()
        assert tokens.authorizations[-1] == basic  # the credentials went to the token service only
        assert tokens.scopes[-1] == "repository:library/busybox:pull"

        digest = asyncio.run(store.push(f"{host}/library/busybox:latest", f"{host}/team/copy:1"))
        assert digest == image.digest
        assert "repository:team/copy:pull,push" in tokens.scopes
        assert registry_digest(f"{host}/team/copy:1") == digest


def test_hostile_archive_touches_nothing_outside_the_store(tmp_path: Path) -> None:
    import io
    import tarfile

    victim = tmp_path / "victim"
    victim.mkdir()
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in [("../victim/escaped", b"x"), ("/tmp/absolute-escape-berth", b"x"),
                           ("blobs/sha256/../../../victim/dotdot", b"x")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("blobs")
        link.type, link.linkname = tarfile.SYMTYPE, str(victim)
        tar.addfile(link)
        info = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"y"))  # through the symlink, if it were followed; and a wrong digest
    store = ImageStore(tmp_path / "store", RegistryConfig())
    with open(archive, "rb") as source, pytest.raises(InvalidLayer, match="the archive is corrupt"):
        asyncio.run(load_archive(store, source))
    assert list(victim.iterdir()) == []
    assert not Path("/tmp/absolute-escape-berth").exists()
    assert [p for p in (tmp_path / "store" / "blobs" / "sha256").iterdir()] == []
