"""
The backfill's writes: source files to S3 objects through :class:`~model_runner.sink.AsyncS3Sink`, resumably.

Each object carries the SHA-256 of its source file as the user metadata ``source-sha256``; a resumed job skips the
files whose object already carries their digest, and rewrites those whose digest differs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass

import anyio
import anyio.to_thread
from botocore.exceptions import BotoCoreError, ClientError

from model_runner.cli.backfill import DEFAULT_CONCURRENCY
from model_runner.cli.backfill.reading import inspect_source, read_features
from model_runner.cli.backfill.sources import Outcome, Source, SourceError
from model_runner.sink import AsyncS3Sink, InvalidAssumedRoleException, ObjectExistsError, SinkSettings, s3_sink
from model_runner.sink.encoding import OutputFormat
from model_runner.sink.responses import error_code

__all__ = [
    "DIGEST_METADATA",
    "BackfillError",
    "Target",
    "check_bucket",
    "quiet_sink_errors",
    "run_sources",
]

DIGEST_METADATA = "source-sha256"
# How often a write loop looks whether it was asked to stop.
STOP_POLL_SECONDS = 0.5

# Both sinks log their write failures here; the job reports them itself.
_sink_logger = s3_sink.logger


class BackfillError(Exception):
    """The job cannot run at all: the bucket is missing or forbidden, the role cannot be assumed, no dask."""


@dataclass(frozen=True)
class Target:
    """
    Where and how to write.

    :param bucket: The bucket.
    :param prefix: The prefix of the keys.
    :param role: IAM role ARN to assume, if any.
    :param concurrency: Files written at once (per batch with dask).
    :param resume: Skip the files whose object already carries their digest.
    :param dry_run: Tell what would be written, write nothing.
    :param output_format: `"geojson"`, a FeatureCollection per file, or `"geojsonseq"`, one feature a line at
        ``<prefix>/<file stem>.geojsonl``.
    :param overwrite: Replace an existing object whose digest differs; if not, a file whose key has an object is
        skipped (S3 refuses the write: the object stays as it is).
    """

    bucket: str
    prefix: str
    role: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    resume: bool = True
    dry_run: bool = False
    output_format: OutputFormat = "geojson"
    overwrite: bool = True

    def sink(self) -> AsyncS3Sink:
        """
        A sink writing to this target.

        :return: The sink.
        :raises ValueError: If the bucket name or the prefix cannot be used.
        """
        return AsyncS3Sink(self.bucket, self.prefix, self.role, settings=SinkSettings(output_format=self.output_format))


def _reason(error: Exception) -> str:
    if isinstance(error, (SourceError, TypeError, ValueError)):
        return str(error)  # FeatureEncodingError is a TypeError naming the feature
    if error_code(error) in {"403", "AccessDenied"}:
        return f"{error} (resuming needs s3:GetObject and s3:ListBucket; --no-resume does without)"
    return f"{type(error).__name__}: {error}"


async def _backfill_one(sink: AsyncS3Sink, source: Source, target: Target) -> Outcome:
    path, key, size = str(source.path), sink.object_key(source.image_id), source.size
    try:
        digest = await anyio.to_thread.run_sync(inspect_source, source.path)
        if target.resume:
            stored = await sink.object_metadata(source.image_id)
            if stored is not None and stored.get(DIGEST_METADATA) == digest:
                return Outcome(path, "skipped", key, bytes=size)
        if target.dry_run:
            return Outcome(path, "planned", key, bytes=size)
        # Closed here, not by the garbage collector: a cancelled write leaves the generator suspended, file open.
        with closing(read_features(source.path)) as features:
            await sink.write_with_result(
                source.image_id, features, metadata={DIGEST_METADATA: digest}, overwrite=target.overwrite
            )
    except ObjectExistsError:
        return Outcome(path, "skipped", key, bytes=size)
    except Exception as error:
        return Outcome(path, "failed", key, _reason(error), size)
    return Outcome(path, "written", key, bytes=size)


async def _cancel_when_stopped(stop: Callable[[float], bool], scope: anyio.CancelScope) -> None:
    # The signal is a blocking call (a dask Event, a threading Event), so it is polled in a thread, abandoned when
    # the writes end first.
    while not await anyio.to_thread.run_sync(stop, STOP_POLL_SECONDS, abandon_on_cancel=True):
        pass
    scope.cancel()


async def run_sources(
    sources: Sequence[Source],
    target: Target,
    report: Callable[[Outcome], object],
    *,
    stop: Callable[[float], bool] | None = None,
) -> None:
    """
    Write files, at most ``target.concurrency`` at once, reporting each as it is done.

    Cancelling this cancels the writes in flight, which store nothing.

    :param sources: The files.
    :param target: Where and how to write.
    :param report: Called with each file's outcome.
    :param stop: Waits up to the seconds given for a request to stop, and tells whether one came; the writes in
        flight are then cancelled (an anyio cancellation, which the sink's aborts are shielded from) and this
        returns.
    """
    sink = target.sink()
    pending = iter(sources)

    async def work() -> None:
        for source in pending:
            report(await _backfill_one(sink, source, target))

    async with anyio.create_task_group() as group:
        if stop is not None:
            group.start_soon(_cancel_when_stopped, stop, group.cancel_scope)
        async with anyio.create_task_group() as workers:
            for _ in range(min(target.concurrency, len(sources))):
                workers.start_soon(work)
        group.cancel_scope.cancel()


@contextmanager
def quiet_sink_errors() -> Iterator[None]:
    """
    Keep the sink's error lines quiet while the job runs: it reports each failure with its file, and the sink's
    line would only say it again. Its debug lines, which say what was stored, still go to whoever listens.
    """

    def drop(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    _sink_logger.addFilter(drop)
    try:
        yield
    finally:
        _sink_logger.removeFilter(drop)


async def check_bucket(target: Target) -> None:
    """
    Check that the job can write at all.

    :param target: Where to write.
    :raises BackfillError: If the bucket is missing or forbidden, cannot be reached, or the role cannot be assumed.
    """
    try:
        usable = await target.sink().validate_s3_bucket()
    except (ValueError, InvalidAssumedRoleException) as error:
        raise BackfillError(str(error)) from None
    except (ClientError, BotoCoreError) as error:
        raise BackfillError(f"cannot reach bucket {target.bucket}: {error}") from None
    if not usable:
        raise BackfillError(f"bucket {target.bucket} does not exist or cannot be accessed")
