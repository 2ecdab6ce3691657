"""Chunks of bytes -> one S3 object: a single PutObject, or a multipart upload that never leaves parts behind."""

from __future__ import annotations

import base64
import io
import logging
import sys
import time
import zlib
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup
from botocore.exceptions import ClientError

from model_runner.sink.exceptions import ChecksumMismatchError
from model_runner.sink.settings import MAX_PART_SIZE, SinkSettings

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["ByteBudget", "PartPlan", "UploadEvents", "UploadOutcome", "part_size_for", "upload_object"]

logger = logging.getLogger(__name__)

# S3 allows 10,000 parts. The size of an object streamed from a generator is not known in advance, so the part
# size doubles every 900 parts: from any allowed size, 10,000 parts then reach past S3's 5 TiB object limit.
MAX_PARTS = 10_000
PARTS_PER_SIZE_STEP = 900
# Copying and checksumming this much takes tens of microseconds: less than a trip to a worker thread.
INLINE_SEAL_BYTES = 256 * 1024
# An abort must finish even when the write was cancelled, but must not hang a shutdown either.
ABORT_TIMEOUT_SECONDS = 60.0


def part_size_for(part_number: int, base_part_size: int) -> int:
    """
    Size of a part: ``base_part_size``, doubled every 900 parts, at most 5 GiB.

    :param part_number: Number of the part, from 1.
    :param base_part_size: Size of the first parts.
    :return: The size in bytes of that part (the last part of an upload may be shorter).
    """
    return int(min(base_part_size * 2 ** ((part_number - 1) // PARTS_PER_SIZE_STEP), MAX_PART_SIZE))


class ByteBudget:
    """
    Bytes of request bodies that may be held at once by the uploads sharing it, e.g. every write of a sink.

    A body larger than the whole budget still goes, alone, so no upload waits forever.

    :param limit: The budget in bytes.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: list[anyio.Event] = []

    async def acquire(self, size: int) -> None:
        """
        Wait until ``size`` bytes fit in the budget, and take them.

        :param size: Bytes of the body about to be built.
        """
        while self.used and self.used + size > self.limit:
            freed = anyio.Event()
            self._waiters.append(freed)
            await freed.wait()
        self.used += size

    def release(self, size: int) -> None:
        """
        Give bytes back once their body is sent or dropped.

        :param size: Bytes taken by :meth:`acquire`.
        """
        self.used -= size
        waiters, self._waiters = self._waiters, []
        for freed in waiters:
            freed.set()


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


def _retries(response: dict[str, Any]) -> int:
    return int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0))


def _tell_retries(events: UploadEvents | None, operation: str, response: dict[str, Any]) -> None:
    retries = _retries(response)
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

    Below ``settings.multipart_threshold`` bytes it is one ``PutObject``. Past it, a multipart upload: parts are
    cut as chunks arrive, at most ``settings.max_parts_in_flight`` upload at once while the next is produced, and
    any failure or cancellation aborts the upload, so no parts are left behind, before it propagates.

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
    budget = budget or ByteBudget(settings.max_bytes_in_flight)
    pending: list[memoryview] = []
    pending_size = 0
    iterator = aiter(chunks)
    async for chunk in iterator:
        pending.append(chunk)
        pending_size += len(chunk)
        if pending_size >= settings.multipart_threshold:
            return await _upload_parts(
                client, bucket, key, pending, iterator, settings, object_arguments, events, budget, limiter
            )
    await budget.acquire(pending_size)
    try:
        if pending_size <= INLINE_SEAL_BYTES:
            body, size, checksum = _seal(pending)
        else:
            body, size, checksum = await anyio.to_thread.run_sync(_seal, pending, limiter=limiter)
        started = time.perf_counter()
        response = await client.put_object(
            Bucket=bucket, Key=key, Body=body, ContentLength=size, ChecksumCRC32=checksum, **object_arguments
        )
    finally:
        budget.release(pending_size)
    _verify(response, checksum, key)
    _tell_retries(events, "PutObject", response)
    return UploadOutcome(
        bytes=size,
        parts=0,
        retries=_retries(response),
        checksum=checksum,
        etag=response.get("ETag", ""),
        version_id=response.get("VersionId"),
        seconds=time.perf_counter() - started,
    )


async def _upload_parts(
    client: Any,
    bucket: str,
    key: str,
    first_chunks: list[memoryview],
    chunks: AsyncIterable[memoryview],
    settings: SinkSettings,
    object_arguments: dict[str, Any],
    events: UploadEvents | None,
    budget: ByteBudget,
    limiter: anyio.CapacityLimiter | None,
) -> UploadOutcome:
    started = time.perf_counter()
    # Cancelled while S3 creates the upload, the write would never learn the upload id to abort it: the request
    # is shielded (botocore's timeouts and retries bound it), and a cancellation lands in the aborting block below.
    with anyio.CancelScope(shield=True):
        created = await client.create_multipart_upload(
            Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32", **object_arguments
        )
    upload_id = created["UploadId"]
    bucket_arguments = settings.bucket_arguments()
    outcome = UploadOutcome(retries=_retries(created))
    _tell_retries(events, "CreateMultipartUpload", created)
    stored: dict[int, dict[str, Any]] = {}
    slots = anyio.Semaphore(settings.max_parts_in_flight)

    async def upload_part(number: int, pieces: list[memoryview], reserved: int) -> None:
        try:
            body, size, checksum = await anyio.to_thread.run_sync(_seal, pieces, limiter=limiter)
            pieces.clear()
            response = await client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ContentLength=size,
                ChecksumCRC32=checksum,
                **bucket_arguments,
            )
            stored[number] = {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": checksum}
            outcome.bytes += size
            outcome.retries += _retries(response)
            _tell_retries(events, "UploadPart", response)
            if events is not None:
                events.part_stored(number, size)
        finally:
            budget.release(reserved)
            slots.release()

    async def start(part: tuple[int, list[memoryview]], task_group: TaskGroup) -> None:
        # Waiting for a slot and for budget before taking more chunks is what bounds memory: the encoder waits too.
        number, pieces = part
        size = sum(len(piece) for piece in pieces)
        await slots.acquire()
        try:
            await budget.acquire(size)
        except BaseException:
            slots.release()
            raise
        task_group.start_soon(upload_part, number, pieces, size)

    try:
        try:
            plan = PartPlan(settings.part_size)
            async with anyio.create_task_group() as task_group:
                for chunk in first_chunks:
                    for part in plan.add(chunk):
                        await start(part, task_group)
                first_chunks.clear()
                async for chunk in chunks:
                    for part in plan.add(chunk):
                        await start(part, task_group)
                last = plan.finish()
                if last is not None:
                    await start(last, task_group)
        except BaseExceptionGroup as group:
            raise _single_error(group) from None
        parts = [stored[number] for number in sorted(stored)]
        completed = await client.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
            **bucket_arguments,
        )
    except BaseException:
        await _abort(client, bucket, key, upload_id, bucket_arguments)
        raise
    outcome.checksum = composite_crc32([part["ChecksumCRC32"] for part in parts])
    _verify(completed, outcome.checksum, key)
    _tell_retries(events, "CompleteMultipartUpload", completed)
    outcome.seconds = time.perf_counter() - started
    outcome.parts = len(parts)
    outcome.retries += _retries(completed)
    outcome.etag = completed.get("ETag", "")
    outcome.version_id = completed.get("VersionId")
    return outcome


async def _abort(client: Any, bucket: str, key: str, upload_id: str, bucket_arguments: dict[str, str]) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(ABORT_TIMEOUT_SECONDS):
        try:
            await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, **bucket_arguments)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "NoSuchUpload":
                logger.exception("could not abort multipart upload of s3://%s/%s", bucket, key)
            else:
                # A cancellation that came as S3 completed the upload: the object is stored whole.
                logger.debug("multipart upload of s3://%s/%s was already completed", bucket, key)
        except Exception:
            logger.exception("could not abort multipart upload of s3://%s/%s", bucket, key)
