"""One object in one ``PutObject``: the body sealed off the event loop when large, S3's answer awaited through any
cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from model_runner.sink.responses import retry_attempts
from model_runner.sink.upload.conditional import SentObject, StoreTarget, condition, store_conditionally
from model_runner.sink.upload.outcome import UploadEvents, UploadOutcome, tell_retries, verify_checksum
from model_runner.sink.upload.parts import INLINE_SEAL_BYTES, SealedBody, seal
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
    overwrite: bool = True,
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
    :param overwrite: Whether an existing object with the key may be replaced.
    :return: What S3 answered.
    :raises botocore.exceptions.ClientError: If S3 refuses it after retries.
    :raises ChecksumMismatchError: If S3 stored other bytes than those sent.
    :raises ObjectExistsError: If ``overwrite`` is false and an object has the key; nothing is stored.
    """
    if sum(len(piece) for piece in pieces) <= INLINE_SEAL_BYTES:
        sealed = seal(pieces)
    else:
        sealed = await anyio.to_thread.run_sync(seal, pieces, limiter=shared.limiter)
    started = time.perf_counter()
    arguments: dict[str, Any] = {
        "Bucket": bucket,
        "Key": key,
        "ContentLength": sealed.size,
        "ChecksumCRC32": sealed.checksum,
        **object_arguments,
        **condition(overwrite),
    }
    target = StoreTarget(shared.client, bucket, key, _bucket_arguments(arguments))
    send = partial(_send, shared, arguments, sealed)
    response = await store_conditionally(send, "PutObject", target, overwrite, partial(_sent, sealed))
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


async def _send(shared: SharedClient, arguments: dict[str, Any], sealed: SealedBody) -> PutObjectOutputTypeDef:
    # From the start of the body: a conflict sends it again.
    sealed.body.seek(0)
    settle = partial(_settle_cancelled_put, arguments["Bucket"], arguments["Key"])
    async with shared.put_slots:
        return await finish_or_settle(shared.client.put_object(Body=sealed.body, **arguments), settle)


async def _settle_cancelled_put(bucket: str, key: str, request: asyncio.Task[PutObjectOutputTypeDef]) -> None:
    try:
        stored: bool | None = await answer(request) is not None
    except TimeoutError:
        stored = None
    tell_cancelled(bucket, key, "PutObject", stored)


@contextmanager
def _sent(sealed: SealedBody) -> Iterator[SentObject]:
    # The body whole too: its MD5 is the ETag of an object stored in one request, for a server with no checksum.
    with sealed.body.getbuffer() as body:
        yield SentObject(sealed.size, sealed.checksum, body)


def _bucket_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    # Of a PutObject's arguments, those every request on the bucket carries.
    return {name: value for name, value in arguments.items() if name == "ExpectedBucketOwner"}
