"""
What the sinks are measured against (benchmarks/README.md describes each): the original model runner's write
("seed"), the network floor ("floor": bytes serialised before the clock) and issue 12's CPU floors.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import zlib
from base64 import b64encode
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager, ExitStack
from typing import TYPE_CHECKING, Any, ClassVar

import boto3
import geojson
import orjson
from aiobotocore.session import AioSession
from anyio.from_thread import BlockingPortal, start_blocking_portal
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from benchmarks.contenders import Contender, Job
from model_runner.sink import ClientSettings, SinkSettings
from model_runner.sink.async_s3_sink import object_key
from model_runner.sink.encoding import COLLECTION_HEAD, COLLECTION_TAIL

if TYPE_CHECKING:
    # Stubs, in the lint extra only.
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

__all__ = ["CONTENDERS", "FloorContender", "SeedContender", "ThreadFloor"]

MiB = 1024 * 1024

# The floors' checksums, in ONE place: the same as the sink's, so that the floors pay what the sink pays: each
# body's CRC32, and for a multipart object the whole object's CRC32 (FULL_OBJECT) on complete.
CREATE_CHECKSUM: dict[str, Any] = {"ChecksumAlgorithm": "CRC32", "ChecksumType": "FULL_OBJECT"}

# Part bodies with their checksum arguments, and the whole object's CRC32.
Bodies = tuple[list[tuple[io.BytesIO, dict[str, Any]]], int]


def body_checksum(crc: int) -> dict[str, Any]:
    """
    The checksum arguments of one ``PutObject`` or ``UploadPart``, as the sink sends them.

    :param crc: The CRC32 of the request's body.
    :return: Keyword arguments for the request.
    """
    return {"ChecksumCRC32": b64encode(crc.to_bytes(4, "big")).decode("ascii")}


def complete_checksum(object_crc: int) -> dict[str, Any]:
    """
    The checksum arguments of ``CompleteMultipartUpload``: the whole object's CRC32, as the sink sends it.

    :param object_crc: The CRC32 of the object's bytes.
    :return: Keyword arguments for the request.
    """
    return {**body_checksum(object_crc), "ChecksumType": "FULL_OBJECT"}


class SeedContender(Contender):
    """The seed's write, reproduced: a blocking call on the loop for one write, ``to_thread`` for several."""

    key = "seed"

    def __init__(self, bucket: str, prefix: str) -> None:
        super().__init__(bucket, prefix)
        config = Config(
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            retries={"max_attempts": 15, "mode": "standard"},
            s3={"payload_signing_enabled": False},
        )
        self.s3_client = boto3.client("s3", config=config)

    def mode(self, writes: int) -> str:
        """:return: ``direct`` for one write, as a sync caller in a service would; ``to_thread`` for several."""
        return "direct" if writes == 1 else "to_thread"

    @classmethod
    def prepare(cls, features: Iterable[Any]) -> Any:
        """:return: The features as a list (made before the clock): the seed needs one."""
        return features if isinstance(features, list) else list(features)

    async def run(self, jobs: list[Job]) -> int:
        """
        Write the collections.

        :param jobs: ``(image id, features)`` pairs.
        :return: Bytes stored.
        """
        if len(jobs) == 1:
            return self.write(*jobs[0])
        return sum(await asyncio.gather(*(asyncio.to_thread(self.write, *job) for job in jobs)))

    def write(self, image_id: str, features: list[Any]) -> int:
        """
        Write a feature collection as the seed's ``S3Sink.write`` does.

        :param image_id: The image id; its last ``/`` segment names the object.
        :param features: The features.
        :return: Bytes stored.
        """
        collection = geojson.FeatureCollection(features)
        # The seed checks the bucket before every write.
        try:
            self.s3_client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            raise RuntimeError("seed: bucket unusable") from error
        transfer = TransferConfig(
            multipart_threshold=64 * MiB, max_concurrency=10, multipart_chunksize=128 * MiB, use_threads=True
        )
        with tempfile.NamedTemporaryFile(delete=True) as temporary:
            with open(temporary.name, "w") as text:
                text.write(geojson.dumps(collection))
            self.s3_client.upload_file(
                Filename=temporary.name,
                Bucket=self.bucket,
                Key=object_key(self.prefix, image_id),
                Config=transfer,
                ExtraArgs={"ACL": "bucket-owner-full-control"},
            )
            return os.path.getsize(temporary.name)


def _owned_body(data: memoryview) -> io.BytesIO:
    # A BytesIO that owns its buffer: one made from bytes shares them, and aiohttp's getbuffer() on it would
    # copy the whole body on the event loop, a cost of the harness and not of the upload.
    body = io.BytesIO()
    body.write(data)
    body.seek(0)
    return body


def _encode(features: list[Any], batch: int) -> bytes:
    # As the sink encodes: orjson over batches of features, joined into one collection.
    pieces = [COLLECTION_HEAD]
    for start in range(0, len(features), batch):
        pieces += [b"," if start else b"", orjson.dumps(features[start : start + batch])[1:-1]]
    return b"".join([*pieces, COLLECTION_TAIL])


