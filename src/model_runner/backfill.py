"""
Backfill: write GeoJSON files from disk to S3, one object per file, resumably.

Every ``*.geojson``/``*.json`` FeatureCollection file and every ``*.ndjson``/``*.geojsonl`` file (one feature a
line, blank lines ignored) under the sources becomes the object ``<prefix>/<file stem>.geojson``, written through
:class:`~model_runner.sink.AsyncS3Sink`. Files are parsed incrementally (ijson, or line by line), so memory does not
grow with a file's size. The object is the features re-serialised compactly by orjson: equal in content to the
source, floats included (they are written in their shortest round-trip form), but not a byte copy of it.

Each object carries the SHA-256 of its source file as the user metadata ``source-sha256``; a resumed job skips the
files whose object already carries their digest, and rewrites those whose digest differs.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib
import logging
import signal
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal, TextIO

import anyio
import anyio.to_thread
import ijson
import orjson
from botocore.exceptions import BotoCoreError, ClientError
from tqdm import tqdm

from model_runner.sink import AsyncS3Sink, InvalidAssumedRoleException
from model_runner.sink.async_s3_sink import object_key

__all__ = [
    "DIGEST_METADATA",
    "BackfillError",
    "Outcome",
    "Source",
    "SourceError",
    "Target",
    "backfill",
    "balanced_batches",
    "find_sources",
    "read_features",
    "run_batch",
    "run_sources",
]

DIGEST_METADATA = "source-sha256"
COLLECTION_SUFFIXES = frozenset({".geojson", ".json"})
LINE_SUFFIXES = frozenset({".ndjson", ".geojsonl"})
DEFAULT_CONCURRENCY = 8
PROGRESS_SECONDS = 5.0
# Dask batches per worker thread: a few, so that a slow batch does not leave the other threads idle at the end.
BATCHES_PER_THREAD = 2
# How often a dask batch looks whether the client asked it to stop, and how long the client then waits for them.
STOP_POLL_SECONDS = 0.5
STOP_WAIT_SECONDS = 120.0
_READ_BYTES = 1024 * 1024

Status = Literal["written", "skipped", "failed", "planned"]

logger = logging.getLogger(__name__)
# Both sinks log their write failures here; the job reports them itself.
_sink_logger = logging.getLogger("model_runner.sink.s3_sink")
if ijson.backend != "yajl2_c":
    logger.warning("ijson uses its %s backend: reading collections is several times slower", ijson.backend)


class BackfillError(Exception):
    """The job cannot run at all: the bucket is missing or forbidden, the role cannot be assumed, no dask."""


class SourceError(Exception):
    """A source file cannot be read or is not what its suffix says; the message is the reason."""


@dataclass(frozen=True)
class Source:
    """
    A file to write.

    :param path: The file.
    :param size: Its size in bytes.
    """

    path: Path
    size: int

    @property
    def image_id(self) -> str:
        """
        The image id the file is written as.

        :return: The file's stem.
        """
        return self.path.stem


@dataclass(frozen=True)
class Outcome:
    """
    What became of a file.

    :param path: The file.
    :param status: ``written``, ``skipped`` (its object is up to date), ``failed``, or ``planned`` (a dry run
        would write it).
    :param key: The object key it maps to, when known.
    :param reason: Why it failed.
    :param bytes: Its size.
    """

    path: str
    status: Status
    key: str = ""
    reason: str = ""
    bytes: int = 0


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
    """

    bucket: str
    prefix: str
    role: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    resume: bool = True
    dry_run: bool = False

    def sink(self) -> AsyncS3Sink:
        """
        A sink writing to this target.

        :return: The sink.
        :raises ValueError: If the bucket name or the prefix cannot be used.
        """
        return AsyncS3Sink(self.bucket, self.prefix, self.role)


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _source_files(paths: Sequence[str | Path], failures: list[Outcome]) -> Iterator[Path]:
    suffixes = COLLECTION_SUFFIXES | LINE_SUFFIXES
    for given in map(Path, paths):
        if given.is_dir():
            yield from sorted(path for path in given.rglob("*") if _suffix(path) in suffixes and path.is_file())
        elif not given.exists():
            failures.append(Outcome(str(given), "failed", reason="no such file or directory"))
        elif _suffix(given) in suffixes:
            yield given
        else:
            failures.append(Outcome(str(given), "failed", reason="not a .geojson, .json, .ndjson or .geojsonl file"))


