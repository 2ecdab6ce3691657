"""
Conditional create, ``overwrite=False``: S3 stores the object only if no object has its key (``If-None-Match: *``),
so that two writers racing for a key cannot both win.

Two answers need care. A request S3 applied but whose answer was lost (a 500 after the fact, a reset) is retried by
botocore, and the retry meets ``412 PreconditionFailed`` from the very object it stored: a ``HeadObject`` tells it
apart by its size and checksum. S3's ``409 ConditionalRequestConflict`` (a concurrent conditional write on the key)
is not retried by botocore: it is retried here, a bounded number of times.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
from botocore.exceptions import ClientError

from model_runner.sink.exceptions import ObjectExistsError
from model_runner.sink.logs import upload_logger as logger
from model_runner.sink.responses import error_code, retry_attempts

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import HeadObjectOutputTypeDef

__all__ = [
    "CONFLICT_RETRIES",
    "SentObject",
    "StoreTarget",
    "check_overwrite",
    "condition",
    "is_precondition_failed",
    "retry_conflicts",
    "store_conditionally",
    "stored_by_this_write",
    "was_retried",
]


# S3 answers 409 while another conditional write on the key is in flight; it settles within moments.
CONFLICT_RETRIES = 4
CONFLICT_BACKOFF_SECONDS = 0.1

_Answer = TypeVar("_Answer")


def check_overwrite(overwrite: object) -> None:
    """
    Refuse an ``overwrite`` that is not a bool: ``"no"`` or ``0`` would read as a wish it may not express.

    :param overwrite: What the caller passed.
    :raises TypeError: If it is not a bool.
    """
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, not {type(overwrite).__name__}")


def condition(overwrite: bool) -> dict[str, Any]:
    """
    The arguments that make a ``PutObject`` or ``CompleteMultipartUpload`` conditional.

    :param overwrite: Whether an existing object may be replaced.
    :return: ``IfNoneMatch="*"`` unless it may.
    """
    return {} if overwrite else {"IfNoneMatch": "*"}


def is_precondition_failed(error: ClientError) -> bool:
    """
    Whether S3 refused a conditional request because an object has the key.

    :param error: S3's refusal.
    :return: `True` for ``412 PreconditionFailed``.
    """
    return error_code(error) == "PreconditionFailed"


async def retry_conflicts(send: Callable[[], Awaitable[_Answer]], operation: str, key: str) -> _Answer:
    """
    Send a conditional request, again after each ``409 ConditionalRequestConflict``, at most
    :data:`CONFLICT_RETRIES` more times, waiting longer each time.

    :param send: Sends the request from the start (a body rewound).
    :param operation: The S3 operation, for the log.
    :param key: The object key, for the log.
    :return: S3's answer.
    :raises botocore.exceptions.ClientError: If S3 refuses it otherwise, or still conflicts after the retries.
    """
    for attempt in range(CONFLICT_RETRIES + 1):
        try:
            return await send()
        except ClientError as error:
            if error_code(error) != "ConditionalRequestConflict" or attempt == CONFLICT_RETRIES:
                raise
            logger.info("%s of %s conflicted with another conditional write: retrying", operation, key)
        await anyio.sleep(CONFLICT_BACKOFF_SECONDS * 2**attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class SentObject:
    """
    What a write sent, to recognise the object it stored.

    :param size: The object's size.
    :param checksum: Its CRC32, base64, as S3 reports it.
    :param body: Its bytes, when the write still has them whole (a ``PutObject``): their MD5 is the ETag S3 gives
        an object stored in one request without KMS, for a server that reports no checksum.
    """

    size: int
    checksum: str
    body: memoryview | None = None


async def stored_by_this_write(
    client: S3Client, bucket: str, key: str, sent: SentObject, bucket_arguments: dict[str, Any]
) -> HeadObjectOutputTypeDef | None:
    """
    After a retried conditional request met ``412``, whether the object with the key is the one this write stored
    (its first attempt applied, its answer lost): same size and same checksum.

    :param client: The S3 client.
    :param bucket: The bucket.
    :param key: The object key.
    :param sent: What the write sent.
    :param bucket_arguments: What every request on the bucket carries.
    :return: The object's ``HeadObject`` answer if it is this write's, else `None`.
    :raises botocore.exceptions.ClientError: If S3 refuses the ``HeadObject``.
    """
    head = await client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED", **bucket_arguments)
    if head.get("ContentLength") != sent.size:
        return None
    reported = head.get("ChecksumCRC32")
    if reported is not None:
        return head if reported == sent.checksum else None
    etag = head.get("ETag", "").strip('"')
    if sent.body is None or len(etag) != 32:
        logger.warning(
            "s3://%s/%s reports no checksum: it cannot be told from another writer's, so it is not", bucket, key
        )
        return None
    digest = await anyio.to_thread.run_sync(_md5, sent.body)
    return head if digest == etag else None


def _md5(body: memoryview) -> str:
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def was_retried(error: ClientError) -> bool:
    """
    Whether botocore sent the refused request more than once: only then can an earlier attempt have applied.

    :param error: S3's refusal.
    :return: `True` if it was retried.
    """
    return retry_attempts(error.response) > 0


@dataclass(frozen=True)
class StoreTarget:
    """
    Where a storing request puts its object.

    :param client: The S3 client.
    :param bucket: The bucket.
    :param key: The object key.
    :param bucket_arguments: What every request on the bucket carries.
    """

    client: S3Client
    bucket: str
    key: str
    bucket_arguments: dict[str, Any]


async def store_conditionally(
    send: Callable[[], Awaitable[Mapping[str, Any]]],
    operation: str,
    target: StoreTarget,
    overwrite: bool,
    sent: Callable[[], AbstractContextManager[SentObject]],
) -> Mapping[str, Any]:
    """
    Send the request that stores an object (``PutObject``, ``CompleteMultipartUpload``), retrying S3's conflicts;
    if it carried ``If-None-Match: *`` and met an object, tell this write's own (an earlier attempt applied) from
    another's.

    :param send: Sends the request once, with :func:`condition` among its arguments.
    :param operation: The request's name, for the logs.
    :param target: Where the object goes.
    :param overwrite: Whether the request may replace an object.
    :param sent: Gives what the write sent, should it need recognising.
    :return: S3's answer, or the stored object's ``HeadObject`` answer when it was recognised as this write's.
    :raises ObjectExistsError: If another object has the key.
    """
    try:
        return await retry_conflicts(send, operation, target.key)
    except ClientError as refusal:
        if overwrite or not is_precondition_failed(refusal):
            raise
        if was_retried(refusal):
            with sent() as what:
                head = await stored_by_this_write(
                    target.client, target.bucket, target.key, what, target.bucket_arguments
                )
            if head is not None:
                return {**head, "ResponseMetadata": refusal.response.get("ResponseMetadata", {})}
        raise ObjectExistsError(target.bucket, target.key) from refusal
