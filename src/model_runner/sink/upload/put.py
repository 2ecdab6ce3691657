"""One object in one ``PutObject``: the body sealed off the event loop when large, S3's answer awaited through any
cancellation."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from model_runner.sink.responses import retry_attempts
from model_runner.sink.upload.outcome import UploadEvents, UploadOutcome, tell_retries, verify_checksum
from model_runner.sink.upload.parts import INLINE_SEAL_BYTES, seal
from model_runner.sink.upload.settle import answer, finish_or_settle, tell_cancelled

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import PutObjectOutputTypeDef

    from model_runner.sink.clients import SharedClient

__all__ = ["put_object"]


async def put_object(
    shared: SharedClient,
    bucket: str,
    key: str,
    pieces: list[memoryview],
    object_arguments: dict[str, Any],
    events: UploadEvents | None = None,
) -> UploadOutcome:
    """
    Store the pieces as one object with one ``PutObject``, carrying its CRC32. Cancelled while S3 stores it, it waits
    for S3's answer, at most :data:`~model_runner.sink.upload.settle.ANSWER_TIMEOUT_SECONDS`, and logs whether the
    object was stored, before the cancellation propagates.

    :param shared: The client, and the worker threads that seal a large body.
    :param bucket: The bucket.
    :param key: The object key.
    :param pieces: The object's bytes, in order.
    :param object_arguments: The object's options (content type, ACL, metadata...).
    :param events: Told of a retried request.
    :return: What S3 answered.
    :raises botocore.exceptions.ClientError: If S3 refuses it after retries.
    :raises ChecksumMismatchError: If S3 stored other bytes than those sent.
    """
    if sum(len(piece) for piece in pieces) <= INLINE_SEAL_BYTES:
        sealed = seal(pieces)
    else:
        sealed = await anyio.to_thread.run_sync(seal, pieces, limiter=shared.limiter)
    started = time.perf_counter()

    async def settle(request: asyncio.Task[PutObjectOutputTypeDef]) -> None:
        try:
            stored: bool | None = await answer(request) is not None
        except TimeoutError:
            stored = None
        tell_cancelled(bucket, key, "PutObject", stored)

    response = await finish_or_settle(
        shared.client.put_object(
            Bucket=bucket,
            Key=key,
            Body=sealed.body,
            ContentLength=sealed.size,
            ChecksumCRC32=sealed.checksum,
            **object_arguments,
        ),
        settle,
    )
    verify_checksum(response, sealed.checksum, key)
    tell_retries(events, "PutObject", response)
    return UploadOutcome(
        bytes=sealed.size,
        parts=0,
        retries=retry_attempts(response),
        checksum=sealed.checksum,
        etag=response.get("ETag", ""),
        version_id=response.get("VersionId"),
        seconds=time.perf_counter() - started,
    )
