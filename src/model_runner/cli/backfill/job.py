"""
The backfill job: :func:`backfill` finds the files, writes them from this process or on Dask, treats Ctrl-C as a
request to stop, and prints the summary line. See :mod:`model_runner.cli.backfill` for what it writes where.
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
from typing import TextIO

import anyio

from model_runner.cli.backfill import STOP_TIMEOUT_SECONDS
from model_runner.cli.backfill.dask import run_on_dask
from model_runner.cli.backfill.report import Report
from model_runner.cli.backfill.sources import Source, find_sources
from model_runner.cli.backfill.writes import BackfillError, Target, check_bucket, quiet_sink_errors, run_sources

__all__ = ["PROGRESS_SECONDS", "backfill"]

# How often progress is told when standard error is not a terminal.
PROGRESS_SECONDS = 5.0

logger = logging.getLogger(__name__)


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
    report: Report,
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
        sources, failures = find_sources(paths, target.prefix, target.output_format)
    except KeyboardInterrupt:
        print("interrupted while finding the files", file=err)
        print(Report.summary_of(Counter()), file=out, flush=True)
        return 130
    files = len(sources) + len(failures)
    total_bytes = sum(source.size for source in sources) + sum(failure.bytes for failure in failures)
    status = 0
    with (
        _ctrl_c_requests_stop() as interrupted,
        closing(Report(files, total_bytes, out, err, progress_seconds)) as report,
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