def find_sources(paths: Sequence[str | Path], prefix: str) -> tuple[list[Source], list[Outcome]]:
    """
    Find the files to write under files and folders (recursively).

    Files whose stems map to the same key are not written over each other: the first found is the source, the
    later ones fail.

    :param paths: Files and folders.
    :param prefix: The prefix of the keys.
    :return: The files to write, and the failures found on the way.
    """
    failures: list[Outcome] = []
    sources: list[Source] = []
    owners: dict[str, Path] = {}
    seen: set[Path] = set()
    for path in _source_files(paths, failures):
        try:
            real = path.resolve()
            size = path.stat().st_size
            key = object_key(prefix, path.stem)
        except (OSError, ValueError) as error:
            failures.append(Outcome(str(path), "failed", reason=str(error)))
            continue
        if real in seen:
            continue  # the same file given twice
        seen.add(real)
        owner = owners.setdefault(key, path)
        if owner is path:
            sources.append(Source(path, size))
        else:
            failures.append(Outcome(str(path), "failed", key, f"same object key as {owner}", size))
    return sources, failures


def _json_error(error: Exception) -> str:
    # yajl's messages go on to quote the text around the error, as bytes for invalid UTF-8: the first line says it.
    message = error.args[0] if error.args else ""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return str(message).strip().partition("\n")[0] or type(error).__name__


def _check_collection(file: IO[bytes]) -> None:
    # GeoJSON writers put "type" first, so this reads one buffer; a file putting it last is parsed one more time.
    try:
        kind = next(ijson.items(file, "type"), None)
    except (ijson.JSONError, ValueError) as error:
        raise SourceError(f"not valid JSON: {_json_error(error)}") from None
    if kind != "FeatureCollection":
        found = f"type {kind!r}" if kind is not None else "no top-level type"
        raise SourceError(f"not a GeoJSON FeatureCollection: {found}")


def _inspect(path: Path) -> str:
    """
    Check a file's top level, in a worker thread, and hash it.

    :param path: The file.
    :return: The hex SHA-256 of its bytes.
    :raises SourceError: If it cannot be read, or a collection file is not a FeatureCollection.
    """
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            if _suffix(path) not in LINE_SUFFIXES:
                _check_collection(file)
                file.seek(0)
            while chunk := file.read(_READ_BYTES):
                digest.update(chunk)
    except OSError as error:
        raise SourceError(f"cannot read: {error.strerror or error}") from None
    return digest.hexdigest()


def _collection_features(file: IO[bytes]) -> Iterator[Any]:
    count = 0
    try:
        for feature in ijson.items(file, "features.item", use_float=True):
            yield feature
            count += 1
    except (ijson.JSONError, ValueError) as error:
        raise SourceError(f"not valid JSON after feature {count}: {_json_error(error)}") from None


def _line_features(file: IO[bytes]) -> Iterator[Any]:
    for number, line in enumerate(file, 1):
        if not line.strip():
            continue
        try:
            feature = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            raise SourceError(f"line {number} is not valid JSON: {error}") from None
        if not isinstance(feature, dict):
            raise SourceError(f"line {number} is not a JSON object")
        yield feature


def read_features(path: Path) -> Generator[Any, None, None]:
    """
    Read a source file's features, incrementally: a FeatureCollection with ijson, NDJSON a line at a time.

    :param path: A ``.geojson``/``.json`` FeatureCollection or a ``.ndjson``/``.geojsonl`` file.
    :return: Its features, as dicts with float coordinates.
    :raises SourceError: If the file cannot be read or is not valid JSON; features before the error were given.
    """
    try:
        with path.open("rb") as file:
            yield from (_line_features if _suffix(path) in LINE_SUFFIXES else _collection_features)(file)
    except OSError as error:
        raise SourceError(f"cannot read: {error.strerror or error}") from None


def _reason(error: Exception) -> str:
    if isinstance(error, (SourceError, TypeError, ValueError)):
        return str(error)  # FeatureEncodingError is a TypeError naming the feature
    if isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in {"403", "AccessDenied"}:
        return f"{error} (resuming needs s3:GetObject and s3:ListBucket; --no-resume does without)"
    return f"{type(error).__name__}: {error}"


async def _backfill_one(sink: AsyncS3Sink, source: Source, target: Target) -> Outcome:
    path, key, size = str(source.path), sink.object_key(source.image_id), source.size
    try:
        digest = await anyio.to_thread.run_sync(_inspect, source.path)
        if target.resume:
            stored = await sink.object_metadata(source.image_id)
            if stored is not None and stored.get(DIGEST_METADATA) == digest:
                return Outcome(path, "skipped", key, bytes=size)
        if target.dry_run:
            return Outcome(path, "planned", key, bytes=size)
        # Closed here, not by the garbage collector: a cancelled write leaves the generator suspended, file open.
        with closing(read_features(source.path)) as features:
            await sink.write_with_result(source.image_id, features, metadata={DIGEST_METADATA: digest})
    except Exception as error:
        return Outcome(path, "failed", key, _reason(error), size)
    return Outcome(path, "written", key, bytes=size)


