"""The agent's image RPCs (issue 4): pull, push, list, inspect, tag, rmi, prune, commit, import, load, save on
this host's store, dialled by controllers. Mixed into AgentAPI.

Credentials arrive with a pull or push request. They are kept in this agent's memory and in
<state>/images/credentials.json (mode 0600, root only) so that later pulls by `run` can use them; they are
never logged and never sent back. Which layers containers use is read from each container's config.json
(<state>/containers/<id>/config.json), so neither rmi nor GC removes a layer a container stands on.
ImageError becomes a gRPC status whose message is the error's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any, NoReturn

import grpc
import grpc.aio

from agent.images import ImageError, ImageNotFound, InvalidReference, StoreError
from agent.images.store import ImageStore
from berth.api import agent_pb2

Ctx = grpc.aio.ServicerContext[Any, Any]
CHUNK = 1 << 20
CREDENTIALS_FILE = "credentials.json"


def load_credentials(store_root: Path) -> dict[str, tuple[str, str]]:
    """The credentials kept by earlier requests (empty when none)."""
    try:
        data = json.loads((store_root / CREDENTIALS_FILE).read_text())
        return {str(k): (str(v[0]), str(v[1])) for k, v in data.items()}
    except (OSError, ValueError, TypeError, IndexError):
        return {}


def in_use_layers(state_dir: Path) -> set[str]:
    """diff_ids of the layers that containers on this host stand on."""
    used: set[str] = set()
    for config in (state_dir / "containers").glob("*/config.json"):
        try:
            layers = json.loads(config.read_text()).get("layers", [])
        except (OSError, ValueError):
            continue
        used |= {"sha256:" + Path(os.path.realpath(p)).name for p in layers}  # l/<short> links resolved
    return used


async def _abort(context: Ctx, err: ImageError) -> NoReturn:
    code = grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(err, ImageNotFound) or (isinstance(err, StoreError) and "no image" in str(err)):
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(err, InvalidReference):
        code = grpc.StatusCode.INVALID_ARGUMENT
    await context.abort(code, str(err))
    raise AssertionError  # abort raises


class ImageAPI:
    """The image half of the agent API; needs `self.image_store` and `self.state_dir`."""

    image_store: ImageStore
    state_dir: Path

    def _info(self, record: dict[str, Any]) -> agent_pb2.ImageInfo:
        store = self.image_store
        config = store.blob_path(record["config_digest"]).read_text()
        try:
            size = store.image_size(record)
        except (StoreError, KeyError, ValueError):
            size = 0
        return agent_pb2.ImageInfo(
            reference=record["reference"], digest=record["digest"], id=record["config_digest"],
            size_bytes=size, created_ns=int(record.get("created_ns", 0)), diff_ids=record["diff_ids"],
            config_json=config,
        )

    def _keep_credentials(self, creds: Any) -> None:
        if not creds:
            return
        store = self.image_store
        for cred in creds:
            store.config.credentials[cred.registry] = (cred.username, cred.password)
        path = store.root / CREDENTIALS_FILE
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=store.root)
        with open(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            json.dump({k: list(v) for k, v in store.config.credentials.items()}, out)
        os.rename(tmp, path)

    async def _progress_stream(
        self, work: Any, context: Ctx
    ) -> AsyncIterator[agent_pb2.ImageProgress]:
        queue: asyncio.Queue[agent_pb2.ImageProgress | None] = asyncio.Queue()

        def progress(digest: str, phase: str, done: int, total: int) -> None:
            queue.put_nowait(agent_pb2.ImageProgress(layer=digest, phase=phase, done=done, total=total))

        async def run() -> str:
            try:
                return str(await work(progress))
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (item := await queue.get()) is not None:
                yield item
            reference = task.result()
        except ImageError as err:
            await _abort(context, err)
        finally:
            task.cancel()
        record = self.image_store.record(reference)
        yield agent_pb2.ImageProgress(phase="done", image=self._info(record) if record else None)

    async def ImagePull(
        self, request: agent_pb2.ImagePullRequest, context: Ctx
    ) -> AsyncIterator[agent_pb2.ImageProgress]:
        self._keep_credentials(request.credentials)

        async def work(progress: Any) -> str:
            image = await self.image_store.pull(request.reference, progress)
            return image.reference

        async for item in self._progress_stream(work, context):
            yield item

    async def ImagePush(
        self, request: agent_pb2.ImagePushRequest, context: Ctx
    ) -> AsyncIterator[agent_pb2.ImageProgress]:
        self._keep_credentials(request.credentials)

        async def work(progress: Any) -> str:
            await self.image_store.push(request.reference, None, progress)
            record = self.image_store.record(request.reference)
            return str(record["reference"]) if record else request.reference

        async for item in self._progress_stream(work, context):
            yield item

    async def ImageList(self, request: agent_pb2.ImageListRequest, context: Ctx) -> agent_pb2.ImageListResponse:
        try:
            return agent_pb2.ImageListResponse(images=[self._info(r) for r in self.image_store.records()])
        except ImageError as err:
            await _abort(context, err)

    async def ImageInspect(self, request: agent_pb2.ImageRef, context: Ctx) -> agent_pb2.ImageInfo:
        try:
            record = self.image_store.record(request.reference)
        except ImageError as err:
            await _abort(context, err)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no image {request.reference} on this host")
        return self._info(record)

    async def ImageTag(self, request: agent_pb2.ImageTagRequest, context: Ctx) -> agent_pb2.ImageInfo:
        try:
            name = self.image_store.tag(request.source, request.target)
            record = self.image_store.record(name)
        except ImageError as err:
            await _abort(context, err)
        assert record is not None
        return self._info(record)

    async def ImageRemove(self, request: agent_pb2.ImageRemoveRequest, context: Ctx) -> agent_pb2.ImageRemoved:
        try:
            used = in_use_layers(self.state_dir)
            removed = self.image_store.remove(request.reference, used, force=request.force)
            _, freed = await self.image_store.collect(used)
        except ImageError as err:
            await _abort(context, err)
        return agent_pb2.ImageRemoved(references=removed, reclaimed_bytes=freed)

    async def ImagePrune(self, request: agent_pb2.ImagePruneRequest, context: Ctx) -> agent_pb2.ImageRemoved:
        try:
            removed, freed = await self.image_store.collect(
                in_use_layers(self.state_dir), unused_images=request.all
            )
        except ImageError as err:
            await _abort(context, err)
        return agent_pb2.ImageRemoved(references=removed, reclaimed_bytes=freed)

    async def ImageCommit(self, request: agent_pb2.ImageCommitRequest, context: Ctx) -> agent_pb2.ImageInfo:
        from agent.images.archive import commit

        cdir = self.state_dir / "containers" / request.container_id
        try:
            layers = json.loads((cdir / "config.json").read_text())["layers"]
        except (OSError, ValueError, KeyError):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no container {request.container_id[:12]} on this host")
        wanted = ["sha256:" + Path(os.path.realpath(p)).name for p in layers]
        base = next((r["reference"] for r in self.image_store.records() if r["diff_ids"] == wanted), None)
        if base is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the container's image is no longer on this host; cannot commit on top of it",
            )
        try:
            image = await commit(self.image_store, cdir / "upper", base, request.reference)
            record = self.image_store.record(image.reference)
        except ImageError as err:
            await _abort(context, err)
        assert record is not None
        return self._info(record)

    async def _receive(self, chunks: AsyncIterator[agent_pb2.ImageChunk]) -> tuple[Path, str]:
        """Spool a client stream into a temporary file in the store; returns it and the name sent."""
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=self.image_store.blob_path("sha256:0").parent)
        reference = ""
        with open(fd, "wb") as out:
            async for chunk in chunks:
                reference = reference or chunk.reference
                out.write(chunk.data)
        return Path(tmp), reference

    async def ImageImport(
        self, request_iterator: AsyncIterator[agent_pb2.ImageChunk], context: Ctx
    ) -> agent_pb2.ImageInfo:
        from agent.images.archive import import_tarball

        path, reference = await self._receive(request_iterator)
        try:
            image = await import_tarball(self.image_store, path, reference)
            record = self.image_store.record(image.reference)
        except ImageError as err:
            await _abort(context, err)
        finally:
            path.unlink(missing_ok=True)
        assert record is not None
        return self._info(record)

    async def ImageLoad(
        self, request_iterator: AsyncIterator[agent_pb2.ImageChunk], context: Ctx
    ) -> agent_pb2.ImageListResponse:
        from agent.images.archive import load_archive

        path, reference = await self._receive(request_iterator)
        try:
            with open(path, "rb") as source:
                images = await load_archive(self.image_store, source, reference or None)
            records = [self.image_store.record(i.reference) for i in images]
        except ImageError as err:
            await _abort(context, err)
        finally:
            path.unlink(missing_ok=True)
        return agent_pb2.ImageListResponse(images=[self._info(r) for r in records if r])

    async def ImageSave(self, request: agent_pb2.ImageRef, context: Ctx) -> AsyncIterator[agent_pb2.ImageChunk]:
        from agent.images.archive import save_archive

        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=self.image_store.blob_path("sha256:0").parent)
        path = Path(tmp)
        try:
            out: IO[bytes]
            with open(fd, "wb") as out:
                try:
                    await asyncio.to_thread(save_archive, self.image_store, [request.reference], out)
                except ImageError as err:
                    await _abort(context, err)
            with open(path, "rb") as source:
                while data := source.read(CHUNK):
                    yield agent_pb2.ImageChunk(data=data)
        finally:
            path.unlink(missing_ok=True)


async def high_water_loop(store: ImageStore, state_dir: Path, limit_bytes: int, every_s: float = 60.0) -> None:
    """Keep the store under `limit_bytes` (the agent's --image-store-max): the least recently pulled images
    no container uses are removed, checked every `every_s` seconds."""
    import logging

    log = logging.getLogger("berth.agent.images")
    while True:
        try:
            removed = await store.enforce_high_water(limit_bytes, in_use_layers(state_dir))
            if removed:
                log.info("image store above %d bytes: removed %s", limit_bytes, ", ".join(removed))
        except ImageError as err:
            log.warning("image garbage collection failed: %s", err)
        await asyncio.sleep(every_s)
