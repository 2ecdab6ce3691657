"""One object in one ``PutObject``: the body sealed off the event loop when large, S3's answer awaited through any
cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from botocore.exceptions import ClientError

from model_runner.sink.exceptions import ObjectExistsError
from model_runner.sink.pacing import put_slots
from model_runner.sink.responses import retry_attempts
from model_runner.sink.upload.conditional import (
    SentObject,
    condition,
    is_precondition_failed,
    retry_conflicts,
    stored_by_this_write,
    was_retried,
)
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
    try:
        response: Mapping[str, Any] = await retry_conflicts(partial(_send, shared, arguments, sealed), "PutObject", key)
    except ClientError as error:
        if overwrite or not is_precondition_failed(error):
            raise
        response = await _own_object(shared, arguments, sealed, error)
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
    async with put_slots(shared.client):
        return await finish_or_settle(shared.client.put_object(Body=sealed.body, **arguments), settle)


async def _settle_cancelled_put(bucket: str, key: str, request: asyncio.Task[PutObjectOutputTypeDef]) -> None:
    try:
        stored: bool | None = await answer(request) is not None
    except TimeoutError:
        stored = None
    tell_cancelled(bucket, key, "PutObject", stored)


async def _own_object(
    shared: SharedClient, arguments: dict[str, Any], sealed: SealedBody, refusal: ClientError
) -> Mapping[str, Any]:
    # A conditional PutObject met an object with its key: this write's own, if an earlier attempt applied.
    bucket, key = arguments["Bucket"], arguments["Key"]
    if was_retried(refusal):
        with sealed.body.getbuffer() as body:
            sent = SentObject(sealed.size, sealed.checksum, body)
            head = await stored_by_this_write(shared.client, bucket, key, sent, _bucket_arguments(arguments))
        if head is not None:
            return {**head, "ResponseMetadata": refusal.response.get("ResponseMetadata", {})}
    raise ObjectExistsError(bucket, key) from refusal


def _bucket_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    # Of a PutObject's arguments, those every request on the bucket carries.
    return {name: value for name, value in arguments.items() if name == "ExpectedBucketOwner"}
