"""S3Sink: the seed's documented synchronous sink, a thin shell over
:class:`~model_runner.sink.async_s3_sink.AsyncS3Sink`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_for_futures
from datetime import datetime
from functools import partial
from itertools import islice
from typing import Any, TypeAlias, TypeVar

import anyio
from anyio.from_thread import BlockingPortal
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from botocore.config import Config

from model_runner.api import SinkMode
from model_runner.sink.async_s3_sink import AsyncS3Sink, ProgressCallback
from model_runner.sink.encoding import FeatureSource
from model_runner.sink.exceptions import SinkError
from model_runner.sink.metrics import SinkMetrics
from model_runner.sink.results import WriteResult
from model_runner.sink.settings import SinkSettings
from model_runner.sink.sink import Sink

__all__ = ["S3Sink", "logger"]

logger = logging.getLogger(__name__)
"""Where both sinks log, as the seed did: each failed write at error level, each stored object at debug level."""

T = TypeVar("T")

# Features pulled on the caller's thread travel to the write a batch at a time; a failure to pull travels instead.
_Batch: TypeAlias = "list[Any] | Exception"

# A blocked caller wakes this often, so that Ctrl-C reaches it on every platform (Windows does not interrupt a
# blocking wait) and its deadline is checked.
_WAIT_SLICE_SECONDS = 0.1
# How long an interrupted, timed out or exiting call waits for its write to end: as long as the uploader itself
# allows an abort to take.
_CANCEL_WAIT_SECONDS = 60.0
# Closing connections at exit must not hold the interpreter up if S3 is unreachable.
_EXIT_CLOSE_SECONDS = 5.0
# The private loop thread already runs the request path beside the caller's threads: with one worker thread
# encoding and sealing, the caller's loop thread queues behind one busy thread fewer for the GIL and the cores
# (to_thread(write, 100k features), median worst stall 9.8 ms against 13.5 ms with two, on 2 cores).
_FACADE_SETTINGS = SinkSettings(max_worker_threads=1)


class _Call:
    """
    One facade call running on the private loop, which its caller can cancel at any moment of its life.

    It is cancelled through a cancel scope of its own rather than the portal's future, so that a call interrupted
    while the portal is still starting it, before its future is known, is cancelled too.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, what: str, timeout: float | None) -> None:
        self.future: Future[Any] = Future()
        self.finished = threading.Event()
        self._loop = loop
        self._what = what
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._scope: anyio.CancelScope | None = None
        self._cancel_requested = False

    async def run(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            with anyio.CancelScope() as scope:
                # Set the scope, then read the request; cancel() does the reverse: one of them sees the other.
                self._scope = scope
                if self._cancel_requested:
                    scope.cancel()
                return await function(*args)
            raise anyio.get_cancelled_exc_class()()  # cancelled by its caller, who no longer waits for a result
        finally:
            self.finished.set()

    def cancel(self) -> None:
        """Cancel the call and wait (bounded) until it has ended: a cancelled write first aborts its upload."""
        self._cancel_requested = True
        scope = self._scope
        if scope is None:
            return  # not started: it will see the request and end before any request to S3
        with contextlib.suppress(RuntimeError):  # the loop has closed, and the call with it
            self._loop.call_soon_threadsafe(scope.cancel)
        deadline = time.monotonic() + _CANCEL_WAIT_SECONDS
        while not self.finished.wait(min(_WAIT_SLICE_SECONDS, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                logger.warning("%s was cancelled but had not ended after %.0f s", self._what, _CANCEL_WAIT_SECONDS)
                return

    @property
    def has_deadline(self) -> bool:
        return self._deadline is not None

    def expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def wait(self, *futures: Future[Any]) -> None:
        """
        Wait until one of the futures is done.

        :raises TimeoutError: If the call's deadline passes first.
        """
        while not any(future.done() for future in futures):
            slice_seconds = _WAIT_SLICE_SECONDS
            if self._deadline is not None:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise self.timed_out()
                slice_seconds = min(slice_seconds, remaining)
            wait_for_futures(futures, slice_seconds, return_when=FIRST_COMPLETED)

    def join(self, first: Callable[[], object] | None = None) -> Any:
        """
        Do ``first`` (e.g. feed the call its features), then wait for the call's result. Anything that ends the
        wait early (Ctrl-C, the deadline) cancels the call, waits for it to end, then propagates.

        :return: What the call returned.
        :raises TimeoutError: If the call's deadline passes first.
        """
        try:
            if first is not None:
                first()
            self.wait(self.future)
        except BaseException:
            self.cancel()
            raise
        return self.result()

    def timed_out(self) -> TimeoutError:
        return TimeoutError(f"{self._what} did not finish within {self._timeout:g} s and was cancelled")

    def result(self) -> Any:
        if self.future.cancelled():
            raise SinkError(f"{self._what} was cancelled: the interpreter is exiting")
        return self.future.result()


class _LoopThread:
    """One private event loop for every facade in the process, in a daemon thread.

    Daemon, because interpreter shutdown joins non-daemon threads before it runs ``atexit``: a loop thread that
    only ``atexit`` could stop would make every script that used a sink hang at exit.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._portal: BlockingPortal | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="model-runner-sink-loop", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        anyio.run(self._serve)

    async def _serve(self) -> None:
        async with BlockingPortal() as portal:
            self._portal = portal
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await portal.sleep_until_stopped()

    def start(self, what: str, timeout: float | None, function: Callable[..., Awaitable[Any]], *args: Any) -> _Call:
        """
        Start a call on the loop.

        :param what: What the call does, for errors and logs.
        :param timeout: Seconds before the call is cancelled; `None` for no limit.
        :param function: The coroutine function to run, with its positional arguments.
        :return: The call, to wait for or cancel.
        """
        self.check_caller()
        assert self._portal is not None and self._loop is not None
        call = _Call(self._loop, what, timeout)
        try:
            call.future = self._portal.start_task_soon(call.run, function, *args)
        except BaseException:
            call.cancel()
            raise
        return call

    def check_caller(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("S3Sink cannot be called from its own event loop; use AsyncS3Sink there")

    def spawn(self, function: Callable[..., Awaitable[T]], *args: Any) -> Future[T]:
        assert self._portal is not None
        return self._portal.start_task_soon(function, *args)

    def call(self, what: str, timeout: float | None, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """
        Run a call on the loop and wait for it. Anything that ends the wait early (Ctrl-C, the deadline) cancels
        the call, waits for it to end, then propagates.

        :return: What the call returned.
        :raises TimeoutError: If it did not finish within ``timeout`` seconds.
        """
        result: T = self.start(what, timeout, function, *args).join()
        return result

    def close(self) -> None:
        # Cancelling what is still running lets each write abort its upload; the loop ends once they have, which
        # cancels the tasks keeping shared clients: they close them.
        assert self._portal is not None
        with contextlib.suppress(RuntimeError):  # the loop has already stopped
            self._portal.call(self._portal.stop, True)
        self._thread.join(_CANCEL_WAIT_SECONDS + _EXIT_CLOSE_SECONDS)


def _pulled_by_caller(features: object) -> bool:
    # Lists and tuples are not tied to a thread; async iterables belong to the loop; anything that is not a
    # collection of features is refused by the write itself.
    return isinstance(features, Iterable) and not isinstance(
        features, (list, tuple, str, bytes, bytearray, Mapping, AsyncIterable)
    )


def _pull(iterator: Iterator[Any], count: int, call: _Call) -> tuple[_Batch, bool]:
    """
    Pull the next batch of features on this thread.

    :return: The batch, or the error the iterator raised; whether the iterator is exhausted.
    """
    batch: list[Any] = []
    try:
        if not call.has_deadline:
            batch.extend(islice(iterator, count))
            return batch, len(batch) < count
        # With a deadline, it is checked between features: a slow source must not hold the caller past it.
        for feature in iterator:
            batch.append(feature)
            if len(batch) >= count or call.expired():
                return batch, False
    except Exception as error:
        return error, True
    return batch, True


async def _unbatched(batches: MemoryObjectReceiveStream[_Batch]) -> AsyncIterator[Any]:
    async for batch in batches:
        if isinstance(batch, Exception):
            raise batch
        for feature in batch:
            yield feature


async def _write_fed(
    write: Callable[[FeatureSource], Awaitable[T]],
    send: MemoryObjectSendStream[_Batch],
    receive: MemoryObjectReceiveStream[_Batch],
) -> T:
    # Closing both ends when the write ends wakes a caller handing over a batch, whatever the write's outcome.
    with send, receive:
        return await write(_unbatched(receive))


def _call_fed(
    loop_thread: _LoopThread,
    what: str,
    timeout: float | None,
    write: Callable[[FeatureSource], Awaitable[T]],
    features: Iterable[Any],
    batch_features: int,
) -> T:
    """
    Run a write on the loop with its features pulled on this thread, which would only wait otherwise, and handed
    over a batch at a time as the write takes them: memory stays bounded, and a source tied to this thread (an
    sqlite3 cursor, a thread-local session) works.

    :return: What the write returned.
    :raises TimeoutError: If it did not finish within ``timeout`` seconds.
    """
    loop_thread.check_caller()
    iterator = iter(features)
    send, receive = anyio.create_memory_object_stream[_Batch](1)
    call = loop_thread.start(what, timeout, _write_fed, write, send, receive)
    result: T = call.join(partial(_feed, loop_thread, call, iterator, send, batch_features))
    return result


def _feed(
    loop_thread: _LoopThread, call: _Call, iterator: Iterator[Any], send: MemoryObjectSendStream[_Batch], count: int
) -> None:
    while True:
        batch, exhausted = _pull(iterator, count, call)
        if call.expired():
            raise call.timed_out()
        if (isinstance(batch, Exception) or batch) and not _hand_over(loop_thread, call, send.send, batch):
            return
        if exhausted:
            _hand_over(loop_thread, call, send.aclose)
            return


def _hand_over(loop_thread: _LoopThread, call: _Call, step: Callable[..., Awaitable[None]], *args: Any) -> bool:
    """
    Run a step of the hand-over on the loop, and wait until it is done or the write has ended.

    :return: Whether the write goes on.
    """
    handed = loop_thread.spawn(step, *args)
    call.wait(handed, call.future)
    # A step fails only because the write has ended and closed the stream: its own outcome tells why.
    return not call.future.done() and not handed.cancelled() and handed.exception() is None


def _checked(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    return timeout


_loop_thread: _LoopThread | None = None
_loop_thread_lock = threading.Lock()


def _shared_loop() -> _LoopThread:
    global _loop_thread
    with _loop_thread_lock:
        if _loop_thread is None:
            _loop_thread = _LoopThread()
            atexit.register(_close_shared_loop)
        return _loop_thread


def _close_shared_loop() -> None:
    global _loop_thread
    with _loop_thread_lock:
        loop_thread, _loop_thread = _loop_thread, None
    if loop_thread is not None:
        loop_thread.close()


def _forget_loop_after_fork() -> None:
    # A forked child has no copy of the loop thread: it starts its own on first use.
    global _loop_thread, _loop_thread_lock
    _loop_thread = None
    _loop_thread_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_loop_after_fork)


class S3Sink(Sink):
    """
    A sink for writing aggregated GeoJSON feature collections to an S3 bucket.

    This class handles uploading GeoJSON data to a specified S3 bucket, optionally using an
    assumed IAM role for accessing the bucket. Writes run on one private event loop shared by every
    ``S3Sink`` in the process, so a sink can be used from plain scripts, from many threads at once and from
    code running inside another event loop; a process that used it exits by itself. A call blocks its thread until
    its write has ended: Ctrl-C, a ``timeout=`` running out or the interpreter exiting cancel the write, which
    aborts its upload before the call raises.

    :param bucket: The name of the S3 bucket.
    :param prefix: The prefix within the bucket where the files will be stored.
    :param assumed_role: Optional IAM role ARN to assume for accessing the bucket.
    :param settings: Tuning and object options; by default ``SinkSettings(max_worker_threads=1)``.
    :param endpoint_url: S3 endpoint; by default the standard configuration (``AWS_ENDPOINT_URL_S3``...).
    :param sts_endpoint_url: STS endpoint for ``assumed_role``; by default the standard configuration.
    :param region_name: Region; by default ``AWS_REGION``, then the standard configuration, then us-east-1.
    :param client_config: A botocore config merged over the sink's own.
    :param clock: What time it is, for credential expiry; for tests and simulations.
    :param metrics: Hooks told of every write, part and retry; called on the sink's private loop thread.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        assumed_role: str | None = None,
        *,
        settings: SinkSettings | None = None,
        endpoint_url: str | None = None,
        sts_endpoint_url: str | None = None,
        region_name: str | None = None,
        client_config: Config | None = None,
        clock: Callable[[], datetime] | None = None,
        metrics: SinkMetrics | None = None,
    ) -> None:
        self._sink = AsyncS3Sink(
            bucket,
            prefix,
            assumed_role,
            settings=settings or _FACADE_SETTINGS,
            endpoint_url=endpoint_url,
            sts_endpoint_url=sts_endpoint_url,
            region_name=region_name,
            client_config=client_config,
            clock=clock,
            metrics=metrics,
        )

    def __repr__(self) -> str:
        return f"S3Sink(bucket={self.bucket!r}, prefix={self.prefix!r}, assumed_role={self.assumed_role!r})"

    @property
    def bucket(self) -> str:
        """The name of the S3 bucket."""
        return self._sink.bucket

    @property
    def prefix(self) -> str:
        """The prefix within the bucket where the files will be stored."""
        return self._sink.prefix

    @property
    def assumed_role(self) -> str | None:
        """The IAM role ARN assumed for accessing the bucket, if any."""
        return self._sink.assumed_role

    @property
    def settings(self) -> SinkSettings:
        """The sink's tuning and object options."""
        return self._sink.settings

    @staticmethod
    def name() -> str:
        """
        Retrieve the name of the sink type.

        :return: The string representation of the sink type.
        """
        return AsyncS3Sink.name()

    @property
    def mode(self) -> SinkMode:
        """
        The mode of the sink, which is aggregate.

        :return: The `SinkMode` enumeration value representing the aggregate mode.
        """
        return self._sink.mode

    def write(
        self,
        image_id: str,
        features: Iterable[Any],
        *,
        metadata: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> bool:
        """
        Write aggregated GeoJSON feature collection to the S3 bucket.

        The features are streamed to the object derived from ``image_id``; the object appears whole or not at all.
        A plain iterable (a generator, a database cursor) is pulled on the calling thread, a batch at a time as the
        upload takes them, so a source tied to its thread works; lists and tuples are taken as they are.

        The write is cancelled if it runs out of ``timeout``, or if the wait is interrupted (Ctrl-C): the call then
        waits, up to 60 s, for the write to abort its upload (a second Ctrl-C stops waiting), and raises. A write
        cancelled while S3 is already storing the object (its ``PutObject`` or ``CompleteMultipartUpload`` sent) may
        still be stored whole; the sink's log says which. A thread cannot be cancelled from outside:
        ``asyncio.to_thread(sink.write, ...)`` under an ``asyncio.timeout`` stops waiting but not the write, so pass
        ``timeout=`` or use :class:`~model_runner.sink.async_s3_sink.AsyncS3Sink` in asyncio code.

        :param image_id: The identifier for the image, used to generate the S3 object key.
        :param features: A list (or any iterable) of GeoJSON features to be aggregated and written to S3.
        :param metadata: User metadata to store with the object (``x-amz-meta-*``).
        :param on_progress: Called with ``(bytes_done, features_done)`` as parts are stored, on the sink's loop
            thread.
        :param timeout: Seconds the write may take, features pulled included; `None` for no limit.
        :return: `True` if the upload was successful, `False` otherwise.

        :raises ClientError: If there are errors while uploading the file to S3.
        :raises TimeoutError: If the write did not finish within ``timeout``; it was cancelled.
        """
        return self._write(self._sink.write, image_id, features, metadata, on_progress, timeout)

    def write_with_result(
        self,
        image_id: str,
        features: Iterable[Any],
        *,
        metadata: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> WriteResult:
        """
        Write aggregated GeoJSON feature collection to the S3 bucket, and tell what the write did.

        Features are pulled, and the write cancelled, as by :meth:`write`.

        :param image_id: The identifier for the image, used to generate the S3 object key.
        :param features: A list (or any iterable) of GeoJSON features.
        :param metadata: User metadata to store with the object (``x-amz-meta-*``).
        :param on_progress: Called with ``(bytes_done, features_done)`` as parts are stored, on the sink's loop
            thread; the last call gives the result's ``bytes`` and ``features``.
        :param timeout: Seconds the write may take, features pulled included; `None` for no limit.
        :return: The stored object's key, size, checksum and costs.
        :raises ClientError: If S3 refuses the upload, after retries, a missing bucket included.
        :raises TimeoutError: If the write did not finish within ``timeout``; it was cancelled.
        """
        return self._write(self._sink.write_with_result, image_id, features, metadata, on_progress, timeout)

    def validate_s3_bucket(self, *, timeout: float | None = None) -> bool:
        """
        Check if the output S3 bucket exists and can be read/written to.

        :param timeout: Seconds the check may take; `None` for no limit.
        :return: `True` if the bucket exists and can be accessed, `False` otherwise.

        :raises ClientError: If there are issues accessing the S3 bucket.
        :raises TimeoutError: If S3 did not answer within ``timeout``.
        """
        what = f"check of bucket {self.bucket}"
        return _shared_loop().call(what, _checked(timeout), self._sink.validate_s3_bucket)

    def _write(
        self,
        method: Callable[..., Awaitable[T]],
        image_id: str,
        features: Iterable[Any],
        metadata: Mapping[str, str] | None,
        on_progress: ProgressCallback | None,
        timeout: float | None,
    ) -> T:
        # A bad image id fails here, as it would on the loop, but before any feature is pulled.
        what = f"write of s3://{self.bucket}/{self._sink.object_key(image_id)}"
        write = partial(method, image_id, metadata=metadata, on_progress=on_progress)
        loop_thread = _shared_loop()
        if _pulled_by_caller(features):
            batch_features = self.settings.encode_batch_features
            return _call_fed(loop_thread, what, _checked(timeout), write, features, batch_features)
        return loop_thread.call(what, _checked(timeout), write, features)
