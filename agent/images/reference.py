"""Image references, parsed and normalised as Docker does (distribution/reference's ParseNormalizedNamed
followed by TagNameOnly):

    busybox                      -> docker.io/library/busybox:latest
    user/app:1                   -> docker.io/user/app:1
    host:5000/x/y@sha256:<hex>   -> host:5000/x/y@sha256:<hex>     (no tag added when a digest is given)
    localhost/x                  -> localhost/x:latest

The first path component is a registry host when it contains '.' or ':', is 'localhost', or has an
upper-case letter; otherwise the registry is docker.io, and a one-component docker.io name gets 'library/'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.images import InvalidReference

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_LEGACY_REGISTRIES = ("index.docker.io", "registry-1.docker.io")
_MAX_NAME = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    """A fully normalised reference. `tag` is None only when `digest` is set."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def selector(self) -> str:
        """What the manifests endpoint is asked for: the digest if there is one, else the tag."""
        if self.digest is not None:
            return self.digest
        assert self.tag is not None
        return self.tag

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to `digest`, without a tag."""
        return Reference(self.registry, self.repository, None, digest)


def _bad(text: str, why: str) -> InvalidReference:
    return InvalidReference(f"invalid reference {text!r}: {why}")


def parse(text: str) -> Reference:
    """Parse and normalise `text`; raises InvalidReference with the reason when it is not a reference."""
    if not isinstance(text, str) or not text:
        raise _bad(str(text), "empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise _bad(text, "contains whitespace")

    rest = text
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise _bad(text, f"invalid digest {digest!r}")
        if digest.startswith("sha256:") and not _SHA256.fullmatch(digest):
            raise _bad(text, "a sha256 digest is 64 lower-case hex characters")

    # A tag follows the last ':' that comes after the last '/' (a ':' before it belongs to a port).
    tag: str | None = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise _bad(text, f"invalid tag {tag!r}")

    if not rest:
        raise _bad(text, "no repository name")

    registry, sep, path = rest.partition("/")
    looks_like_host = "." in registry or ":" in registry or registry == "localhost"
    if sep and (looks_like_host or registry.lower() != registry):
        if not _DOMAIN.fullmatch(registry):
            raise _bad(text, f"invalid registry host {registry!r}")
    else:
        registry, path = DEFAULT_REGISTRY, rest
    if registry in _LEGACY_REGISTRIES:
        registry = DEFAULT_REGISTRY

    if path.lower() != path:
        raise _bad(text, "repository name must be lowercase")
    for component in path.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise _bad(text, f"invalid repository name component {component!r}")
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    if len(f"{registry}/{path}") > _MAX_NAME:
        raise _bad(text, f"repository name longer than {_MAX_NAME} characters")

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)


def normalise(text: str) -> str:
    """The normalised string form of `text`."""
    return str(parse(text))
