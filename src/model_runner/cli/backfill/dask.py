"""
The backfill on Dask: the driver that submits the batches, one task each, collects them, stops them on Ctrl-C and
cleans up after batches that died mid-write.

Every batch's files are told once: as their batch reports them, as failed with the reason when the batch fails
(its worker died, the scheduler was lost), or, after a Ctrl-C, as not done. After a batch fails, and for the
batches that never came back, the driver aborts the multipart uploads left under their keys.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import anyio

from model_runner.cli.backfill import STOP_TIMEOUT_SECONDS
from model_runner.cli.backfill.batches import balanced_batches, import_distributed, object_keys, run_batch
from model_runner.cli.backfill.cleanup import abort_uploads
from model_runner.cli.backfill.sources import Outcome, Source
from model_runner.cli.backfill.writes import BackfillError, Target

__all__ = ["run_on_dask"]

# Dask batches per worker thread: a few, so that a slow batch does not leave the other threads idle at the end.
BATCHES_PER_THREAD = 2
# How often the driver looks for a Ctrl-C or a deadline while no batch is coming back.
_POLL_SECONDS = 0.1


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


@contextmanager
def _dask_client(distributed: Any, address: str) -> Iterator[Any]:
    """
    Connect to a scheduler, or start a local cluster; closed (a local cluster's workers ended) on leaving.

    :param distributed: The module.
    :param address: A scheduler's address, or ``local``.
    :return: The client.
    :raises BackfillError: If the scheduler cannot be reached.
    """
    with ExitStack() as stack:
        try:
            if address == "local":
                with _sigint_ignored():
                    # No second run of a batch whose worker died: the batch fails at once, and the driver aborts
                    # what it was writing.
                    cluster = distributed.LocalCluster(
                        n_workers=2,
                        threads_per_worker=2,
                        dashboard_address=None,
                        scheduler_kwargs={"allowed_failures": 0},
                    )
                stack.enter_context(cluster)
                client = stack.enter_context(distributed.Client(cluster))
            else:
                client = stack.enter_context(distributed.Client(address, timeout="20s"))
        except (OSError, TimeoutError) as error:
            raise BackfillError(f"cannot reach the dask scheduler at {address}: {error}") from None
        yield client


def _describe(error: Exception) -> str:
    # Dask's messages go on for lines of advice: the first says what happened.
    first_line = str(error).strip().partition("\n")[0]
    return f"{type(error).__name__}: {first_line}"


def _failure(error: Exception, distributed: Any) -> str:
    if isinstance(error, distributed.KilledWorker):
        return "the dask worker writing its batch died (KilledWorker); a rerun resumes"
    return f"its dask batch failed: {_describe(error)}"


def _waiting_until(deadline: float) -> Callable[[float], bool]:
    def wait(seconds: float) -> bool:
        time.sleep(seconds)
        return time.monotonic() >= deadline

    return wait


class _Batches:
    """
    The driver's account of the batches it submitted: each file is reported once, and the keys of the batches that
    failed or never came back are cleaned of the multipart uploads their workers left.

    :param distributed: The module.
    :param target: Where and how to write.
    :param report: Called with each file's outcome.
    :param tell: Called with what the driver could not clean up.
    """

    def __init__(
        self, distributed: Any, target: Target, report: Callable[[Outcome], object], tell: Callable[[str], object]
    ) -> None:
        self._distributed = distributed
        self._target = target
        self._report = report
        self._tell = tell
        self.pending: dict[Any, list[Source]] = {}
        self.stop: Any = None

    def submit(self, client: Any, batches: Sequence[list[Source]]) -> Any:
        """
        Submit each batch as a task.

        :param client: The dask client.
        :param batches: The batches.
        :return: A ``distributed.as_completed`` over their futures.
        """
        job = f"model-runner-backfill-{uuid.uuid4().hex}"
        self.stop = self._distributed.Event(f"{job}-stop", client=client)
        for index, batch in enumerate(batches):
            future = client.submit(run_batch, batch, self._target, self.stop.name, f"{job}-started-{index}", pure=False)
            self.pending[future] = batch
        return self._distributed.as_completed(list(self.pending))

    def receive(self, completed: Any, stop_waiting: Callable[[float], bool]) -> None:
        """
        Take the batches as they come back, until all have or ``stop_waiting`` says to give up.

        :param completed: The ``as_completed`` of :meth:`submit`.
        :param stop_waiting: Waits about the seconds given, and tells whether to stop waiting.
        """
        while not completed.is_empty():
            if completed.has_ready():
                for future in completed.next_batch(block=False):
                    self._collect(future)
            elif stop_waiting(_POLL_SECONDS):
                return

    def _collect(self, future: Any) -> None:
        batch = self.pending.pop(future)
        try:
            outcomes = future.result()
        except Exception as error:
            self._fail(batch, _failure(error, self._distributed))
            # The scheduler runs it no more: nothing of this job writes these keys now.
            self._abort_uploads(batch)
        else:
            for outcome in outcomes:
                self._report(outcome)

    def _fail(self, batch: Sequence[Source], reason: str) -> None:
        for source, key in zip(batch, object_keys(self._target, batch), strict=True):
            self._report(Outcome(str(source.path), "failed", key, reason, source.size))

    def _abort_uploads(self, sources: Sequence[Source]) -> None:
        try:
            problems = anyio.run(abort_uploads, self._target, object_keys(self._target, sources))
        except Exception as error:
            problems = [f"cannot abort the multipart uploads of {len(sources)} files: {_describe(error)}"]
        for problem in problems:
            self._tell(problem)

    def abandon(self, reason: str | None) -> None:
        """
        Give up the batches that did not come back, once the dask client is closed: a local cluster's workers are
        gone then, so what they were writing is left in progress and is aborted here.

        :param reason: Why their files failed; `None` for files that are just not done (after a Ctrl-C).
        """
        left = [source for batch in self.pending.values() for source in batch]
        self.pending.clear()
        if reason is not None:
            self._fail(left, reason)
        if left:
            self._abort_uploads(left)


def run_on_dask(
    sources: Sequence[Source],
    target: Target,
    address: str,
    report: Callable[[Outcome], object],
    *,
    tell: Callable[[str], object],
    interrupted: threading.Event,
    stop_timeout: float = STOP_TIMEOUT_SECONDS,
) -> None:
    """
    Write files in balanced batches on dask workers, reporting each batch's outcomes as it comes back.

    Whatever ends the job, every file is reported once or is left not done after a Ctrl-C, and no multipart upload
    of a batch that failed or never came back is left in progress (short of the driver itself being killed).

    :param sources: The files, readable from the workers.
    :param target: Where and how to write.
    :param address: A scheduler's address, or ``local`` for a local cluster of this machine's processes.
    :param report: Called with each file's outcome.
    :param tell: Called with what could not be cleaned up, one line each.
    :param interrupted: Set to stop: the batches are asked to stop, and all are waited for together, up to
        ``stop_timeout`` seconds; the files of those that did not come back by then are not done.
    :param stop_timeout: How long to wait for the batches after ``interrupted`` is set.
    :raises BackfillError: If distributed is not installed or the scheduler cannot be reached.
    """
    distributed = import_distributed()
    batches = _Batches(distributed, target, report, tell)
    reason: str | None = None
    try:
        with _dask_client(distributed, address) as client:
            threads = max(1, sum(client.nthreads().values()))  # none yet: one batch, that waits for a worker
            completed = batches.submit(client, balanced_batches(sources, threads * BATCHES_PER_THREAD))
            batches.receive(completed, interrupted.wait)
            if batches.pending:
                # The batches cancel their writes in flight, which store nothing, and send back what they finished.
                tell(f"stopping: waiting up to {stop_timeout:g} s for {len(batches.pending)} batches")
                batches.stop.set()
                batches.receive(completed, _waiting_until(time.monotonic() + stop_timeout))
                if batches.pending:
                    tell(f"{len(batches.pending)} batches did not stop in time: their uploads in progress are aborted")
    except BackfillError:
        raise
    except Exception as error:
        reason = f"the dask job failed: {_describe(error)}"
    finally:
        batches.abandon(reason)
