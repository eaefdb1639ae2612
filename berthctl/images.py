"""berthctl's image verbs (issue 4): pull, push, images, image ls|inspect|prune, tag, rmi, import, commit,
save, load, login, logout. Each goes through the controller to the agent of one host (--node; pull and
images default to every ready host).

Credentials: `berthctl login REGISTRY` keeps the user and password in ~/.config/berth/auth.json (mode 0600,
like Docker's config.json without a credential helper). pull and push send the ones for the image's
registry with the request; the controller passes them to the agent, which keeps them (0600, root only) for
later pulls by `run`. They are never written to etcd, and never printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from berthctl.client import CLIError, Connection

if TYPE_CHECKING:
    from berth.api import agent_pb2

CHUNK = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def node(p: argparse.ArgumentParser, what: str = "the host whose image store is used") -> None:
        p.add_argument("--node", default="", help=f"{what} (name or id)")

    p = sub.add_parser("pull", help="pull an image onto hosts (all ready hosts unless --node)")
    node(p, "pull onto this host only")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("push", help="push an image from a host's store to its registry")
    node(p)
    p.add_argument("image", metavar="NAME[:TAG]")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("images", help="list images (on every ready host unless --node)")
    node(p)
    p.add_argument("-q", "--quiet", action="store_true", help="only image ids")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("image", help="manage images")
    isub = p.add_subparsers(dest="image_command", metavar="{ls,inspect,prune}", required=True)
    q = isub.add_parser("ls", help="list images")
    node(q)
    q.add_argument("-q", "--quiet", action="store_true")
    q.add_argument("-o", "--output", choices=("table", "json"), default="table")
    q.set_defaults(func=cmd_images)
    q = isub.add_parser("inspect", help="show an image in full, as JSON")
    node(q)
    q.add_argument("image", metavar="IMAGE")
    q.set_defaults(func=cmd_inspect)
    q = isub.add_parser("prune", help="free disk: remove layers no image needs (-a: and unused images)")
    node(q)
    q.add_argument("-a", "--all", action="store_true", help="also remove every image no container uses")
    q.set_defaults(func=cmd_prune)

    p = sub.add_parser("tag", help="give an image another name")
    node(p)
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("rmi", help="remove images from a host's store")
    node(p)
    p.add_argument("-f", "--force", action="store_true", help="even when a container uses it")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_rmi)

    p = sub.add_parser("import", help="make an image of a root filesystem tarball ('-': standard input)")
    node(p)
    p.add_argument("tarball", metavar="TARBALL")
    p.add_argument("name", metavar="NAME[:TAG]")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("commit", help="make an image of a container: its image plus its changed files")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("name", metavar="NAME[:TAG]")
    p.set_defaults(func=cmd_commit)

    p = sub.add_parser("save", help="write an image as an OCI image-layout archive")
    node(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the archive ('-': standard output)")
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("load", help="load the images of an OCI image-layout archive")
    node(p)
    p.add_argument("-i", "--input", required=True, metavar="FILE", help="the archive ('-': standard input)")
    p.add_argument("--name", default="", help="name for an image the archive names only by tag, or not at all")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("login", help="keep credentials for a registry (sent to agents with pull and push)")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("-u", "--username", required=True)
    p.add_argument("-p", "--password", help="the password (better: --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("logout", help="forget the credentials for a registry")
    p.add_argument("registry", metavar="REGISTRY")
    p.set_defaults(func=cmd_logout)


# -- credentials -------------------------------------------------------------------------------------------


def auth_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "berth" / "auth.json"


def _read_auths() -> dict[str, Any]:
    path = auth_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read {path}: {exc}; fix or delete it") from None
    return dict(data.get("auths", {})) if isinstance(data, dict) else {}


def _write_auths(auths: dict[str, Any]) -> None:
    path = auth_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".auth.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        json.dump({"auths": auths}, out, indent=1)
    os.rename(tmp, path)


def _registry_of(image: str) -> str:
    from agent.images import InvalidReference
    from agent.images.reference import parse

    try:
        return parse(image).registry
    except InvalidReference as exc:
        raise CLIError(str(exc)) from None


def credentials_for(image: str) -> list[agent_pb2.RegistryCredential]:
    from berth.api import agent_pb2

    registry = _registry_of(image)
    entry = _read_auths().get(registry)
    if not isinstance(entry, dict) or "auth" not in entry:
        return []
    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    return [agent_pb2.RegistryCredential(registry=registry, username=user, password=password)]


def cmd_login(args: argparse.Namespace, conn: Connection) -> int:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif args.password is not None:
        password = args.password
    else:
        import getpass

        password = getpass.getpass("Password: ")
    if not password:
        raise CLIError("no password given: use --password-stdin")
    registry = "docker.io" if args.registry in ("docker.io", "index.docker.io", "registry-1.docker.io") else (
        args.registry.removeprefix("https://").removeprefix("http://").rstrip("/")
    )
    auths = _read_auths()
    auths[registry] = {"auth": base64.b64encode(f"{args.username}:{password}".encode()).decode()}
    _write_auths(auths)
    print(f"Credentials for {registry} kept in {auth_path()}; pull and push send them to the agent")
    return 0


def cmd_logout(args: argparse.Namespace, conn: Connection) -> int:
    auths = _read_auths()
    if auths.pop(args.registry, None) is None:
        raise CLIError(f"not logged in to {args.registry}", code=1)
    _write_auths(auths)
    print(f"Removed the credentials for {args.registry}")
    return 0


# -- progress ----------------------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


class Progress:
    """Per-layer progress: bars redrawn in a terminal, one line per phase change otherwise."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.layers: dict[str, tuple[str, int, int]] = {}
        self.drawn = 0

    def update(self, item: agent_pb2.ImageProgress) -> None:
        if not item.layer:
            return
        key = f"{item.node}:{item.layer}"
        old = self.layers.get(key)
        self.layers[key] = (item.phase, item.done, item.total)
        if not self.tty:
            if old is None or old[0] != item.phase:
                where = f"{item.node}: " if item.node else ""
                print(f"{where}{item.layer[7:19]}: {item.phase} {_size(item.total)}", flush=True)
            return
        out = sys.stdout
        if self.drawn:
            out.write(f"\x1b[{self.drawn}F")
        for name, (phase, done, total) in self.layers.items():
            node, _, digest = name.partition(":")
            width = 30
            filled = int(width * done / total) if total else width
            bar = "=" * filled + ">" * (filled < width) + " " * max(0, width - filled - 1)
            prefix = f"{node}: " if node else ""
            out.write(f"\x1b[2K{prefix}{digest[7:19]}: {phase:<11} [{bar}] {_size(done)}/{_size(total)}\n")
        self.drawn = len(self.layers)
        out.flush()


