"""
The four contenders, each called from the measured event loop the way a service would call it.

* ``seed``: the original model runner's ``S3Sink.write``, reproduced from awslabs/osml-model-runner
  (``aws/osml/model_runner/sink/s3_sink.py``): ``geojson.dumps(FeatureCollection(features))`` into a
  ``NamedTemporaryFile``, ``head_bucket`` before every write, then boto3 ``upload_file`` with the
  ``TransferConfig`` that file builds inline and ``ExtraArgs={"ACL": "bucket-owner-full-control"}``, on a
  client configured like its ``BotoConfig.default`` (standard retries, 15 attempts).
* ``floor``: aiobotocore sending bytes serialised before the clock starts: the network and server cost alone.
* ``AsyncS3Sink``: awaited directly.
* ``S3Sink``: the sync facade, through ``asyncio.to_thread``, as an async service would have to call it.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import boto3
import geojson
import orjson
from aiobotocore.session import AioSession
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from model_runner.sink import AsyncS3Sink, ClientSettings, S3Sink, SinkSettings
from model_runner.sink.async_s3_sink import object_key
from model_runner.sink.results import WriteResult

__all__ = [
    "CONTENDERS",
    "IMAGE_ID",
    "SEED_NOTES",
    "WARM_UP",
    "Contender",
    "Job",
    "SeedS3Sink",
    "make_contender",
]

MiB = 1024 * 1024

# The seed's upload_file configuration, as its S3Sink.write builds it for every write.
SEED_TRANSFER = {
    "multipart_threshold": 64 * MiB,
    "max_concurrency": 10,
    "multipart_chunksize": 128 * MiB,
    "use_threads": True,
}

SEED_NOTES = (
    "Seed: S3Sink.write of awslabs/osml-model-runner (aws/osml/model_runner/sink/s3_sink.py, commit "
    "666e6b8), reproduced. Its TransferConfig is built inline in that write, not in ServiceConfig: "
    "multipart_threshold 64 MiB, max_concurrency 10, multipart_chunksize 128 MiB, use_threads; its client "
    "has BotoConfig.default (standard retries, max_attempts 15). One change: payload_signing_enabled=False, "
    "since botocore SHA-256-signs every body over plain HTTP (the moto endpoint) but not over HTTPS (real "
    "S3); the floor and the sinks run the same way."
)

# The image id's last segment names the object, as in the seed; a uuid prefix like the model runner's job ids.
IMAGE_ID = "2b5f7c4e-0d1a-4c6e-9a8b-3f2e1d0c9b8a:s3://imagery/{name}.tif"

# Warm-up objects land beside the measured ones, under names that start with this: the harness does not count
# them.
WARM_UP = "warm-up"

Job = tuple[str, Any]


class SeedS3Sink:
    """
    The seed's synchronous S3 sink, reproduced for comparison.

    :param bucket: The bucket.
    :param prefix: The key prefix.
    """

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix
        config = Config(
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            retries={"max_attempts": 15, "mode": "standard"},
            s3={"payload_signing_enabled": False},
        )
        self.s3_client = boto3.client("s3", config=config)
        self.bytes_written = 0
        self._lock = threading.Lock()

    def write(self, image_id: str, features: list[Any]) -> bool:
        """
        Write a feature collection the way the seed does.

        :param image_id: The image id; its last ``/`` segment names the object.
        :param features: The features.
        :return: `True` when stored, `False` when the bucket is unusable.
        """
        collection = geojson.FeatureCollection(features)
        if not self.validate_s3_bucket():
            return False
        key = object_key(self.prefix, image_id)
        with tempfile.NamedTemporaryFile(delete=True) as temporary:
            with open(temporary.name, "w") as text:
                text.write(geojson.dumps(collection))
            self.s3_client.upload_file(
                Filename=temporary.name,
                Bucket=self.bucket,
                Key=key,
                Config=TransferConfig(**SEED_TRANSFER),  # type: ignore[arg-type]
                ExtraArgs={"ACL": "bucket-owner-full-control"},
            )
            size = os.path.getsize(temporary.name)
        with self._lock:
            self.bytes_written += size
        return True

    def validate_s3_bucket(self) -> bool:
        """
        ``head_bucket``, as the seed does before every write.

        :return: Whether the bucket can be used.
        """
        try:
            self.s3_client.head_bucket(Bucket=self.bucket)
        except ClientError:
            return False
        return True


_TINY = [
    {
        "type": "Feature",
        "id": str(i),
        "geometry": {"type": "Point", "coordinates": [0.0, 0.0]},
        "properties": {},
    }
    for i in range(3)
]


class Contender(ABC):
    """
    One way of writing collections, driven from the measured loop.

    :param bucket: The bucket.
    :param prefix: The key prefix of the measured writes.
    """

    key = ""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix
        # This project's sinks keep the WriteResults of their last run here, for write_results().
        self.results: list[WriteResult] = []

    async def __aenter__(self) -> Contender:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        return None

    def call_mode(self, writes: int) -> str:
        """
        How the measured loop calls this contender.

        :param writes: Writes in the workload.
        :return: ``await``, ``to_thread`` or ``direct`` (a blocking call on the loop).
        """
        return "await"

    def prepare(self, features: Iterable[Any]) -> Any:
        """
        Turn a collection's features into what this contender writes, before the clock starts.

        :param features: A list, or a generator for streamed workloads.
        :return: The payload of one write.
        """
        return features

    async def warm_up(self, writes: int) -> None:
        """
        Write tiny collections concurrently, as the measured writes will run: client created, worker threads
        and executor started, as in a service that has been writing for a while.

        :param writes: How many.
        """
        names = [IMAGE_ID.format(name=f"{WARM_UP}-{index:04d}") for index in range(writes)]
        jobs = [(name, self.prepare(_TINY)) for name in names]
        await self.run(jobs)

    def write_results(self) -> dict[str, Any] | None:
        """
        The figures of the last run as the contender's own :class:`WriteResult` objects give them, without a
        clock of the harness: ``seconds`` and ``upload_seconds`` of the longest write (for concurrent writes
        started together, the run's span), ``encode_seconds``, ``bytes``, ``features``, ``parts`` and
        ``retries`` summed over the writes.

        :return: The figures, or `None` for a contender that returns no :class:`WriteResult`.
        """
        if not self.results:
            return None
        return {
            "writes": len(self.results),
            "seconds": max(result.seconds for result in self.results),
            "upload_seconds": max(result.upload_seconds for result in self.results),
            "encode_seconds": sum(result.encode_seconds for result in self.results),
            **{
                name: sum(getattr(result, name) for result in self.results)
                for name in ("bytes", "features", "parts", "retries")
            },
        }

    @abstractmethod
    async def run(self, jobs: list[Job]) -> int:
        """
        Write every job's collection, concurrently when there are several.

        :param jobs: ``(image id, payload)`` pairs.
        :return: Bytes stored.
        """


class SeedContender(Contender):
    """The seed: a blocking call on the loop for one write, ``asyncio.to_thread`` for concurrent writes."""

    key = "seed"

    def __init__(self, bucket: str, prefix: str) -> None:
        super().__init__(bucket, prefix)
        self.sink = SeedS3Sink(bucket, prefix)

    def call_mode(self, writes: int) -> str:
        """
        How the seed is called.

        :param writes: Writes in the workload.
        :return: ``direct`` for one write, ``to_thread`` for several.
        """
        return "direct" if writes == 1 else "to_thread"

    def prepare(self, features: Iterable[Any]) -> Any:
        """
        The seed needs a list: a streamed collection is materialised before the clock starts.

        :param features: The features.
        :return: A list of them.
        """
        return features if isinstance(features, list) else list(features)

    async def run(self, jobs: list[Job]) -> int:
        """
        Write the collections.

        :param jobs: ``(image id, features)`` pairs.
        :return: Bytes stored.
        """
        before = self.sink.bytes_written
        if len(jobs) == 1:
            # As a sync caller inside a service would: the loop is blocked for the whole write.
            stored = [self.sink.write(*jobs[0])]
        else:
            stored = await asyncio.gather(*(asyncio.to_thread(self.sink.write, *job) for job in jobs))
        if not all(stored):
            raise RuntimeError("seed reported a failed write")
        return self.sink.bytes_written - before


def _client_config(settings: ClientSettings) -> Config:
    # As AsyncS3Sink configures its client: no SHA-256 of bodies over plain HTTP, checksums only if required.
    return Config(
        max_pool_connections=settings.max_pool_connections,
        s3={"payload_signing_enabled": False},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def _owned_body(data: memoryview) -> io.BytesIO:
    # A BytesIO that owns its buffer: one made from bytes shares them, and aiohttp's getbuffer() on it would
    # copy the whole body on the event loop, a cost of the harness and not of the upload.
    body = io.BytesIO()
    body.write(data)
    body.seek(0)
    return body


class FloorContender(Contender):
    """
    aiobotocore uploading pre-serialised bytes, with the sink's own plan: one ``PutObject`` below 8 MiB, else
    8 MiB parts with 6 in flight, on a client with the same pool and options.
    """

    key = "floor"

    def __init__(self, bucket: str, prefix: str) -> None:
        super().__init__(bucket, prefix)
        self.settings = SinkSettings()
        self._stack = AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> FloorContender:
        session = AioSession()
        self._client = await self._stack.enter_async_context(
            session.create_client("s3", config=_client_config(ClientSettings()))
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def prepare(self, features: Iterable[Any]) -> Any:
        """
        Serialise the collection and cut it into part bodies, before the clock starts.

        :param features: The features.
        :return: The bodies (one below the multipart threshold).
        """
        collection = {"type": "FeatureCollection", "features": list(features)}
        body = orjson.dumps(collection, option=orjson.OPT_SERIALIZE_NUMPY)
        size = len(body) if len(body) < self.settings.multipart_threshold else self.settings.part_size
        view = memoryview(body)
        return [_owned_body(view[offset : offset + size]) for offset in range(0, len(body), size)]

    async def run(self, jobs: list[Job]) -> int:
        """
        Upload the bodies.

        :param jobs: ``(image id, parts)`` pairs.
        :return: Bytes stored.
        """
        sizes = await asyncio.gather(*(self._upload(image_id, parts) for image_id, parts in jobs))
        return sum(sizes)

    async def _upload(self, image_id: str, parts: list[io.BytesIO]) -> int:
        key = object_key(self.prefix, image_id)
        arguments = self.settings.object_arguments()
        client = self._client
        size = sum(len(body.getbuffer()) for body in parts)
        if len(parts) == 1:
            await client.put_object(Bucket=self.bucket, Key=key, Body=parts[0], **arguments)
            return size
        created = await client.create_multipart_upload(Bucket=self.bucket, Key=key, **arguments)
        upload_id = created["UploadId"]
        slots = asyncio.Semaphore(self.settings.max_parts_in_flight)

        async def part(number: int, body: io.BytesIO) -> dict[str, Any]:
            async with slots:
                response = await client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
            return {"PartNumber": number, "ETag": response["ETag"]}

        stored = await asyncio.gather(*(part(number, body) for number, body in enumerate(parts, 1)))
        await client.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": stored}
        )
        return size


class AsyncSinkContender(Contender):
    """:class:`AsyncS3Sink` with its default settings, awaited from the loop."""

    key = "AsyncS3Sink"

    def __init__(self, bucket: str, prefix: str) -> None:
        super().__init__(bucket, prefix)
        self.sink = AsyncS3Sink(bucket, prefix)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.sink.aclose()

    async def run(self, jobs: list[Job]) -> int:
        """
        Write the collections.

        :param jobs: ``(image id, features)`` pairs.
        :return: Bytes stored.
        """
        self.results = await asyncio.gather(*(self.sink.write_with_result(*job) for job in jobs))
        return sum(result.bytes for result in self.results)


class FacadeContender(Contender):
    """The :class:`S3Sink` facade with default settings, through ``asyncio.to_thread`` (default executor)."""

    key = "S3Sink"

    def __init__(self, bucket: str, prefix: str) -> None:
        super().__init__(bucket, prefix)
        self.sink = S3Sink(bucket, prefix)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        # Versions of the facade that keep a client per sink have close(); later ones have nothing to close.
        close = getattr(self.sink, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    def call_mode(self, writes: int) -> str:
        """
        How the facade is called.

        :param writes: Writes in the workload.
        :return: ``to_thread``.
        """
        return "to_thread"

    async def run(self, jobs: list[Job]) -> int:
        """
        Write the collections.

        :param jobs: ``(image id, features)`` pairs.
        :return: Bytes stored.
        """
        write = self.sink.write_with_result
        self.results = await asyncio.gather(*(asyncio.to_thread(write, *job) for job in jobs))
        return sum(result.bytes for result in self.results)


CONTENDERS: dict[str, type[Contender]] = {
    kind.key: kind for kind in (SeedContender, FloorContender, AsyncSinkContender, FacadeContender)
}


def make_contender(key: str, bucket: str, prefix: str) -> Contender:
    """
    A contender by key.

    :param key: ``seed``, ``floor``, ``AsyncS3Sink``, ``S3Sink`` or a peer of the peers report.
    :param bucket: The bucket.
    :param prefix: The key prefix of the measured writes.
    :return: The contender, to use as an async context manager.
    """
    if key in CONTENDERS:
        return CONTENDERS[key](bucket, prefix)
    # Imported here: the peers import this module, and their libraries are only needed by the peers report.
    from benchmarks.peers.contenders import PEERS

    return PEERS[key](bucket, prefix)
