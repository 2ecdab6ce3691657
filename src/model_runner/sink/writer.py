"""Writers: one object written from features added a batch at a time, from any number of tasks or threads."""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, TypeAlias

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from model_runner.sink.encoding import EncodedBatch, EncodedFeatures, Feature, check_features
from model_runner.sink.exceptions import FeatureEncodingError, SinkError
from model_runner.sink.loop_thread import Call, checked_timeout, pulled_by_caller, shared_loop
from model_runner.sink.results import WriteResult
from model_runner.sink.upload.conditional import check_overwrite

if TYPE_CHECKING:
    from model_runner.sink.async_s3_sink import AsyncS3Sink

__all__ = ["AsyncSinkWriter", "SinkWriter"]

# Batches accepted, encoded, but not yet taken by the upload: enough that adders rarely wait on each other's
# hand-over, few enough that what a writer holds stays a handful of batches besides the upload's own bounded bytes.
BUFFERED_BATCHES = 4

_Encoded: TypeAlias = "list[EncodedBatch]"


class AsyncSinkWriter:
    """
    One object, written from features added a batch at a time while it is open.

    Made by :meth:`AsyncS3Sink.open <model_runner.sink.async_s3_sink.AsyncS3Sink.open>`. Each batch is encoded in
    worker threads as it is added, and a background task runs the sink's own write over the encoded batches: parts
    are uploaded as they fill, with the same bounded memory, checksums and loop stalls as ``write``. The object is
    completed when the ``async with`` block ends normally (:attr:`result` then tells what was stored); an exception
    or a cancellation inside the block aborts it and stores nothing.
    """

    def __init__(self, sink: AsyncS3Sink, image_id: str, metadata: Mapping[str, str] | None, overwrite: bool) -> None:
        check_overwrite(overwrite)
        self.key = sink.object_key(image_id)
        self.result: WriteResult | None = None
        """What the write stored, once the block has ended normally; `None` before."""
        self._sink = sink
        self._image_id = image_id
        self._metadata = metadata
        self._overwrite = overwrite
        self._turn: anyio.Lock | None = None
        self._error: BaseException | None = None
        self._state = "new"
        self._task_group: TaskGroup | None = None
        self._send: MemoryObjectSendStream[_Encoded] | None = None
        self._added = 0

    def __repr__(self) -> str:
        return f"AsyncSinkWriter(bucket={self._sink.bucket!r}, key={self.key!r}, state={self._state!r})"

    async def __aenter__(self) -> AsyncSinkWriter:
        if self._state != "new":
            raise RuntimeError(f"{self!r} can be opened once only")
        # Made here, on the loop, for the synchronous twin builds its writer on its caller's thread.
        self._turn = anyio.Lock()
        self._send, receive = anyio.create_memory_object_stream[_Encoded](BUFFERED_BATCHES)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run, receive)
        self._state = "open"
        return self

    async def _run(self, receive: MemoryObjectReceiveStream[_Encoded]) -> None:
        try:
            self.result = await self._sink.write_with_result(
                self._image_id, EncodedFeatures(receive), metadata=self._metadata, overwrite=self._overwrite
            )
        except Exception as error:
            # Kept for the adders and the block's exit rather than raised: raised, it would cancel the caller's
            # block through the task group at whatever it awaits next.
            self._error = error
        finally:
            # Wakes the adders waiting for room: they raise the error, or find the writer closed.
            receive.close()

    async def add(self, features: Iterable[Feature] | AsyncIterable[Feature]) -> None:
        """
        Add a batch of features to the object. Batches land whole, in the order their ``add`` calls were made,
        whichever tasks made them; the call returns once its batch is encoded and accepted, waiting while the
        writer's few buffered batches are not yet taken by the upload.

        :param features: A list or tuple (taken as it is: do not change it afterwards), any iterable (pulled in a
            worker thread) or an async iterable of GeoJSON features; it is pulled and encoded whole under its turn,
            so a slow source holds up the adds made after it.
        :raises TypeError: If ``features`` is not an iterable or async iterable of features (the writer goes on).
            A call cancelled while its batch is handed over (the writer full) fails the writer, which then stores
            nothing: the batch may or may not have landed.
        :raises FeatureEncodingError: If a feature of this batch or an earlier one could not be encoded; it names the
            feature's index within the object, and the writer stores nothing.
        :raises ClientError: If S3 refused the upload; the writer stores nothing.
        :raises SinkError: If an earlier add was cancelled while handing its batch over; the writer stores nothing.
        :raises RuntimeError: If the writer is not open: before its block, or after it ended.
        """
        check_features(features, "a batch")
        turn, send = self._turn, self._send
        if turn is None or send is None:
            raise RuntimeError(f"{self!r} is not open: add features inside its async with block")
        async with turn:
            self._check_open()
            encoded = await self._encode(features)
            try:
                await send.send(encoded)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._check_open()
                raise RuntimeError(f"{self!r} has ended") from None
            except anyio.get_cancelled_exc_class():
                # A hand-over cancelled as it completes may have delivered the batch all the same: whether it
                # landed is unknown, so the object cannot be known whole and is not stored.
                self._error = self._error or SinkError(
                    f"an add to s3://{self._sink.bucket}/{self.key} was cancelled while handing its batch over;"
                    " nothing is stored"
                )
                raise
            self._added += sum(count for _, count, _ in encoded)

    async def _encode(self, features: Iterable[Feature] | AsyncIterable[Feature]) -> _Encoded:
        # Pulled and encoded as it is added, in the encoder's own batches (a plain iterable in a worker thread, as a
        # write pulls one), under the turn so that an error names the feature's index within the object: the writer
        # then holds bytes, not features that would live long enough to reach the garbage collector's oldest
        # generation (whose full collections stall every thread).
        try:
            return await self._sink._encode_batch(features, self._added)
        except FeatureEncodingError as error:
            self._error = self._error or error
            raise

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state != "open":
            raise RuntimeError(f"{self!r} is not open: add features inside its async with block")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        task_group, turn, send = self._task_group, self._turn, self._send
        assert task_group is not None and turn is not None and send is not None
        try:
            if exc is None:
                async with turn:
                    # Under the turn, so that an add already handing its batch over lands before the object ends.
                    self._state = "closing"
                    if self._error is None:
                        send.close()
        except BaseException:
            # Cancelled while waiting for the turn: the object is aborted all the same.
            await self._end(task_group, send, abort=True)
            raise
        await self._end(task_group, send, abort=exc is not None or self._error is not None)
        if exc is None and self._error is not None:
            raise self._error
        return False

    async def _end(self, task_group: TaskGroup, send: MemoryObjectSendStream[_Encoded], *, abort: bool) -> None:
        if abort:
            self._state = "aborting"
            # Cancels the write, which aborts its upload; the adders waiting for room find the stream closed.
            task_group.cancel_scope.cancel()
        try:
            # The block's own exception is not the task group's to wrap in a group: it propagates as it is.
            await task_group.__aexit__(None, None, None)
        finally:
            send.close()
            self._state = "ended"


