"""Chunks of bytes -> one S3 object: a single PutObject, or a multipart upload that never leaves parts behind."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import sys
import time
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup
from botocore.exceptions import ClientError

from model_runner.sink.budget import BudgetHold, ByteBudget
from model_runner.sink.exceptions import ChecksumMismatchError
from model_runner.sink.pacing import put_slots
from model_runner.sink.responses import error_code, retry_attempts
from model_runner.sink.settings import MAX_PART_SIZE, SinkSettings

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "MultipartUpload",
    "PartPlan",
    "UploadEvents",
    "UploadOutcome",
    "part_size_for",
    "upload_object",
]

logger = logging.getLogger(__name__)

# S3 allows 10,000 parts. The size of an object streamed from a generator is not known in advance, so the part
# size doubles every 900 parts: from any allowed size, 10,000 parts then reach past S3's 5 TiB object limit.
MAX_PARTS = 10_000
PARTS_PER_SIZE_STEP = 900
# Copying and checksumming this much takes tens of microseconds: less than a trip to a worker thread.
INLINE_SEAL_BYTES = 256 * 1024
# An abort must finish even when the write was cancelled, but must not hang a shutdown either.
ABORT_TIMEOUT_SECONDS = 60.0
# How long a cancelled write waits for S3's answer to a request that decides what is stored or left behind.
ANSWER_TIMEOUT_SECONDS = 60.0


def part_size_for(part_number: int, base_part_size: int) -> int:
    """
    Size of a part: ``base_part_size``, doubled every 900 parts, at most 5 GiB.

    :param part_number: Number of the part, from 1.
    :param base_part_size: Size of the first parts.
    :return: The size in bytes of that part (the last part of an upload may be shorter).
    """
    return int(min(base_part_size * 2 ** ((part_number - 1) // PARTS_PER_SIZE_STEP), MAX_PART_SIZE))


@dataclass
class UploadOutcome:
    """What S3 answered for a stored object, and how long from its first request to the last answer."""

    bytes: int = 0
    parts: int = 0
    retries: int = 0
    checksum: str = ""
    etag: str = ""
    version_id: str | None = None
    seconds: float = 0.0


class UploadEvents(Protocol):
    """What an upload tells as it goes. Called on the event loop thread; an exception raised fails the upload."""

    def part_stored(self, number: int, size: int) -> None:
        """
        A part was stored.

        :param number: The part number.
        :param size: Its size in bytes.
        """

    def retried(self, operation: str, retries: int) -> None:
        """
        A request succeeded after botocore retried it.

        :param operation: The S3 operation, e.g. ``"UploadPart"``.
        :param retries: How many times it was retried.
        """


@dataclass
class PartPlan:
    """Cuts a stream of chunks into parts of the planned sizes, splitting a chunk that straddles two parts."""

    base_part_size: int
    number: int = 1
    pieces: list[memoryview] = field(default_factory=list)
    size: int = 0

    def add(self, chunk: memoryview) -> list[tuple[int, list[memoryview]]]:
        """
        Add a chunk.

        :param chunk: The next bytes of the object.
        :return: The parts that this chunk completed, as ``(part number, pieces)``.
        """
        completed = []
        while chunk:
            room = part_size_for(self.number, self.base_part_size) - self.size
            piece, chunk = chunk[:room], chunk[room:]
            self.pieces.append(piece)
            self.size += len(piece)
            if len(piece) == room:
                completed.append(self._take())
        return completed

    def finish(self) -> tuple[int, list[memoryview]] | None:
        """
        Take the last, possibly shorter, part.

        :return: The last part, or `None` if the chunks filled whole parts exactly.
        """
        return self._take() if self.size else None

    def _take(self) -> tuple[int, list[memoryview]]:
        part = (self.number, self.pieces)
        self.number += 1
        self.pieces, self.size = [], 0
        if self.number > MAX_PARTS:
            raise ValueError("object exceeds S3's 10,000 parts")
        return part


def _seal(pieces: list[memoryview]) -> tuple[io.BytesIO, int, str]:
    # In a worker thread, a piece at a time: each copy holds the GIL only briefly and zlib releases it, so the
    # event loop is never kept waiting for a whole part. The body is a BytesIO that owns its buffer because
    # botocore would wrap bytes in one that aiohttp then copies, on the event loop.
    body = io.BytesIO()
    crc = 0
    for piece in pieces:
        body.write(piece)
        crc = zlib.crc32(piece, crc)
    size = body.tell()
    body.seek(0)
    return body, size, _crc32_base64(crc)


def _crc32_base64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def composite_crc32(part_checksums: list[str]) -> str:
    """
    The checksum S3 gives a multipart object: the CRC32 of the parts' CRC32s, then ``-<parts>``.

    :param part_checksums: Base64 CRC32 of each part, in order.
    :return: The object's composite checksum.
    """
    raw = b"".join(base64.b64decode(checksum) for checksum in part_checksums)
    return f"{_crc32_base64(zlib.crc32(raw))}-{len(part_checksums)}"


def _tell_retries(events: UploadEvents | None, operation: str, response: dict[str, Any]) -> None:
    retries = retry_attempts(response)
    if retries and events is not None:
        events.retried(operation, retries)


def _verify(response: dict[str, Any], expected: str, key: str) -> None:
    stored = response.get("ChecksumCRC32")
    if stored is not None and stored != expected:
        raise ChecksumMismatchError(f"s3 stored {key} with CRC32 {stored}, expected {expected}")


def _single_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    # A task group wraps its failures; callers expect the ClientError (or cancellation) itself, as documented.
    # Parts in flight often fail together for one cause (a refused UploadPart, a dead endpoint): the first real
    # error stands for them all, and cancellations of the sibling parts are only the consequence.
    errors = _flatten(group)
    chosen = next((error for error in errors if isinstance(error, Exception)), errors[0])
    others = len(errors) - 1
    if others:
        logger.debug("%d more part error(s) after %r", others, chosen)
    return chosen


def _flatten(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    errors: list[BaseException] = []
    for error in group.exceptions:
        errors.extend(_flatten(error) if isinstance(error, BaseExceptionGroup) else [error])
    return errors


async def upload_object(
    client: Any,
    bucket: str,
    key: str,
    chunks: AsyncIterable[memoryview],
    settings: SinkSettings,
    *,
    metadata: dict[str, str] | None = None,
    events: UploadEvents | None = None,
    budget: ByteBudget | None = None,
    limiter: anyio.CapacityLimiter | None = None,
) -> UploadOutcome:
    """
    Store the concatenated chunks as one object, atomically: the object appears whole or not at all.

    Below ``settings.multipart_threshold`` bytes it is one ``PutObject``. Past it, a :class:`MultipartUpload`:
    parts are cut as chunks arrive, at most ``settings.max_parts_in_flight`` upload at once while the next is
    produced, and any failure or cancellation, anyio's or asyncio's own, aborts the upload before it propagates.
    A cancellation that comes while S3 stores the object (``PutObject``, ``CompleteMultipartUpload``) waits for
    S3's answer, at most :data:`ANSWER_TIMEOUT_SECONDS`, and the log tells whether the object was stored.

    Each chunk takes its bytes from ``budget`` when it arrives, before the next is pulled, and gives them back once
    sent. The writes sharing a budget thus hold at most its limit plus one body, the larger of
    ``multipart_threshold`` and the part size, plus one encoded batch (see :class:`ByteBudget`); each write
    waiting for room also holds the one batch it waits with.

    :param client: An aiobotocore S3 client.
    :param bucket: The bucket.
    :param key: The object key.
    :param chunks: The object's bytes, in order.
    :param settings: Part sizes, concurrency and object options.
    :param metadata: User metadata of the object.
    :param events: Told of each stored part and each retried request.
    :param budget: Bytes of bodies this upload may hold, shared with others; a private one by default.
    :param limiter: Worker threads that seal bodies, shared with others; anyio's default by default.
    :return: What S3 answered.
    :raises botocore.exceptions.ClientError: If S3 refuses a request after retries.
    :raises ChecksumMismatchError: If S3 stored other bytes than those sent.
    """
    object_arguments: dict[str, Any] = settings.object_arguments()
    if metadata:
        object_arguments["Metadata"] = metadata
    body = (budget or ByteBudget(settings.max_bytes_in_flight)).hold()
    try:
        pending: list[memoryview] = []
        iterator = aiter(chunks)
        async for chunk in iterator:
            # Waiting here, before pulling the next chunk, is what bounds memory: the encoder waits too.
            await body.grow(len(chunk))
            pending.append(chunk)
            if body.size >= settings.multipart_threshold:
                upload = MultipartUpload(
                    client, bucket, key, settings, object_arguments=object_arguments, events=events, limiter=limiter
                )
                async with upload:
                    await _send_parts(upload, pending, iterator, body, settings)
                    await upload.complete()
                return upload.outcome
        return await _put_object(client, bucket, key, pending, object_arguments, events, limiter)
    finally:
        body.release()


async def _put_object(
    client: Any,
    bucket: str,
    key: str,
    pieces: list[memoryview],
    object_arguments: dict[str, Any],
    events: UploadEvents | None,
    limiter: anyio.CapacityLimiter | None,
) -> UploadOutcome:
    if sum(len(piece) for piece in pieces) <= INLINE_SEAL_BYTES:
        body, size, checksum = _seal(pieces)
    else:
        body, size, checksum = await anyio.to_thread.run_sync(_seal, pieces, limiter=limiter)
    started = time.perf_counter()
    async with put_slots(client):
        request = asyncio.create_task(
            client.put_object(
                Bucket=bucket, Key=key, Body=body, ContentLength=size, ChecksumCRC32=checksum, **object_arguments
            )
        )
        try:
            response = await asyncio.shield(request)
        except asyncio.CancelledError:
            await _run_to_the_end(_settle_cancelled_put(request, bucket, key))
            raise
    _verify(response, checksum, key)
    _tell_retries(events, "PutObject", response)
    return UploadOutcome(
        bytes=size,
        parts=0,
        retries=retry_attempts(response),
        checksum=checksum,
        etag=response.get("ETag", ""),
        version_id=response.get("VersionId"),
        seconds=time.perf_counter() - started,
    )


async def _settle_cancelled_put(request: asyncio.Task[Any], bucket: str, key: str) -> None:
    try:
        stored: bool | None = await _answer(request) is not None
    except TimeoutError:
        stored = None
    _tell_cancelled(bucket, key, "PutObject", stored)


async def _send_parts(
    upload: MultipartUpload,
    first_chunks: list[memoryview],
    chunks: AsyncIterator[memoryview],
    body: BudgetHold,
    settings: SinkSettings,
) -> None:
    plan = PartPlan(settings.part_size)
    slots = anyio.Semaphore(settings.max_parts_in_flight)

    async def send(number: int, pieces: list[memoryview], part: BudgetHold) -> None:
        try:
            await upload.send_part(number, pieces)
        finally:
            part.release()
            slots.release()

    async def start(part: tuple[int, list[memoryview]], task_group: TaskGroup) -> None:
        # Waiting for a slot before taking more chunks bounds the parts in flight: the encoder waits too.
        number, pieces = part
        await slots.acquire()
        task_group.start_soon(send, number, pieces, body.split(sum(len(piece) for piece in pieces)))

    try:
        async with anyio.create_task_group() as task_group:
            for chunk in first_chunks:
                for part in plan.add(chunk):
                    await start(part, task_group)
            first_chunks.clear()
            async for chunk in chunks:
                await body.grow(len(chunk))
                for part in plan.add(chunk):
                    await start(part, task_group)
            last = plan.finish()
            if last is not None:
                await start(last, task_group)
    except BaseExceptionGroup as group:
        raise _single_error(group) from None


class MultipartUpload:
    """
    One multipart upload: created, sent part by part, then completed, or aborted so that S3 drops its parts.

    ``async with upload:`` creates it; from the moment S3 gives the upload id, any exception or cancellation
    leaving the block aborts the upload before it propagates, be it anyio's (a cancel scope, ``fail_after``) or
    asyncio's own (``task.cancel()``, ``asyncio.timeout``, ``asyncio.wait_for``, ``asyncio.TaskGroup``). The
    requests whose answer decides what is left behind (create, complete, abort) run in tasks of their own, which
    no cancellation reaches: a cancelled write waits for their answer, at most :data:`ANSWER_TIMEOUT_SECONDS`,
    and for the abort, at most :data:`ABORT_TIMEOUT_SECONDS`, through any further cancellation.

    :param client: An aiobotocore S3 client.
    :param bucket: The bucket.
    :param key: The object key.
    :param settings: The options every request on the bucket carries.
    :param object_arguments: The object's options (content type, ACL, metadata...), for the create.
    :param events: Told of each stored part and each retried request.
    :param limiter: Worker threads that seal parts, shared with others; anyio's default by default.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        settings: SinkSettings,
        *,
        object_arguments: dict[str, Any],
        events: UploadEvents | None = None,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        self.bucket = bucket
        self.key = key
        #: The id S3 gave the upload, once created.
        self.upload_id: str | None = None
        #: What S3 answered so far.
        self.outcome = UploadOutcome()
        self._client = client
        self._bucket_arguments = settings.bucket_arguments()
        self._object_arguments = object_arguments
        self._events = events
        self._limiter = limiter
        self._parts: dict[int, dict[str, Any]] = {}
        # Completed, or aborted: nothing more to clean up.
        self._settled = False
        self._started = time.perf_counter()

    async def __aenter__(self) -> MultipartUpload:
        await self.create()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc is not None and not self._settled:
            await self.abort()

    async def create(self) -> None:
        """
        Create the upload. Cancelled while S3 creates it, it waits for the upload id and aborts the upload before
        the cancellation propagates.

        :raises botocore.exceptions.ClientError: If S3 refuses it after retries.
        """
        self._started = time.perf_counter()
        request = asyncio.create_task(
            self._client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ChecksumAlgorithm="CRC32", **self._object_arguments
            )
        )
        try:
            created = await asyncio.shield(request)
        except asyncio.CancelledError:
            await _run_to_the_end(self._abort_once_created(request))
            raise
        self.upload_id = created["UploadId"]
        self.outcome.retries += retry_attempts(created)
        _tell_retries(self._events, "CreateMultipartUpload", created)

    async def send_part(self, number: int, pieces: list[memoryview]) -> None:
        """
        Seal one part in a worker thread and send it.

        :param number: The part number, from 1.
        :param pieces: The part's bytes; emptied once copied into the request body.
        :raises botocore.exceptions.ClientError: If S3 refuses it after retries.
        """
        body, size, checksum = await anyio.to_thread.run_sync(_seal, pieces, limiter=self._limiter)
        pieces.clear()
        response = await self._client.upload_part(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=body,
            ContentLength=size,
            ChecksumCRC32=checksum,
            **self._bucket_arguments,
        )
        self._parts[number] = {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": checksum}
        self.outcome.bytes += size
        self.outcome.retries += retry_attempts(response)
        _tell_retries(self._events, "UploadPart", response)
        if self._events is not None:
            self._events.part_stored(number, size)

    async def complete(self) -> None:
        """
        Join the parts sent into the object. Cancelled while S3 completes it, it waits for S3's answer, aborts the
        upload unless it was completed, and logs whether the object is stored, before the cancellation propagates.

        :raises botocore.exceptions.ClientError: If S3 refuses it after retries.
        :raises ChecksumMismatchError: If S3 stored other bytes than those sent.
        """
        parts = [self._parts[number] for number in sorted(self._parts)]
        request = asyncio.create_task(
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
                **self._bucket_arguments,
            )
        )
        try:
            completed = await asyncio.shield(request)
        except asyncio.CancelledError:
            self._settled = True
            await _run_to_the_end(self._settle_cancelled_completion(request))
            raise
        self._settled = True
        self.outcome.checksum = composite_crc32([part["ChecksumCRC32"] for part in parts])
        _verify(completed, self.outcome.checksum, self.key)
        _tell_retries(self._events, "CompleteMultipartUpload", completed)
        self.outcome.seconds = time.perf_counter() - self._started
        self.outcome.parts = len(parts)
        self.outcome.retries += retry_attempts(completed)
        self.outcome.etag = completed.get("ETag", "")
        self.outcome.version_id = completed.get("VersionId")

    async def abort(self) -> None:
        """
        Abort the upload, so that S3 drops its parts. The abort runs to its end, at most
        :data:`ABORT_TIMEOUT_SECONDS`, whatever cancels the caller meanwhile; if it fails, the bucket, key and upload
        id are logged at error level, for an operator to abort it later.

        :raises asyncio.CancelledError: Once the abort is done, if the caller was cancelled meanwhile.
        """
        self._settled = True
        await _run_to_the_end(self._abort_request())

    async def _abort_once_created(self, request: asyncio.Task[Any]) -> None:
        try:
            created = await _answer(request)
        except TimeoutError:
            logger.warning(
                "no answer to the creation of a multipart upload of s3://%s/%s within %.0f s of its write's "
                "cancellation: if S3 created it, only a lifecycle rule will remove it",
                self.bucket,
                self.key,
                ANSWER_TIMEOUT_SECONDS,
            )
            return
        if created is not None:
            self.upload_id = created["UploadId"]
            await self._abort_request()

    async def _settle_cancelled_completion(self, request: asyncio.Task[Any]) -> None:
        try:
            completed = await _answer(request)
        except TimeoutError:
            completed = None
        stored: bool | None = True
        if completed is None:
            # Aborting settles it either way: S3 no longer having the upload means it completed it.
            stored = {"aborted": False, "gone": True}.get(await self._abort_request())
        _tell_cancelled(self.bucket, self.key, "CompleteMultipartUpload", stored)

    async def _abort_request(self) -> Literal["aborted", "gone", "failed"]:
        try:
            await asyncio.wait_for(
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, **self._bucket_arguments
                ),
                ABORT_TIMEOUT_SECONDS,
            )
        except ClientError as error:
            if error_code(error) == "NoSuchUpload":
                logger.debug("multipart upload of s3://%s/%s was already completed", self.bucket, self.key)
                return "gone"
            self._log_left_behind(error)
            return "failed"
        except Exception as error:
            self._log_left_behind(error)
            return "failed"
        except BaseException as error:
            self._log_left_behind(error)
            raise
        return "aborted"

    def _log_left_behind(self, error: BaseException) -> None:
        logger.error(
            "could not abort multipart upload %s of s3://%s/%s (%s): its parts stay until it is aborted, e.g. with "
            "`aws s3api abort-multipart-upload --bucket %s --key %s --upload-id %s`, or a lifecycle rule removes it",
            self.upload_id,
            self.bucket,
            self.key,
            f"{type(error).__name__}: {error}" if str(error) else type(error).__name__,
            self.bucket,
            self.key,
            self.upload_id,
            extra={"bucket": self.bucket, "key": self.key, "upload_id": self.upload_id},
        )


