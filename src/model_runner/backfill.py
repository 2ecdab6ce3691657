"""
Backfill: write GeoJSON files from disk to S3, one object per file, resumably, from this process or on Dask.

Every ``*.geojson``/``*.json`` FeatureCollection file and every ``*.ndjson``/``*.geojsonl`` file (one feature a line,
blank lines ignored) under the sources becomes the object ``<prefix>/<file stem>.geojson``, written through
:class:`~model_runner.sink.AsyncS3Sink`. Files are parsed incrementally (ijson, or line by line), so memory does not
grow with a file's size. The object is the features re-serialised compactly by orjson: equal in content to the
source, floats included (they are written in their shortest round-trip form), but not a byte copy of it.

Each object carries the SHA-256 of its source file as the user metadata ``source-sha256``; a resumed job skips the
files whose object already carries their digest, and rewrites those whose digest differs.

This module is the command's job and its report; the work is done by :mod:`model_runner.backfill_sources` (finding
and reading the files), :mod:`model_runner.backfill_writes` (writing them) and :mod:`model_runner.backfill_dask`
(batches on Dask), whose public names it re-exports.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import anyio
from tqdm import tqdm

from model_runner.backfill_dask import STOP_TIMEOUT_SECONDS, balanced_batches, run_batch, run_on_dask
from model_runner.backfill_sources import Outcome, Source, SourceError, find_sources, read_features
from model_runner.backfill_writes import (
    DEFAULT_CONCURRENCY,
    DIGEST_METADATA,
    BackfillError,
    Target,
    check_bucket,
    quiet_sink_errors,
    run_sources,
)

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DIGEST_METADATA",
    "STOP_TIMEOUT_SECONDS",
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

PROGRESS_SECONDS = 5.0

logger = logging.getLogger(__name__)


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

    def tell(self, message: str) -> None:
        """
        Tell something that is no file's outcome, such as an upload that could not be aborted.

        :param message: One line.
        """
        tqdm.write(message, file=self._err)

    def summary(self) -> str:
        """
        The summary line.

        :return: ``written W, skipped S, failed F``.
        """
        return self.summary_of(self.counts)

    @staticmethod
    def summary_of(counts: Counter[str]) -> str:
        """
        The summary line of some counts.

        :param counts: Files by status.
        :return: ``written W, skipped S, failed F``.
        """
        return f"written {counts['written']}, skipped {counts['skipped']}, failed {counts['failed']}"


@contextmanager
def _ctrl_c_requests_stop() -> Iterator[threading.Event]:
    """
    While inside, a Ctrl-C (SIGINT) sets the event given instead of raising KeyboardInterrupt wherever the main
    thread happens to be; the job stops at its own points, and the writes in flight are cancelled by anyio.

    Letting the event loop's runner handle SIGINT instead would cancel the job's task natively, which the sink's
    shielded aborts do not hold against, and on Python 3.10 (no ``Task.uncancel``) the runner cannot tell that
    cancellation from another: the job would end with a bare ``CancelledError``.

    :return: The event, set by a Ctrl-C; never set when not on the main thread, where no signal arrives.
    """
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def request_stop(signum: int, frame: FrameType | None) -> None:
        interrupted.set()

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _run(
    sources: Sequence[Source],
    target: Target,
    report: _Report,
    dask: str | None,
    interrupted: threading.Event,
    stop_timeout: float,
) -> None:
    """
    Check the bucket, then write the files, from this process or on Dask, until done or interrupted.

    :param sources: The files.
    :param target: Where and how to write.
    :param report: Told each file's outcome, and what could not be cleaned up.
    :param dask: A dask scheduler's address, ``local``, or `None` to write from this process.
    :param interrupted: Set by a Ctrl-C.
    :param stop_timeout: With ``dask``, how long a Ctrl-C waits for the batches.
    :raises BackfillError: If the job cannot run at all.
    """
    with quiet_sink_errors():
        anyio.run(check_bucket, target)
        if interrupted.is_set():
            return
        if dask is not None and sources:
            run_on_dask(
                sources, target, dask, report, tell=report.tell, interrupted=interrupted, stop_timeout=stop_timeout
            )
        else:
            anyio.run(partial(run_sources, sources, target, report, stop=interrupted.wait))


def backfill(
    paths: Sequence[str | Path],
    target: Target,
    *,
    dask: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
    stop_timeout: float = STOP_TIMEOUT_SECONDS,
) -> int:
    """
    Run the backfill command: write the files under ``paths``, then print ``written W, skipped S, failed F``.

    A Ctrl-C cancels the writes in flight, which store nothing, and still prints the summary; a rerun resumes. A
    write whose last request S3 had already applied is stored but not counted; the rerun skips it. On Dask, the
    files of a batch that fails (its worker died, the scheduler was lost) count as failed, and the multipart uploads
    it left are aborted.

    :param paths: Files and folders.
    :param target: Where and how to write.
    :param dask: A dask scheduler's address, or ``local`` for a local cluster; `None` to write from this process.
    :param out: Where the summary and dry-run plans go; standard output by default.
    :param err: Where failures and progress go; standard error by default.
    :param progress_seconds: How often progress is told when ``err`` is not a terminal.
    :param stop_timeout: With ``dask``, how long a Ctrl-C waits for all the batches together to stop.
    :return: The exit status: 0 if no file failed, 1 if some did or the job could not run, 130 if interrupted.
    """
    out, err = out or sys.stdout, err or sys.stderr
    try:
        sources, failures = find_sources(paths, target.prefix)
    except KeyboardInterrupt:
        print("interrupted while finding the files", file=err)
        print(_Report.summary_of(Counter()), file=out, flush=True)
        return 130
    files = len(sources) + len(failures)
    total_bytes = sum(source.size for source in sources) + sum(failure.bytes for failure in failures)
    status = 0
    with (
        _ctrl_c_requests_stop() as interrupted,
        closing(_Report(files, total_bytes, out, err, progress_seconds)) as report,
    ):
        for failure in failures:
            report(failure)
        try:
            _run(sources, target, report, dask, interrupted, stop_timeout)
        except BackfillError as error:
            print(f"backfill failed: {error}", file=err)
            return 1
        except Exception:
            # A fault of the job itself: what was done is still told, and the rerun resumes.
            logger.exception("backfill stopped")
            status = 1
    if interrupted.is_set():
        print(f"interrupted: {report.files - report.done} files not done", file=err)
        status = 130
    elif target.dry_run:
        print(f"dry run: would write {report.counts['planned']}, nothing written", file=out)
    if status == 0 and report.counts["failed"]:
        status = 1
    print(report.summary(), file=out, flush=True)
    return status
