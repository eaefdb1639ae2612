"""An async client for the OCI distribution API (what Docker calls a registry), enough to pull: resolve a
reference to a manifest for this host's platform, fetch the config, download blobs verified by digest.

Where a registry is reached: a mirror configured for the registry host is tried first (RegistryConfig.mirrors,
e.g. docker.io -> http://10.77.0.1:5000), then the registry itself; `docker.io` is served by
registry-1.docker.io. Registries in RegistryConfig.insecure, and loopback ones (as in Docker), are reached
over plain HTTP, every other over HTTPS. Access is anonymous unless RegistryConfig.credentials has a user and
password for the registry: a `401` with a `Basic` challenge is answered with them, one with a `Bearer`
challenge by fetching a token from the realm (with the credentials, if any), which is then reused for the
repository. Credentials never appear in a message or a log line.

Pushing (a client made with push=True asks tokens for pull,push): blobs the registry lacks are uploaded
monolithically (POST then PUT ?digest=), then the manifest is PUT under its tag.

Manifests understood: Docker schema 2, OCI image manifest, Docker manifest list and OCI index (the entry for
this host's linux/<arch> is picked). Every manifest and blob is checked against its digest (and blobs
against their size) before it is used or becomes visible on disk.

Errors are those of agent.images: ImageNotFound, RegistryUnreachable, RegistryError (and its
AuthenticationRequired, UnsupportedImage), DigestMismatch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from agent.images import (
    AuthenticationRequired,
    DigestMismatch,
    ImageError,
    ImageNotFound,
    RegistryError,
    RegistryUnreachable,
    StoreError,
    UnsupportedImage,
)
from agent.images.reference import DEFAULT_REGISTRY, Reference

DOCKER_HUB_HOST = "registry-1.docker.io"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
)
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 16 << 20
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|([^,\s]*))')

EventHook = Callable[..., Awaitable[None]]

# httpcore reads a response body 64 KiB at a time, with a few Python layers per read: for a 200 MB layer that
# is ~3,200 trips through h11/anyio, a third of a pull's CPU. 1 MiB reads cut the pull's CPU by ~30 %
# (bench/pull.py). A class attribute of httpcore's HTTP/1.1 connection, set for this process.
if isinstance(getattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", None), int):
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 1 << 20


@dataclass(frozen=True)
class RegistryConfig:
    """Where registries are reached. mirrors: registry host -> base URL tried first; insecure: registry hosts
    reached over plain HTTP."""

    mirrors: dict[str, str] = field(default_factory=dict)
    insecure: set[str] = field(default_factory=set)
    # registry host (as in a reference: docker.io, ghcr.io, 10.0.0.1:5000) -> (user, password)
    credentials: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


_MACHINE_TO_OCI = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def host_platform() -> Platform:
    """This host's platform in OCI terms (linux/amd64, linux/arm64/v8, ...)."""
    machine = platform.machine().lower()
    arch, variant = _MACHINE_TO_OCI.get(machine, (machine, None))
    return Platform("linux", arch, variant)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()

    @classmethod
    def parse(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise RegistryError(f"invalid {what} descriptor: {data!r}")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
            raise RegistryError(f"invalid {what} descriptor: {data!r}")
        if not _SHA256.fullmatch(digest):
            raise UnsupportedImage(f"unsupported {what} digest {digest!r}: only sha256 is supported")
        urls = data.get("urls") or ()
        return cls(str(data.get("mediaType", "")), digest, size, tuple(str(u) for u in urls))


@dataclass(frozen=True)
class Manifest:
    """An image manifest (never an index): config and layers, lowest layer first."""

    digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    raw: bytes  # the manifest exactly as served (its sha256 is `digest`)


@dataclass(frozen=True)
class Endpoint:
    """One place a registry is reached: a mirror, or the registry itself."""

    base_url: str  # "https://registry-1.docker.io", "http://10.77.0.1:5000"
    mirror: bool = False

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc


@dataclass(frozen=True)
class Resolved:
    """What a reference resolved to: the digest the tag points at (an index's, for a multi-platform image),
    the manifest for this platform, and the endpoint that answered (blobs are fetched from it too)."""

    reference: Reference
    digest: str
    manifest: Manifest
    endpoint: Endpoint


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in ("localhost", "[::1]") or name.startswith("127.")


def endpoints(config: RegistryConfig, registry: str) -> list[Endpoint]:
    """The endpoints tried for `registry`, in order."""
    def scheme(host: str) -> str:
        return "http" if host in config.insecure or _is_loopback(host) else "https"

    found: list[Endpoint] = []
    mirror = config.mirrors.get(registry)
    if mirror:
        mirror = mirror.rstrip("/")
        if "://" not in mirror:  # a bare host:port, as in Docker's insecure-registries
            mirror = f"{scheme(mirror)}://{mirror}"
        found.append(Endpoint(mirror, mirror=True))
    host = DOCKER_HUB_HOST if registry == DEFAULT_REGISTRY else registry
    found.append(Endpoint(f"{'http' if registry in config.insecure else scheme(host)}://{host}"))
    return found


def _reason(err: Exception) -> str:
    """What went wrong, for a user: "connection refused" rather than httpx's "All connection attempts
    failed" when the cause is a refused, reset or aborted connection."""
    seen: BaseException | None = err
    for _ in range(8):
        if isinstance(seen, ConnectionError) and isinstance(seen.errno, int) and seen.errno > 0:
            return os.strerror(seen.errno).lower()
        if seen is None:
            break
        seen = seen.__cause__ or seen.__context__
    return str(err) or type(err).__name__


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def _error_codes(body: bytes) -> list[str]:
    try:
        data = json.loads(body)
    except ValueError:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("errors"), list):
        return []
    return [str(e.get("code", "")) for e in data["errors"] if isinstance(e, dict)]