async def _cancel_when_stopped(stop: Callable[[float], bool], scope: anyio.CancelScope) -> None:
    # The signal is a blocking call (a dask Event), so it is polled in a thread, abandoned when the batch ends first.
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
        flight are then cancelled and this returns.
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
def _quiet_sink_errors() -> Iterator[None]:
    # The job reports each failure with its file; the sink's own error line would only say it again. Its debug
    # lines, which say what was stored, still go to whoever listens.
    def drop(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    _sink_logger.addFilter(drop)
    try:
        yield
    finally:
        _sink_logger.removeFilter(drop)


def run_batch(sources: Sequence[Source], target: Target, stop_event: str | None = None) -> list[Outcome]:
    """
    Write a batch of files on a dask worker, on an event loop and a sink of its own.

    :param sources: The files, readable from the worker.
    :param target: Where and how to write.
    :param stop_event: Name of a ``distributed.Event`` that, once set, stops the batch.
    :return: The outcome of each file done.
    """
    outcomes: list[Outcome] = []
    stop = None
    if stop_event is not None:
        distributed = _distributed()
        stop = distributed.Event(stop_event, client=distributed.get_client()).wait
    with _quiet_sink_errors():
        anyio.run(partial(run_sources, sources, target, outcomes.append, stop=stop))
    return outcomes


def balanced_batches(sources: Sequence[Source], count: int) -> list[list[Source]]:
    """
    Split files into batches of about equal bytes: each file, largest first, goes to the lightest batch.

    :param sources: The files.
    :param count: How many batches at most.
    :return: The non-empty batches.
    """
    heap: list[tuple[int, int, list[Source]]] = [(0, index, []) for index in range(min(count, len(sources)))]
    for source in sorted(sources, key=lambda source: source.size, reverse=True):
        size, index, batch = heapq.heappop(heap)
        batch.append(source)
        heapq.heappush(heap, (size + source.size, index, batch))
    return [batch for _, _, batch in sorted(heap, key=lambda entry: entry[1])]


def _distributed() -> Any:
    """
    Import distributed, which only ``--dask`` needs.

    :return: The module, untyped.
    :raises BackfillError: If the dask extra is not installed.
    """
    try:
        return importlib.import_module("distributed")
    except ImportError:
        raise BackfillError("--dask needs the dask extra: pip install model-runner-sink[dask]") from None


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    # Processes started meanwhile keep SIGINT ignored. A Ctrl-C reaches the terminal's whole process group, and
    # dask workers would die of it mid-upload; only this process acts on it, stopping the batches cleanly.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_on_dask(sources: Sequence[Source], target: Target, address: str, report: Callable[[Outcome], object]) -> None:
    """
    Write files in balanced batches on dask workers, reporting each batch's outcomes as it comes back.

    :param sources: The files, readable from the workers.
    :param target: Where and how to write.
    :param address: A scheduler's address, or ``local`` for a local cluster of this machine's processes.
    :param report: Called with each file's outcome.
    :raises BackfillError: If distributed is not installed or the scheduler cannot be reached.
    """
    distributed = _distributed()
    with ExitStack() as stack:
        try:
            if address == "local":
                with _sigint_ignored():
                    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None)
                stack.enter_context(cluster)
                client = stack.enter_context(distributed.Client(cluster))
            else:
                client = stack.enter_context(distributed.Client(address, timeout="20s"))
        except (OSError, TimeoutError) as error:
            raise BackfillError(f"cannot reach the dask scheduler at {address}: {error}") from None
        threads = max(1, sum(client.nthreads().values()))  # none yet: one batch, that waits for a worker
        batches = balanced_batches(sources, threads * BATCHES_PER_THREAD)
        stop = distributed.Event(f"model-runner-backfill-{uuid.uuid4().hex}", client=client)
        futures = client.map(run_batch, batches, target=target, stop_event=stop.name, pure=False)
        pending = set(futures)
        try:
            for future, outcomes in distributed.as_completed(futures, with_results=True):
                pending.discard(future)
                for outcome in outcomes:
                    report(outcome)
        except KeyboardInterrupt:
            stop.set()
            # The batches cancel their writes in flight, which store nothing, and send back what they finished.
            for future in pending:
                # A batch that failed or does not answer only goes uncounted: the interruption is what is told.
                with suppress(Exception):
                    for outcome in future.result(timeout=STOP_WAIT_SECONDS):
                        report(outcome)
            raise