class FloorContender(Contender):
    """
    aiobotocore uploading bytes serialised before the clock starts, with the sink's plan: one ``PutObject`` below
    the multipart threshold, else parts of ``part_size``, ``max_parts_in_flight`` at once, on a client with the
    sink's pool and options.
    """

    key = "floor"
    #: Serialise in the clock (orjson in batches of 1,000 features), as the CPU floors do.
    encode_in_clock: ClassVar[bool] = False
    #: One PutObject whatever the size.
    single_put: ClassVar[bool] = False
    settings: ClassVar[SinkSettings] = SinkSettings()

    def __init__(self, bucket: str, prefix: str) -> None:
        super().__init__(bucket, prefix)
        self._client: S3Client | None = None

    async def __aenter__(self) -> FloorContender:
        self._client = await self._stack.enter_async_context(self._new_client())
        return self

    @staticmethod
    def _new_client() -> AbstractAsyncContextManager[S3Client]:
        # The sink's pool and request options, so that the floor pays what the sink pays per request.
        config = Config(
            max_pool_connections=ClientSettings().max_pool_connections,
            s3={"payload_signing_enabled": False},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return AioSession().create_client("s3", config=config)

    @classmethod
    def prepare(cls, features: Iterable[Any]) -> Any:
        """
        The features as a list; for the network floor, serialised and cut into checksummed part bodies.

        :param features: The features.
        :return: The payload of one write.
        """
        features = list(features)
        return features if cls.encode_in_clock else cls._bodies(_encode(features, len(features) or 1))

    @classmethod
    def _bodies(cls, body: bytes) -> Bodies:
        single = cls.single_put or len(body) < cls.settings.multipart_threshold
        size = len(body) if single else cls.settings.part_size
        view = memoryview(body)
        pieces = [view[offset : offset + size] for offset in range(0, len(body), size)]
        bodies, object_crc = [], 0
        for piece in pieces:
            # As the sink seals a part: its own CRC32 and the object's running one, in one loop.
            bodies.append((_owned_body(piece), body_checksum(zlib.crc32(piece))))
            object_crc = zlib.crc32(piece, object_crc)
        return bodies, object_crc

    async def run(self, jobs: list[Job]) -> int:
        """
        Upload the bodies (serialised here first for the CPU floors).

        :param jobs: ``(image id, payload)`` pairs.
        :return: Bytes stored.
        """
        return sum(await asyncio.gather(*(self._upload(image_id, payload) for image_id, payload in jobs)))

    async def _upload(self, image_id: str, payload: Any) -> int:
        parts, object_crc = self._bodies(_encode(payload, 1000)) if self.encode_in_clock else payload
        key, arguments = object_key(self.prefix, image_id), dict[str, Any](self.settings.object_arguments())
        assert self._client is not None
        client = self._client
        size = sum(len(body.getbuffer()) for body, _ in parts)
        if len(parts) == 1:
            body, checksum = parts[0]
            await client.put_object(Bucket=self.bucket, Key=key, Body=body, **checksum, **arguments)
            return size
        created = await client.create_multipart_upload(Bucket=self.bucket, Key=key, **CREATE_CHECKSUM, **arguments)
        upload_id = created["UploadId"]
        slots = asyncio.Semaphore(self.settings.max_parts_in_flight)

        async def part(number: int, body: io.BytesIO, checksum: dict[str, Any]) -> CompletedPartTypeDef:
            async with slots:
                response = await client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body, **checksum
                )
            return {"PartNumber": number, "ETag": response["ETag"], **checksum}  # type: ignore[typeddict-item]

        stored = await asyncio.gather(*(part(number, *piece) for number, piece in enumerate(parts, 1)))
        await client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": list(stored)},
            **complete_checksum(object_crc),
        )
        return size


class MultipartFloor(FloorContender):
    """Issue 12's CPU floor: orjson in batches of 1,000 in the clock, then 8 MiB parts, 4 at once."""

    key = "floor-multipart"
    encode_in_clock = True
    settings = SinkSettings(part_size=8 * MiB, multipart_threshold=8 * MiB, max_parts_in_flight=4)


class PutFloor(FloorContender):
    """The second CPU floor: the same encoding, then one ``PutObject`` of the whole collection."""

    key = "floor-put"
    encode_in_clock = True
    single_put = True


class ThreadFloor(MultipartFloor):
    """
    The multipart floor as a sync facade runs it: on an event loop of its own in another thread (anyio's blocking
    portal), the measured loop awaiting ``asyncio.to_thread`` of a blocking call into it, as it awaits ``S3Sink``.
    The least work a write from another thread can do; its stall is the to_thread row's floor.
    """

    key = "floor-thread"
    call_mode = "to_thread"
    _portal: BlockingPortal

    async def __aenter__(self) -> ThreadFloor:
        # The client is made, used and closed on the portal's loop. Closing it and the portal blocks: done from a
        # worker thread, as is opening the client.
        threads = ExitStack()
        self._stack.push_async_callback(asyncio.to_thread, threads.close)
        self._portal = threads.enter_context(start_blocking_portal())
        client = self._portal.wrap_async_context_manager(self._new_client())
        self._client = await asyncio.to_thread(threads.enter_context, client)
        return self

    async def run(self, jobs: list[Job]) -> int:
        """
        Upload the bodies from the portal's loop, blocking a worker thread of the measured loop meanwhile.

        :param jobs: ``(image id, payload)`` pairs.
        :return: Bytes stored.
        """
        return await asyncio.to_thread(self._portal.call, super().run, jobs)


CONTENDERS: dict[str, type[Contender]] = {
    kind.key: kind for kind in (SeedContender, FloorContender, MultipartFloor, PutFloor, ThreadFloor)
}