async def _run_to_the_end(work: Coroutine[Any, Any, object]) -> None:
    # In a task of its own, which no cancellation of the caller reaches; the work bounds its own duration.
    task = asyncio.create_task(work)
    cancellation: asyncio.CancelledError | None = None
    # anyio's cancellation comes again at every turn of the loop, and asyncio's once per cancel(): the shield
    # holds the former off, the latter is caught, and the first one raised once the work is done.
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError as error:
                cancellation = cancellation or error
    if not task.cancelled() and task.exception() is not None:
        logger.error("cleaning up after an upload failed", exc_info=task.exception())
    if cancellation is not None:
        if sys.version_info < (3, 11):
            _untag_anyio_cancellations(sys.exc_info()[1])
        raise cancellation


_ANYIO_TAG = "Cancelled via cancel scope "


def _untag_anyio_cancellations(handled: BaseException | None) -> None:
    # Python 3.10 keeps no count of cancellations, so anyio tells its own by their message, which it also looks for
    # in the __context__ chain. A native cancellation that came during the cleanup after anyio's gets anyio's as
    # its context as it leaves the frame that handles it, and anyio's scope would then swallow it: the messages of
    # the cancellations being handled are changed instead, so that it propagates, as it does on 3.11+.
    while isinstance(handled, asyncio.CancelledError):
        if handled.args and str(handled.args[0]).startswith(_ANYIO_TAG):
            handled.args = (f"cancelled by the task too, after: {handled.args[0]}",)
        handled = handled.__context__


async def _answer(request: asyncio.Task[Any]) -> dict[str, Any] | None:
    # S3's answer to a request of the write, waited for after the write was cancelled: None if it failed.
    done, _ = await asyncio.wait({request}, timeout=ANSWER_TIMEOUT_SECONDS)
    if not done:
        request.cancel()
        raise TimeoutError(f"no answer within {ANSWER_TIMEOUT_SECONDS} s")
    if request.cancelled() or request.exception() is not None:
        return None
    answer: dict[str, Any] = request.result()
    return answer


def _tell_cancelled(bucket: str, key: str, operation: str, stored: bool | None) -> None:
    if stored is None:
        logger.warning(
            "write of s3://%s/%s was cancelled during %s, and S3 did not tell whether the object is stored",
            bucket,
            key,
            operation,
        )
        return
    outcome = "S3 stored the object whole" if stored else "nothing is stored"
    logger.info("write of s3://%s/%s was cancelled during %s: %s", bucket, key, operation, outcome)
