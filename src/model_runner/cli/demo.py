"""
The ``demo`` command: write small and large collections through both sinks, and one through the open writer, to an
embedded S3 server, then read each back and check it holds exactly the features written. It needs the ``demo``
extra (moto, which brings boto3).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import boto3
import orjson
from botocore.exceptions import BotoCoreError, ClientError

from model_runner.cli.moto_server import MotoServer
from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, FeatureEncodingError, S3Sink, SinkError, WriteResult

__all__ = ["run_demo"]

_BUCKET = "model-runner-demo"
_PREFIX = "detections"
_SMALL_FEATURES = 500
_CONTENT_TYPE = "application/geo+json"
_MB = 1_000_000
# The writer's collection arrives in this many batches, from this many tasks, as tiles come out of a model.
_WRITER_BATCHES = 12
_WRITER_TASKS = 4


@dataclass(frozen=True)
class _Job:
    """One collection to write: which API writes it, and how to generate it."""

    api: str
    image_id: str
    count: int
    seed: int

    def features(self) -> list[dict[str, Any]]:
        """
        Generate the collection.

        :return: The collection's features, the same for the same job.
        """
        return list(synthetic_detections(self.count, seed=self.seed, image_id=self.image_id))


@dataclass(frozen=True)
class _Written:
    """What was written, remembered compactly so that large collections need not stay in memory."""

    api: str
    result: WriteResult
    count: int
    digest: str


def _digest(features: list[Any]) -> str:
    # orjson encodes equal content to equal bytes, so equal digests of the re-encoding mean equal features.
    return hashlib.sha256(orjson.dumps(features)).hexdigest()


def _record(job: _Job, result: WriteResult, features: list[dict[str, Any]]) -> _Written:
    """
    Print one write and remember it for verification.

    :param job: The job written.
    :param result: What the sink reported.
    :param features: The features written.
    :return: The record to verify the object against.
    """
    size = result.bytes / _MB
    print(
        f"wrote   {job.api:<11} {result.key:<44} {result.features:>8} features {size:8.2f} MB "
        f"{result.parts:>3} parts {result.seconds:7.2f} s {size / result.seconds:8.1f} MB/s",
        flush=True,
    )
    return _Written(job.api, result, len(features), _digest(features))


def _write_sync(bucket: str, jobs: Sequence[_Job]) -> list[_Written]:
    """
    Write collections through the synchronous facade, printing each write.

    :param bucket: The bucket.
    :param jobs: The collections to write with :class:`S3Sink`.
    :return: What was written.
    """
    # No close: S3Sink holds no connection of its own, its shared loop closes clients when the process exits.
    sink = S3Sink(bucket, _PREFIX)
    written = []
    for job in jobs:
        features = job.features()
        written.append(_record(job, sink.write_with_result(job.image_id, features), features))
    return written


async def _write_async(bucket: str, jobs: Sequence[_Job]) -> list[_Written]:
    """
    Write collections from asyncio, printing each write.

    :param bucket: The bucket.
    :param jobs: The collections to write with :class:`AsyncS3Sink`.
    :return: What was written.
    """
    written = []
    async with AsyncS3Sink(bucket, _PREFIX) as sink:
        for job in jobs:
            features = job.features()
            written.append(_record(job, await sink.write_with_result(job.image_id, features), features))
    return written


async def _write_opened(bucket: str, job: _Job) -> _Written:
    """
    Write one collection through :meth:`AsyncS3Sink.open`: its features added in batches from several tasks, as a
    model runner adds each tile's detections, printing the write.

    :param bucket: The bucket.
    :param job: The collection to write.
    :return: What was written: the batches in the order they were added.
    """
    features = job.features()
    size = -(-len(features) // _WRITER_BATCHES)
    batches = [features[start : start + size] for start in range(0, len(features), size)]
    added: list[dict[str, Any]] = []
    async with AsyncS3Sink(bucket, _PREFIX) as sink, sink.open(job.image_id) as writer:

        async def add_tiles(task: int) -> None:
            for batch in batches[task::_WRITER_TASKS]:
                # Batches land whole, in the order of their add calls.
                added.extend(batch)
                await writer.add(batch)

        await asyncio.gather(*(add_tiles(task) for task in range(_WRITER_TASKS)))
    assert writer.result is not None
    return _record(job, writer.result, added)


def _problems(s3: Any, bucket: str, written: _Written) -> list[str]:
    """
    Read an object back and compare it with what was written.

    :param s3: A boto3 S3 client.
    :param bucket: The bucket.
    :param written: What was written.
    :return: How the stored object differs from what was written; empty if it does not.
    """
    key = written.result.key
    response = s3.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    body = response["Body"].read()
    problems = []
    if written.result.features != written.count:
        problems.append(f"sink reported {written.result.features} features, {written.count} were written")
    if len(body) != written.result.bytes:
        problems.append(f"object is {len(body)} bytes, sink reported {written.result.bytes}")
    # S3 reports a checksum only for some objects (moto: multipart ones); when it does, it must be the sink's.
    if response.get("ChecksumCRC32", written.result.checksum) != written.result.checksum:
        problems.append(f"S3 reports CRC32 {response.get('ChecksumCRC32')}, sink reported {written.result.checksum}")
    if response.get("ContentType") != _CONTENT_TYPE:
        problems.append(f"ContentType is {response.get('ContentType')!r}")
    try:
        collection = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        return [*problems, f"body is not JSON: {error}"]
    features = collection.get("features") if isinstance(collection, dict) else None
    if not isinstance(features, list) or collection.get("type") != "FeatureCollection":
        problems.append("body is not a FeatureCollection")
    elif len(features) != written.count:
        problems.append(f"body holds {len(features)} features, {written.count} were written")
    elif _digest(features) != written.digest:
        problems.append("features differ from those written")
    if s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads"):
        problems.append("a multipart upload is left in progress")
    return problems


def _verify(s3: Any, bucket: str, written: _Written) -> bool:
    """
    Read an object back, compare it with what was written, and print the verdict.

    :param s3: A boto3 S3 client.
    :param bucket: The bucket.
    :param written: What was written.
    :return: `True` if the object is exactly what was written.
    """
    problems = _problems(s3, bucket, written)
    verdict = "; ".join(problems) or f"{written.count} features equal, {_CONTENT_TYPE}, no upload left in progress"
    print(f"{'FAILED' if problems else 'checked':<7} {written.api:<11} {written.result.key:<44} {verdict}", flush=True)
    return not problems


def _jobs(large: int, seed: int) -> list[_Job]:
    """
    Plan the demo's writes.

    :param large: Features in the large collections.
    :param seed: Seed of the first collection; the others follow it.
    :return: A small and a large collection for each API, each for its own image, and a large one for the writer.
    """
    shapes = [
        (api, kind, size, count)
        for api, kind in (("S3Sink", "sync"), ("AsyncS3Sink", "async"))
        for size, count in (("small", _SMALL_FEATURES), ("large", large))
    ]
    jobs = [
        _Job(api, f"s3://imagery/scene-{seed}-{kind}-{size}.tif", count, seed + index)
        for index, (api, kind, size, count) in enumerate(shapes)
    ]
    return [*jobs, _Job("open()", f"s3://imagery/scene-{seed}-opened.tif", large, seed + len(jobs))]


def run_demo(*, features: int, seed: int) -> int:
    """
    Write small and large collections through both sinks to an embedded S3 server, then read them back.

    :param features: Features in the large collections.
    :param seed: Seed of the first collection's synthetic detections; the others follow it.
    :return: 0 if every object verified, else 1.
    """
    jobs = _jobs(features, seed)
    try:
        with MotoServer() as server:
            server.apply_environment()
            s3 = boto3.client("s3")
            s3.create_bucket(Bucket=_BUCKET)
            print(f"embedded S3 at {server.endpoint_url}, bucket {_BUCKET}")
            sync_jobs = [job for job in jobs if job.api == "S3Sink"]
            async_jobs = [job for job in jobs if job.api == "AsyncS3Sink"]
            written = _write_sync(_BUCKET, sync_jobs)
            written += asyncio.run(_write_async(_BUCKET, async_jobs))
            written += [asyncio.run(_write_opened(_BUCKET, job)) for job in jobs if job.api == "open()"]
            failed = sum(not _verify(s3, _BUCKET, item) for item in written)
    except (SinkError, FeatureEncodingError, BotoCoreError, ClientError, RuntimeError) as error:
        print(f"demo failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if failed:
        print(f"demo failed: {failed} of {len(written)} objects differ from what was written", file=sys.stderr)
        return 1
    print(f"all {len(written)} objects verified")
    return 0