class SinkWriter:
    """
    One object, written from features added a batch at a time from any number of threads while it is open.

    The synchronous twin of :class:`AsyncSinkWriter`, made by :meth:`S3Sink.open
    <model_runner.sink.s3_sink.S3Sink.open>`: its write runs on the sinks' private event loop. Ctrl-C or an exception
    inside the ``with`` block aborts it and stores nothing.
    """

    def __init__(self, writer: AsyncSinkWriter, what: str) -> None:
        self._writer = writer
        self._what = what
        self._loop_thread = shared_loop()
        self._call: Call | None = None
        self._opened: anyio.Event | None = None
        self._done: anyio.Event | None = None
        self._ended = False
        self.result: WriteResult | None = None
        """What the write stored, once the block has ended normally; `None` before."""

    @property
    def key(self) -> str:
        """The object's key."""
        return self._writer.key

    def __enter__(self) -> SinkWriter:
        if self._call is not None:
            raise RuntimeError(f"{self._what} can be opened once only")
        self._opened, self._done = self._loop_thread.call(self._what, None, _events)
        call = self._call = self._loop_thread.start(self._what, None, self._hold_open)
        try:
            # Open once the write is under way, or failed to start: then its failure is raised here.
            call.wait(call.future, self._loop_thread.spawn(self._opened.wait))
        except BaseException:
            call.cancel()
            raise
        if call.future.done():
            call.result()
        return self

    async def _hold_open(self) -> WriteResult | None:
        assert self._opened is not None and self._done is not None
        try:
            async with self._writer:
                self._opened.set()
                await self._done.wait()
        finally:
            self._opened.set()
        return self._writer.result

    def add(self, features: Iterable[Feature], *, timeout: float | None = None) -> None:
        """
        Add a batch of features to the object, as :meth:`AsyncSinkWriter.add` does; a plain iterable (a generator,
        a cursor) is pulled on the calling thread. Safe to call from many threads at once.

        :param features: A list or any iterable of GeoJSON features.
        :param timeout: Seconds to wait for the batch to be accepted; `None` for no limit. A batch that timed out
            waiting for its turn was not added, and the writer goes on; one that timed out while handed over (the
            writer full) may have landed or not, so the writer fails and stores nothing (:exc:`SinkError`).
        :raises TimeoutError: If the batch was not accepted within ``timeout``.
        :raises FeatureEncodingError: If a feature added so far could not be encoded; the writer stores nothing.
        :raises RuntimeError: If the writer is not open.
        """
        checked_timeout(timeout)
        if self._call is None or self._ended:
            raise RuntimeError(f"{self._what} is not open: add features inside its with block")
        batch = list(features) if pulled_by_caller(features) else features
        self._loop_thread.call(f"add to {self._what}", timeout, self._writer.add, batch)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        call, done = self._call, self._done
        assert call is not None and done is not None
        self._ended = True
        if exc is not None:
            call.cancel()
            return
        self._loop_thread.spawn(_set, done)
        self.result = call.join()


async def _events() -> tuple[anyio.Event, anyio.Event]:
    # Made on the loop, which anyio's events belong to.
    return anyio.Event(), anyio.Event()


async def _set(event: anyio.Event) -> None:
    event.set()