def _digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    """Pull-side distribution client. Use as `async with RegistryClient(config) as client:`; one httpx client
    (and its connection pool) per `async with`."""

    def __init__(
        self,
        config: RegistryConfig,
        *,
        event_hooks: Mapping[str, list[EventHook]] | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        push: bool = False,
    ) -> None:
        self.config = config
        self._push = push
        self._event_hooks = dict(event_hooks or {})
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._http: httpx.AsyncClient | None = None
        self._tokens: dict[tuple[str, str], str] = {}

    async def __aenter__(self) -> RegistryClient:
        self._http = httpx.AsyncClient(
            timeout=self._timeout, follow_redirects=True, event_hooks=self._event_hooks
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- HTTP with token auth ------------------------------------------------------------------------------

    def _credentials(self, endpoint: Endpoint) -> tuple[str, str] | None:
        host = endpoint.host
        found = self.config.credentials.get(host)
        if found is None and host == DOCKER_HUB_HOST:
            found = self.config.credentials.get(DEFAULT_REGISTRY)
        return found

    async def _send(
        self,
        endpoint: Endpoint,
        repository: str,
        path: str,
        headers: Mapping[str, str],
        *,
        stream: bool,
        method: str = "GET",
        content: bytes | AsyncIterable[bytes] | None = None,
        url: str | None = None,
    ) -> httpx.Response:
        if self._http is None:
            raise RuntimeError("RegistryClient used outside `async with`")
        key = (endpoint.base_url, repository)
        for attempt in range(2):
            sent = dict(headers)
            if key in self._tokens:
                sent["Authorization"] = self._tokens[key]
            request = self._http.build_request(
                method, url or endpoint.base_url + path, headers=sent, content=content
            )
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.RequestError as err:
                raise RegistryUnreachable(f"cannot reach registry {endpoint.host}: {_reason(err)}") from err
            if response.status_code != 401 or attempt == 1:
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            await response.aclose()
            self._tokens[key] = await self._token(endpoint, repository, challenge)
        raise AssertionError("unreachable")

    async def _token(self, endpoint: Endpoint, repository: str, challenge: str) -> str:
        assert self._http is not None
        scheme, params = _parse_challenge(challenge)
        creds = self._credentials(endpoint)
        if scheme == "basic" and creds is not None:
            return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        if scheme != "bearer" or "realm" not in params:
            raise AuthenticationRequired(
                f"registry {endpoint.host} requires credentials ({challenge or 'no challenge given'}); "
                f"log in first: berthctl login {endpoint.host}"
            )
        actions = "pull,push" if self._push else "pull"
        scope = params.get("scope") or f"repository:{repository}:pull"
        if self._push:
            scope = f"repository:{repository}:{actions}"
        query = {"scope": scope}
        if params.get("service"):
            query["service"] = params["service"]
        realm = params["realm"]
        auth = httpx.BasicAuth(*creds) if creds is not None else None
        try:
            response = await self._http.get(realm, params=query, auth=auth)
        except httpx.RequestError as err:
            raise RegistryUnreachable(
                f"cannot reach the token service {urlsplit(realm).netloc} of registry {endpoint.host}: "
                f"{_reason(err)}"
            ) from err
        if response.status_code != 200:
            who = "the credentials given" if creds is not None else "an anonymous token"
            raise AuthenticationRequired(
                f"the token service of registry {endpoint.host} refused {who} for {repository} "
                f"(HTTP {response.status_code})"
            )
        try:
            data = response.json()
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"the token service of registry {endpoint.host} answered without a token")
        return f"Bearer {token}"

    async def _read_limited(self, response: httpx.Response, limit: int, what: str) -> bytes:
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > limit:
                raise RegistryError(f"{what} is larger than {limit} bytes; refusing it")
        return bytes(data)

    async def _check(self, response: httpx.Response, endpoint: Endpoint, ref: Reference, what: str) -> None:
        """Turn an error status into the matching exception (the response must not be consumed yet)."""
        if response.status_code == 200:
            return
        body = await self._read_limited(response, 64 << 10, "error body")
        codes = _error_codes(body)
        if response.status_code == 404 or {"NAME_UNKNOWN", "MANIFEST_UNKNOWN"} & set(codes):
            raise ImageNotFound(
                f"image not found: {ref} (the registry has no such repository or tag; check the name, "
                "or push the image first)"
            )
        if response.status_code in (401, 403):
            raise AuthenticationRequired(
                f"access denied for {ref} by registry {endpoint.host}: the repository does not exist "
                "or needs credentials (berthctl login " + endpoint.host + ")"
            )
        if response.status_code == 429:
            raise RegistryError(f"registry {endpoint.host} is rate limiting pulls of {ref}; try again later")
        excerpt = body[:200].decode("utf-8", "replace").strip()
        raise RegistryError(
            f"registry {endpoint.host} answered HTTP {response.status_code} for {what} of {ref}"
            + (f": {excerpt}" if excerpt else "")
        )

    # -- manifests ---------------------------------------------------------------------------------------

    async def _get_manifest(
        self, endpoint: Endpoint, ref: Reference, selector: str
    ) -> tuple[str, str, dict[str, Any], bytes]:
        path = f"/v2/{ref.repository}/manifests/{selector}"
        response = await self._send(endpoint, ref.repository, path, {"Accept": ACCEPT}, stream=True)
        try:
            await self._check(response, endpoint, ref, "the manifest")
            body = await self._read_limited(response, MAX_MANIFEST_BYTES, f"the manifest of {ref}")
        finally:
            await response.aclose()
        digest = _digest_of(body)
        if selector.startswith("sha256:") and digest != selector:
            raise DigestMismatch(f"manifest of {ref} from {endpoint.host} has digest {digest}, not {selector}")
        announced = response.headers.get("Docker-Content-Digest", "")
        if announced.startswith("sha256:") and announced != digest:
            raise DigestMismatch(
                f"manifest of {ref} from {endpoint.host} has digest {digest}, but the registry announced "
                f"{announced}"
            )
        try:
            data = json.loads(body)
        except ValueError as err:
            raise RegistryError(f"manifest of {ref} from {endpoint.host} is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise RegistryError(f"manifest of {ref} from {endpoint.host} is not a JSON object")
        if data.get("schemaVersion") == 1:
            raise UnsupportedImage(f"{ref} uses the old Docker schema 1 manifest, which is not supported")
        media_type = str(data.get("mediaType") or response.headers.get("Content-Type", "")).split(";")[0]
        if media_type not in INDEX_TYPES + MANIFEST_TYPES:
            media_type = OCI_INDEX if "manifests" in data else OCI_MANIFEST if "layers" in data else media_type
        if media_type not in INDEX_TYPES + MANIFEST_TYPES:
            raise UnsupportedImage(f"{ref} has a manifest of unsupported type {media_type!r}")
        return digest, media_type, data, body

    def _pick(self, ref: Reference, index: dict[str, Any], want: Platform) -> str:
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise RegistryError(f"manifest list of {ref} has no manifests")
        candidates: list[tuple[int, str]] = []
        seen: list[str] = []
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            plat = entry.get("platform") or {}
            os_name, arch = plat.get("os", ""), plat.get("architecture", "")
            if os_name and arch and os_name != "unknown":
                seen.append(f"{os_name}/{arch}" + (f"/{plat['variant']}" if plat.get("variant") else ""))
            if os_name != want.os or arch != want.architecture:
                continue
            variant = plat.get("variant")
            if variant and want.variant and variant != want.variant:
                continue
            desc = Descriptor.parse(entry, "manifest")
            candidates.append((0 if variant == want.variant else 1, desc.digest))
        if not candidates:
            have = ", ".join(sorted(set(seen))) or "no platforms"
            raise UnsupportedImage(f"{ref} has no image for this host's platform {want} (it has: {have})")
        return min(candidates)[1]

    async def _resolve_at(self, endpoint: Endpoint, ref: Reference, want: Platform) -> Resolved:
        top_digest, media_type, data, body = await self._get_manifest(endpoint, ref, ref.selector)
        digest = top_digest
        for _ in range(3):  # an index may, rarely, point at another index
            if media_type not in INDEX_TYPES:
                break
            picked = self._pick(ref, data, want)
            digest, media_type, data, body = await self._get_manifest(endpoint, ref, picked)
        else:
            raise UnsupportedImage(f"{ref}: manifest lists nested too deeply")
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise RegistryError(f"manifest {digest} of {ref} has no layers")
        manifest = Manifest(
            digest=digest,
            media_type=media_type,
            config=Descriptor.parse(data.get("config"), "config"),
            layers=tuple(Descriptor.parse(layer, "layer") for layer in layers),
            raw=body,
        )
        for layer in manifest.layers:
            if layer.media_type not in LAYER_TYPES:
                raise UnsupportedImage(
                    f"{ref} has a layer of unsupported type {layer.media_type!r} ({layer.digest})"
                )
        return Resolved(ref, top_digest, manifest, endpoint)

    async def resolve(self, ref: Reference, want: Platform | None = None) -> Resolved:
        """Resolve `ref` to the manifest for `want` (default: this host), trying each endpoint in turn."""
        want = want or host_platform()
        errors: list[ImageError] = []
        for endpoint in endpoints(self.config, ref.registry):
            try:
                return await self._resolve_at(endpoint, ref, want)
            except (ImageNotFound, RegistryUnreachable, RegistryError) as err:
                errors.append(err)  # a mirror failed: fall back to the next endpoint, as Docker does
        # Report what the most useful endpoint said: a definite "not found" beats "unreachable".
        first = next((e for e in errors if isinstance(e, ImageNotFound)), errors[0])
        others = "; ".join(f"also: {e}" for e in errors if e is not first)
        if others:
            raise type(first)(f"{first}; {others}") from first
        raise first

    # -- blobs ---------------------------------------------------------------------------------------------

    async def _open_blob(self, resolved: Resolved, desc: Descriptor) -> httpx.Response:
        ref, endpoint = resolved.reference, resolved.endpoint
        if desc.urls:
            raise UnsupportedImage(f"{ref} has a foreign layer {desc.digest} (served from {desc.urls[0]})")
        path = f"/v2/{ref.repository}/blobs/{desc.digest}"
        response = await self._send(endpoint, ref.repository, path, {}, stream=True)
        if response.status_code == 404:
            await response.aclose()
            raise RegistryError(
                f"registry {endpoint.host} has the manifest of {ref} but not its blob {desc.digest}"
            )
        try:
            await self._check(response, endpoint, ref, f"blob {desc.digest}")
        except BaseException:
            await response.aclose()
            raise
        return response

    async def fetch_blob(self, resolved: Resolved, desc: Descriptor, limit: int = MAX_CONFIG_BYTES) -> bytes:
        """A small blob (the config) in memory, verified."""
        if desc.size > limit:
            raise RegistryError(f"blob {desc.digest} of {resolved.reference} is larger than {limit} bytes")
        response = await self._open_blob(resolved, desc)
        try:
            data = await self._read_limited(response, desc.size, f"blob {desc.digest}")
        except RegistryError as err:
            raise DigestMismatch(
                f"blob {desc.digest} of {resolved.reference} is larger than its {desc.size} bytes"
            ) from err
        finally:
            await response.aclose()
        if len(data) != desc.size or _digest_of(data) != desc.digest:
            raise DigestMismatch(
                f"blob {desc.digest} of {resolved.reference} from {resolved.endpoint.host} does not match "
                f"its digest (got {_digest_of(data)}, {len(data)} bytes, expected {desc.size})"
            )
        return data

    async def download_blob(
        self, resolved: Resolved, desc: Descriptor, dest: Path, progress: Callable[[int], None] | None = None
    ) -> None:
        """Stream a blob into `dest`: written to a temporary file beside it, hashed on the way, and renamed
        into place only when size and digest match. On any failure nothing is left behind."""
        response = await self._open_blob(resolved, desc)
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=".download-", dir=dest.parent)
        except OSError as err:
            await response.aclose()
            raise StoreError(f"cannot create a download file in {dest.parent}: {err}") from err
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with open(fd, "wb", buffering=1 << 20) as out:
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > desc.size:
                        raise DigestMismatch(
                            f"blob {desc.digest} of {resolved.reference} from {resolved.endpoint.host} is "
                            f"larger than its {desc.size} bytes"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress(size)
            actual = "sha256:" + digest.hexdigest()
            if size != desc.size or actual != desc.digest:
                raise DigestMismatch(
                    f"blob {desc.digest} of {resolved.reference} from {resolved.endpoint.host} does not "
                    f"match its digest (got {actual}, {size} bytes, expected {desc.size})"
                )
            os.rename(tmp, dest)
        except httpx.RequestError as err:
            tmp.unlink(missing_ok=True)
            raise RegistryUnreachable(
                f"cannot reach registry {resolved.endpoint.host}: {_reason(err)} (while downloading "
                f"{desc.digest})"
            ) from err
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write blob {desc.digest} to {dest.parent}: {err}") from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            await response.aclose()


    # -- pushing -------------------------------------------------------------------------------------------

    def push_endpoint(self, ref: Reference) -> Endpoint:
        """Where a push goes: the registry itself, never a mirror."""
        return endpoints(self.config, ref.registry)[-1]

    async def _expect(self, response: httpx.Response, endpoint: Endpoint, ref: Reference, what: str,
                      ok: tuple[int, ...]) -> None:
        if response.status_code in ok:
            return
        body = (await response.aread())[:300].decode("utf-8", "replace").strip()
        if response.status_code in (401, 403):
            raise AuthenticationRequired(
                f"registry {endpoint.host} refused to let us push {ref} ({what}, HTTP {response.status_code}): "
                f"log in with an account that may push: berthctl login {endpoint.host}"
            )
        raise RegistryError(
            f"registry {endpoint.host} answered HTTP {response.status_code} to {what} of {ref}"
            + (f": {body}" if body else "")
        )

    async def has_blob(self, endpoint: Endpoint, ref: Reference, digest: str) -> bool:
        path = f"/v2/{ref.repository}/blobs/{digest}"
        response = await self._send(endpoint, ref.repository, path, {}, stream=False, method="HEAD")
        if response.status_code == 404:
            return False
        await self._expect(response, endpoint, ref, f"checking blob {digest}", (200,))
        return True

    async def upload_blob(
        self, endpoint: Endpoint, ref: Reference, digest: str, path: Path,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Upload the file `path` as blob `digest` (a monolithic upload), unless the registry has it."""
        if await self.has_blob(endpoint, ref, digest):
            if progress is not None:
                progress(path.stat().st_size)
            return
        start = f"/v2/{ref.repository}/blobs/uploads/"
        response = await self._send(endpoint, ref.repository, start, {}, stream=False, method="POST")
        await self._expect(response, endpoint, ref, f"starting the upload of {digest}", (202,))
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {endpoint.host} started an upload without a Location")
        url = urljoin(endpoint.base_url + start, location)
        url += ("&" if "?" in url else "?") + f"digest={digest}"

        async def chunks() -> AsyncIterator[bytes]:
            with open(path, "rb") as source:
                while chunk := source.read(1 << 20):
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)}
        response = await self._send(
            endpoint, ref.repository, "", headers, stream=False, method="PUT", content=chunks(), url=url
        )
        await self._expect(response, endpoint, ref, f"uploading blob {digest}", (201, 204))

    async def put_manifest(self, endpoint: Endpoint, ref: Reference, media_type: str, body: bytes) -> None:
        """PUT `body` as the manifest of `ref` (by its tag, or by digest)."""
        path = f"/v2/{ref.repository}/manifests/{ref.selector}"
        response = await self._send(
            endpoint, ref.repository, path, {"Content-Type": media_type}, stream=False, method="PUT",
            content=body,
        )
        await self._expect(response, endpoint, ref, "putting the manifest", (200, 201, 204))