async def _check_bucket(target: Target) -> None:
    try:
        usable = await target.sink().validate_s3_bucket()
    except (ValueError, InvalidAssumedRoleException) as error:
        raise BackfillError(str(error)) from None
    except (ClientError, BotoCoreError) as error:
        raise BackfillError(f"cannot reach bucket {target.bucket}: {error}") from None
    if not usable:
        raise BackfillError(f"bucket {target.bucket} does not exist or cannot be accessed")


class _Report:
    """Counts the outcomes, tells failures and dry-run plans as they come, and shows progress on stderr."""

    def __init__(self, files: int, total_bytes: int, out: TextIO, err: TextIO, seconds: float) -> None:
        self.counts: Counter[str] = Counter()
        self.files = files
        self._total_bytes = total_bytes
        self._bytes = 0
        self._out, self._err = out, err
        self._stopped = threading.Event()
        self._bar: tqdm[Any] | None = None
        if err.isatty():
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="backfill", file=err)
        else:
            threading.Thread(target=self._tick, args=(seconds,), name="backfill-progress", daemon=True).start()

    def __call__(self, outcome: Outcome) -> None:
        self.counts[outcome.status] += 1
        self._bytes += outcome.bytes
        if outcome.status == "failed":
            tqdm.write(f"failed {outcome.path}: {outcome.reason}", file=self._err)
        elif outcome.status == "planned":
            tqdm.write(f"would write {outcome.path} -> {outcome.key}", file=self._out)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.done}/{self.files} files, {self.counts['failed']} failed", refresh=False)
            self._bar.update(outcome.bytes)

    @property
    def done(self) -> int:
        """
        Files done.

        :return: How many outcomes were reported.
        """
        return self.counts.total()

    def _tick(self, seconds: float) -> None:
        while not self._stopped.wait(seconds):
            print(
                f"backfill: {self.done}/{self.files} files, {self._bytes / 1e6:.1f}/{self._total_bytes / 1e6:.1f} MB, "
                f"{self.counts['failed']} failed",
                file=self._err,
                flush=True,
            )

    def close(self) -> None:
        """Stop showing progress."""
        self._stopped.set()
        if self._bar is not None:
            self._bar.close()

    def summary(self) -> str:
        """
        The summary line.

        :return: ``written W, skipped S, failed F``.
        """
        return f"written {self.counts['written']}, skipped {self.counts['skipped']}, failed {self.counts['failed']}"


def backfill(
    paths: Sequence[str | Path],
    target: Target,
    *,
    dask: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
) -> int:
    """
    Run the backfill command: write the files under ``paths``, then print ``written W, skipped S, failed F``.

    A Ctrl-C cancels the writes in flight, which store nothing, and still prints the summary; a rerun resumes. A
    write whose last request S3 had already applied is stored but not counted; the rerun skips it.

    :param paths: Files and folders.
    :param target: Where and how to write.
    :param dask: A dask scheduler's address, or ``local`` for a local cluster; `None` to write from this process.
    :param out: Where the summary and dry-run plans go; standard output by default.
    :param err: Where failures and progress go; standard error by default.
    :param progress_seconds: How often progress is told when ``err`` is not a terminal.
    :return: The exit status: 0 if no file failed, 1 if some did or the job could not run, 130 if interrupted.
    """
    out, err = out or sys.stdout, err or sys.stderr
    sources, failures = find_sources(paths, target.prefix)
    files = len(sources) + len(failures)
    total_bytes = sum(source.size for source in sources) + sum(failure.bytes for failure in failures)
    try:
        with closing(_Report(files, total_bytes, out, err, progress_seconds)) as report:
            for failure in failures:
                report(failure)
            with _quiet_sink_errors():
                anyio.run(_check_bucket, target)
                if dask is not None and sources:
                    _run_on_dask(sources, target, dask, report)
                else:
                    anyio.run(run_sources, sources, target, report)
    except BackfillError as error:
        print(f"backfill failed: {error}", file=err)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {report.files - report.done} files not done", file=err)
        status = 130
    else:
        if target.dry_run:
            print(f"dry run: would write {report.counts['planned']}, nothing written", file=out)
        status = 0 if report.counts["failed"] == 0 else 1
    print(report.summary(), file=out, flush=True)
    return status
