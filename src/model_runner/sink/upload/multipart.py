"""One multipart upload as one object: create, send_part, complete, and abort, registered right after the create."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from contextlib import nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from botocore.exceptions import ClientError

from model_runner.sink.logs import upload_logger as logger
from model_runner.sink.responses import error_code, retry_attempts
from model_runner.sink.settings import SinkSettings
from model_runner.sink.upload.conditional import SentObject, StoreTarget, condition, store_conditionally
from model_runner.sink.upload.outcome import UploadEvents, UploadOutcome, tell_retries, verify_checksum
from model_runner.sink.upload.parts import ObjectCrc
from model_runner.sink.upload.settle import (
    ABORT_TIMEOUT_SECONDS,
    ANSWER_TIMEOUT_SECONDS,
    answer,
    finish_or_settle,
    run_to_the_end,
    tell_cancelled,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import (
        CompletedPartTypeDef,
        CompleteMultipartUploadOutputTypeDef,
        CreateMultipartUploadOutputTypeDef,
    )

    from model_runner.sink.clients import SharedClient

__all__ = ["MultipartUpload"]


class MultipartUpload:
    """
    One multipart upload: created, sent part by part, then completed, or aborted so that S3 drops its parts.

    ``async with upload:`` creates it; from the moment S3 gives the upload id, any exception or cancellation
    leaving the block aborts the upload before it propagates, be it anyio's (a cancel scope, ``fail_after``) or
    asyncio's own (``task.cancel()``, ``asyncio.timeout``, ``asyncio.wait_for``, ``asyncio.TaskGroup``). The
    requests whose answer decides what is left behind (create, complete, abort) run in tasks of their own, which
    no cancellation reaches: a cancelled write waits for their answer, at most :data:`ANSWER_TIMEOUT_SECONDS`,
    and for the abort, at most :data:`ABORT_TIMEOUT_SECONDS`, through any further cancellation.

    :param shared: The client, and the worker threads that seal parts.
    :param bucket: The bucket.
    :param key: The object key.
    :param settings: The options every request on the bucket carries.
    :param object_arguments: The object's options (content type, ACL, metadata...), for the create.
    :param events: Told of each stored part and each retried request.
    :param overwrite: Whether the complete may replace an existing object with the key; if not, it is conditional
        (``If-None-Match: *``), and refused with :class:`ObjectExistsError` when an object has the key.
    """

    def __init__(
        self,
        shared: SharedClient,
        bucket: str,
        key: str,
        settings: SinkSettings,
        *,
        object_arguments: dict[str, Any],
        events: UploadEvents | None = None,
        overwrite: bool = True,
    ) -> None:
        self.bucket = bucket
        self.key = key
        #: The id S3 gave the upload, once created.
        self.upload_id: str | None = None
        #: What S3 answered so far.
        self.outcome = UploadOutcome()
        self._client = shared.client
        self._limiter = shared.limiter
        self._bucket_arguments = settings.bucket_arguments()
        self._object_arguments = object_arguments
        self._events = events
        self._overwrite = overwrite
        self._parts: dict[int, CompletedPartTypeDef] = {}
        self._crc = ObjectCrc()
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
        created = await finish_or_settle(
            self._client.create_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                ChecksumAlgorithm="CRC32",
                ChecksumType="FULL_OBJECT",
                **self._object_arguments,
            ),
            self._abort_once_created,
        )
        self.upload_id = created["UploadId"]
        self.outcome.retries += retry_attempts(created)
        tell_retries(self._events, "CreateMultipartUpload", created)

    async def send_part(self, number: int, pieces: list[memoryview]) -> None:
        """
        Seal one part in a worker thread and send it with its CRC32, which the object's CRC32 combines
        (:class:`~model_runner.sink.upload.parts.ObjectCrc`): parts may be sent concurrently and in any order.

        :param number: The part number, from 1.
        :param pieces: The part's bytes; emptied once copied into the request body.
        :raises botocore.exceptions.ClientError: If S3 refuses it after retries.
        """
        assert self.upload_id is not None, "send_part before create"
        sealed = await self._crc.seal(number, pieces, self._limiter)
        pieces.clear()
        response = await self._client.upload_part(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=sealed.body,
            ContentLength=sealed.size,
            ChecksumCRC32=sealed.checksum,
            **self._bucket_arguments,
        )
        self._parts[number] = {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": sealed.checksum}
        self.outcome.bytes += sealed.size
        self.outcome.retries += retry_attempts(response)
        tell_retries(self._events, "UploadPart", response)
        if self._events is not None:
            self._events.part_stored(number, sealed.size)

    async def complete(self) -> None:
        """
        Join the parts sent into the object, giving S3 the CRC32 of its bytes, which S3 reports as the object's
        checksum (``FULL_OBJECT``). Cancelled while S3 completes it, it waits for S3's answer, aborts the
        upload unless it was completed, and logs whether the object is stored, before the cancellation propagates.

        :raises botocore.exceptions.ClientError: If S3 refuses it after retries.
        :raises ChecksumMismatchError: If S3 stored other bytes than those sent.
        :raises ObjectExistsError: If the upload is conditional and an object has the key; the upload is left for
            the ``async with`` block to abort.
        """
        assert self.upload_id is not None, "complete before create"
        parts = [self._parts[number] for number in sorted(self._parts)]
        checksum = self._crc.checksum
        arguments: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self.key,
            "UploadId": self.upload_id,
            "MultipartUpload": {"Parts": parts},
            "ChecksumCRC32": checksum,
            "ChecksumType": "FULL_OBJECT",
            **self._bucket_arguments,
            **condition(self._overwrite),
        }

        async def send() -> CompleteMultipartUploadOutputTypeDef:
            request = self._client.complete_multipart_upload(**arguments)
            return await finish_or_settle(request, self._settle_cancelled_completion)

        target = StoreTarget(self._client, self.bucket, self.key, self._bucket_arguments)
        what = SentObject(self.outcome.bytes, checksum)

        def sent() -> nullcontext[SentObject]:
            return nullcontext(what)

        completed = await store_conditionally(send, "CompleteMultipartUpload", target, self._overwrite, sent)
        self._settled = True
        self._record(completed, checksum, len(parts))

    def _record(self, completed: Mapping[str, Any], checksum: str, parts: int) -> None:
        self.outcome.checksum = checksum
        verify_checksum(completed, checksum, self.key)
        tell_retries(self._events, "CompleteMultipartUpload", completed)
        self.outcome.seconds = time.perf_counter() - self._started
        self.outcome.parts = parts
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
        await run_to_the_end(self._abort_request())

    async def _abort_once_created(self, request: asyncio.Task[CreateMultipartUploadOutputTypeDef]) -> None:
        try:
            created = await answer(request)
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

    async def _settle_cancelled_completion(self, request: asyncio.Task[CompleteMultipartUploadOutputTypeDef]) -> None:
        self._settled = True
        try:
            completed = await answer(request)
        except TimeoutError:
            completed = None
        stored: bool | None = True
        if completed is None:
            # Aborting settles it either way: S3 no longer having the upload means it completed it.
            stored = {"aborted": False, "gone": True}.get(await self._abort_request())
        tell_cancelled(self.bucket, self.key, "CompleteMultipartUpload", stored)

    async def _abort_request(self) -> Literal["aborted", "gone", "failed"]:
        assert self.upload_id is not None
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
