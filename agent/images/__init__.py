"""The agent's local image store: parse a reference, pull it from an OCI distribution registry, unpack each
layer once into a content-addressed directory that overlayfs can stack.

    reference.py   parse and normalise references as Docker does (busybox -> docker.io/library/busybox:latest)
    registry.py    async distribution client: mirrors, bearer tokens, manifests, indexes, verified blobs
    unpack.py      layer tar -> directory, safely, with OCI whiteouts turned into overlayfs whiteouts
    store.py       ImageStore: pull / get / ensure / push, tags, removal, garbage collection and the
                   high-water mark, the on-disk layout under the store root
    archive.py     OCI image-layout archives (save / load), import of a rootfs tarball, commit of an
                   overlay upper dir (overlay whiteouts back to OCI ones)

Every failure the package raises derives from ImageError; the agent translates it at its boundary into a
container status message, so each message is written for the user:

    ImageError                    base of every image failure
     +-- InvalidReference         the reference does not parse ("invalid reference 'Foo': ...")
     +-- ImageNotFound            the registry has no such repository, tag or digest
     +-- RegistryUnreachable      connection refused, DNS failure, timeout, TLS failure
     +-- RegistryError            the registry answered, but not as the protocol says (5xx, bad JSON,
     |    |                       an unexpected status), or the image is one this store cannot use
     |    +-- AuthenticationRequired   the registry wants credentials we do not have (or refused ours)
     |    +-- UnsupportedImage         schema 1, foreign layers, no manifest for this platform
     +-- DigestMismatch           downloaded or unpacked content does not match its digest or size
     +-- InvalidLayer             a layer archive is not a tar we can unpack (corrupt; zstd and no decoder)
     |    +-- UnsafeLayer         a layer tries to write outside its own root (../ entries, hard links out)
     +-- StoreError               the local store itself failed (disk full, permissions)
"""

from __future__ import annotations


class ImageError(Exception):
    """Base of every image failure; the message is meant for a user."""


class InvalidReference(ImageError, ValueError):
    """The image reference does not parse."""


class ImageNotFound(ImageError):
    """The registry has no such repository, tag or digest."""


class RegistryUnreachable(ImageError):
    """The registry could not be reached at all."""


class RegistryError(ImageError):
    """The registry answered in a way this client cannot use."""


class AuthenticationRequired(RegistryError):
    """The registry requires credentials, and none are configured."""


class UnsupportedImage(RegistryError):
    """The image exists but is in a form this store does not handle."""


class DigestMismatch(ImageError):
    """Content does not match the digest (or size) that names it."""


class InvalidLayer(ImageError):
    """A layer archive cannot be unpacked: corrupt, truncated, or compressed in a way we do not read."""


class UnsafeLayer(InvalidLayer):
    """A layer archive tries to escape its own root directory."""


class StoreError(ImageError):
    """The local image store failed: disk full, permission denied, a damaged record."""


# The store's public types, re-exported (imported last: those modules import the exceptions above).
from agent.images.registry import RegistryConfig  # noqa: E402
from agent.images.store import Image, ImageConfig, ImageStore  # noqa: E402

__all__ = [
    "AuthenticationRequired",
    "DigestMismatch",
    "Image",
    "ImageConfig",
    "ImageError",
    "ImageNotFound",
    "ImageStore",
    "InvalidLayer",
    "InvalidReference",
    "RegistryConfig",
    "RegistryError",
    "RegistryUnreachable",
    "StoreError",
    "UnsafeLayer",
    "UnsupportedImage",
]