def _stream_progress(items: Iterable[agent_pb2.ImageProgress], verb: str) -> int:
    progress = Progress(sys.stdout.isatty())
    for item in items:
        if item.HasField("image"):
            where = f" on {item.image.node}" if item.image.node else ""
            print(f"{verb} {item.image.reference}{where}: digest {item.image.digest}")
        else:
            progress.update(item)
    return 0


# -- verbs -------------------------------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import agent_pb2

    request = agent_pb2.ImagePullRequest(
        reference=args.image, node=args.node, credentials=credentials_for(args.image)
    )
    return _stream_progress(conn.control.ImagePull(request), "Pulled")


def cmd_push(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import agent_pb2

    request = agent_pb2.ImagePushRequest(
        reference=args.image, node=args.node, credentials=credentials_for(args.image)
    )
    return _stream_progress(conn.control.ImagePush(request), "Pushed")


def _image_json(info: agent_pb2.ImageInfo) -> dict[str, Any]:
    return {
        "reference": info.reference, "digest": info.digest, "id": info.id, "size_bytes": info.size_bytes,
        "created_ns": info.created_ns, "node": info.node, "diff_ids": list(info.diff_ids),
        "config": json.loads(info.config_json) if info.config_json else {},
    }


def cmd_images(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import agent_pb2

    reply = conn.control.ImageList(agent_pb2.ImageListRequest(node=args.node))
    images = [i for i in reply.images if "@" not in i.reference]  # name@digest records show as digests
    if args.output == "json":
        print(json.dumps([_image_json(i) for i in reply.images], indent=2))
        return 0
    if args.quiet:
        for ident in dict.fromkeys(i.id[7:19] for i in images):
            print(ident)
        return 0
    rows = [("NODE", "REPOSITORY", "TAG", "IMAGE ID", "DIGEST", "SIZE")]
    for i in sorted(images, key=lambda i: (i.node, i.reference)):
        repo, _, tag = i.reference.rpartition(":")
        rows.append((i.node, repo, tag, i.id[7:19], i.digest[:19], _size(i.size_bytes)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_inspect(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import agent_pb2

    info = conn.control.ImageInspect(agent_pb2.ImageRef(reference=args.image, node=args.node))
    print(json.dumps(_image_json(info), indent=2))
    return 0


def cmd_prune(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import agent_pb2

    reply = conn.control.ImagePrune(agent_pb2.ImagePruneRequest(all=args.all, node=args.node))
    for reference in reply.references:
        print(f"Deleted: {reference}")
    print(f"Total reclaimed space: {_size(reply.reclaimed_bytes)}")
    return 0


def cmd_tag(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import agent_pb2

    conn.control.ImageTag(agent_pb2.ImageTagRequest(source=args.source, target=args.target, node=args.node))
    return 0


def cmd_rmi(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import agent_pb2

    for image in args.images:
        reply = conn.control.ImageRemove(
            agent_pb2.ImageRemoveRequest(reference=image, force=args.force, node=args.node)
        )
        for reference in reply.references:
            print(f"Untagged: {reference}")
    return 0


def _chunks(path: str, reference: str, node: str) -> Iterator[agent_pb2.ImageChunk]:
    from berth.api import agent_pb2

    source = sys.stdin.buffer if path == "-" else None
    try:
        stream = source or open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from None
    try:
        yield agent_pb2.ImageChunk(reference=reference, node=node)
        while data := stream.read(CHUNK):
            yield agent_pb2.ImageChunk(data=data)
    finally:
        if source is None:
            stream.close()


def cmd_import(args: argparse.Namespace, conn: Connection) -> int:
    if args.tarball != "-" and not Path(args.tarball).is_file():
        raise CLIError(f"no such file: {args.tarball}")
    info = conn.control.ImageImport(_chunks(args.tarball, args.name, args.node))
    print(info.id)
    return 0


def cmd_commit(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import agent_pb2

    info = conn.control.ImageCommit(agent_pb2.ImageCommitRequest(container_id=args.container, reference=args.name))
    print(info.id)
    return 0


def cmd_save(args: argparse.Namespace, conn: Connection) -> int:
    from berth.api import agent_pb2

    chunks = conn.control.ImageSave(agent_pb2.ImageRef(reference=args.image, node=args.node))
    if args.output == "-":
        for chunk in chunks:
            sys.stdout.buffer.write(chunk.data)
        sys.stdout.buffer.flush()
        return 0
    tmp = Path(args.output).with_name(f".{Path(args.output).name}.part")
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                out.write(chunk.data)
        os.rename(tmp, args.output)
    finally:
        tmp.unlink(missing_ok=True)
    return 0


def cmd_load(args: argparse.Namespace, conn: Connection) -> int:
    if args.input != "-" and not Path(args.input).is_file():
        raise CLIError(f"no such file: {args.input}")
    reply = conn.control.ImageLoad(_chunks(args.input, args.name, args.node))
    for info in reply.images:
        print(f"Loaded image: {info.reference}")
    return 0
