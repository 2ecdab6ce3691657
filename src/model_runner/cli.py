"""
The ``model-runner-sink`` command: ``demo`` writes and verifies collections on an embedded S3 server, ``backfill``
writes GeoJSON files from disk to S3.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from model_runner.backfill import DEFAULT_CONCURRENCY, STOP_TIMEOUT_SECONDS, Target, backfill
from model_runner.demo import MotoServer, synthetic_detections
from model_runner.sink import AsyncS3Sink, FeatureEncodingError, S3Sink, SinkError, WriteResult

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace], int]

_BUCKET = "model-runner-demo"
_PREFIX = "detections"
_SMALL_FEATURES = 500
_CONTENT_TYPE = "application/geo+json"
_MB = 1_000_000


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
    :return: A small and a large collection for each API, each for its own image.
    """
    shapes = [
        (api, kind, size, count)
        for api, kind in (("S3Sink", "sync"), ("AsyncS3Sink", "async"))
        for size, count in (("small", _SMALL_FEATURES), ("large", large))
    ]
    return [
        _Job(api, f"s3://imagery/scene-{seed}-{kind}-{size}.tif", count, seed + index)
        for index, (api, kind, size, count) in enumerate(shapes)
    ]


def run_demo(args: argparse.Namespace) -> int:
    """
    Write small and large collections through both sinks to an embedded S3 server, then read them back.

    :param args: The parsed ``demo`` options.
    :return: 0 if every object verified, else 1.
    """
    # boto3 comes with the demo's extra (moto), not with the library.
    import boto3

    jobs = _jobs(args.features, args.seed)
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
            failed = sum(not _verify(s3, _BUCKET, item) for item in written)
    except (SinkError, FeatureEncodingError, BotoCoreError, ClientError, RuntimeError) as error:
        print(f"demo failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if failed:
        print(f"demo failed: {failed} of {len(written)} objects differ from what was written", file=sys.stderr)
        return 1
    print(f"all {len(written)} objects verified")
    return 0


def _positive_int(text: str) -> int:
    """
    Parse a count given on the command line.

    :param text: A command-line value.
    :return: It as a positive integer.
    :raises argparse.ArgumentTypeError: If it is not one.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_seconds(text: str) -> float:
    """
    Parse a duration given on the command line.

    :param text: A command-line value.
    :return: It as a positive number of seconds.
    :raises argparse.ArgumentTypeError: If it is not one.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add the ``demo`` subcommand.

    :param commands: The subcommands to add ``demo`` to.
    """
    demo = commands.add_parser(
        "demo",
        help="write and verify collections on an embedded S3 server",
        description="Write small and large collections through S3Sink and AsyncS3Sink to an embedded S3 server, "
        "then read each back and check it holds exactly the features written.",
    )
    demo.add_argument(
        "--features",
        type=_positive_int,
        default=100_000,
        help="features in the large collections (default: %(default)s)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic detections (default: %(default)s)")
    demo.set_defaults(command=run_demo)


def run_backfill(args: argparse.Namespace) -> int:
    """
    Write GeoJSON files from disk to S3, one object per file, skipping those already written.

    :param args: The parsed ``backfill`` options.
    :return: 0 if no file failed, 1 if some did or the job could not run, 130 if interrupted.
    """
    target = Target(
        args.bucket,
        args.prefix,
        args.role,
        concurrency=args.concurrency,
        resume=args.resume,
        dry_run=args.dry_run,
    )
    return backfill(args.sources, target, dask=args.dask, stop_timeout=args.stop_timeout)


def _add_backfill(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add the ``backfill`` subcommand. Its options are the sources, the fields of
    :class:`~model_runner.backfill_writes.Target`, and where the job runs.

    :param commands: The subcommands to add ``backfill`` to.
    """
    description = (
        "Write every .geojson/.json FeatureCollection and every .ndjson/.geojsonl file (one feature a line) under "
        "the sources to S3 as PREFIX/<file stem>.geojson. Objects whose recorded source digest matches are skipped, "
        "so a rerun resumes. The last line of output is 'written W, skipped S, failed F'."
    )
    backfill_parser = commands.add_parser(
        "backfill", help="write GeoJSON files to S3, resumably", description=description
    )
    backfill_parser.set_defaults(command=run_backfill)
    backfill_parser.add_argument(
        "sources", nargs="+", metavar="SRC", help="files, or folders searched recursively; symbolic links are followed"
    )
    backfill_parser.add_argument("--bucket", required=True, help="the S3 bucket")
    backfill_parser.add_argument("--prefix", required=True, help="the key prefix of the objects")
    backfill_parser.add_argument("--role", metavar="ARN", help="IAM role to assume for writing")
    backfill_parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help="files written at once, per batch with --dask (default: %(default)s)",
    )
    backfill_parser.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="spread the files over dask workers: a scheduler address, or 'local' for a local cluster "
        "(needs the dask extra)",
    )
    backfill_parser.add_argument(
        "--stop-timeout",
        type=_positive_seconds,
        default=STOP_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="with --dask, how long a Ctrl-C waits for all the batches together to stop; the uploads of those still "
        "running then are aborted (default: %(default)g)",
    )
    backfill_parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="write every file, even those whose object is up to date",
    )
    backfill_parser.add_argument("--dry-run", action="store_true", help="list what would be written; write nothing")


def build_parser() -> argparse.ArgumentParser:
    """
    Build the command-line parser. A subcommand is added by a function like :func:`_add_demo`.

    :return: The parser of the command line; each subcommand sets ``command`` to the function that runs it.
    """
    parser = argparse.ArgumentParser(
        prog="model-runner-sink", description="Write GeoJSON detection results to Amazon S3."
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_demo(commands)
    _add_backfill(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    Run the ``model-runner-sink`` command.

    :param argv: The arguments, without the program name; by default ``sys.argv[1:]``.
    :return: The exit status.
    """
    args = build_parser().parse_args(argv)
    command: Command = args.command
    return command(args)
