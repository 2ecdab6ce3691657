"""A stream of chunks -> one object: a ``PutObject`` below the multipart threshold, a multipart upload past it,
with the parts cut as chunks arrive and sent a few at a time."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from model_runner.sink.budget import BudgetHold
from model_runner.sink.logs import upload_logger as logger
from model_runner.sink.settings import SinkSettings
from model_runner.sink.upload.multipart import MultipartUpload
from model_runner.sink.upload.outcome import UploadEvents, UploadOutcome
from model_runner.sink.upload.parts import PartPlan
from model_runner.sink.upload.put import put_object

if TYPE_CHECKING:
    from model_runner.sink.clients import SharedClient

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["upload_object"]


async def upload_object(
    shared: SharedClient,
    bucket: str,
    key: str,
    chunks: AsyncIterable[memoryview],
    settings: SinkSettings,
    *,
    metadata: dict[str, str] | None = None,
    events: UploadEvents | None = None,
    overwrite: bool = True,
) -> UploadOutcome:
    """
    Store the concatenated chunks as one object, atomically: the object appears whole or not at all.

    Below ``settings.multipart_threshold`` bytes it is one ``PutObject``. Past it, a :class:`MultipartUpload`:
    parts are cut as chunks arrive, at most ``settings.max_parts_in_flight`` upload at once while the next is
    produced, and any failure or cancellation, anyio's or asyncio's own, aborts the upload before it propagates.
    A cancellation that comes while S3 stores the object (``PutObject``, ``CompleteMultipartUpload``) waits for
    S3's answer (:data:`~model_runner.sink.upload.settle.ANSWER_TIMEOUT_SECONDS`); the log tells if it is stored.

    Each chunk takes its bytes from the client's byte budget when it arrives, before the next is pulled, and gives
    them back once sent. The writes sharing a budget thus hold at most its limit plus one body, the larger of
    ``multipart_threshold`` and the part size, plus one encoded batch (see :class:`ByteBudget`); each write
    waiting for room also holds the one batch it waits with.

    :param shared: The client, with the byte budget and the worker threads the writes through it share.
    :param bucket: The bucket.
    :param key: The object key.
    :param chunks: The object's bytes, in order.
    :param settings: Part sizes, concurrency and object options.
    :param metadata: User metadata of the object.
    :param events: Told of each stored part and each retried request.
    :param overwrite: Whether an existing object with the key may be replaced. If not, the request that stores the
        object is conditional (see :mod:`~model_runner.sink.upload.conditional`).
    :return: What S3 answered.
    :raises botocore.exceptions.ClientError: If S3 refuses a request after retries.
    :raises ChecksumMismatchError: If S3 stored other bytes than those sent.
    :raises ObjectExistsError: If ``overwrite`` is false and an object has the key; nothing is stored, and no
        multipart upload is left.
    """
    object_arguments: dict[str, Any] = {**settings.object_arguments(), **({"Metadata": metadata} if metadata else {})}
    body = shared.budget.hold()
    try:
        pending: list[memoryview] = []
        iterator = aiter(chunks)
        async for chunk in iterator:
            # Waiting here, before pulling the next chunk, is what bounds memory: the encoder waits too.
            await body.grow(len(chunk))
            pending.append(chunk)
            if body.size >= settings.multipart_threshold:
                upload = MultipartUpload(
                    shared, bucket, key, settings, object_arguments=object_arguments, events=events, overwrite=overwrite
                )
                async with upload:
                    await _send_parts(_PartSender(upload, body, settings), pending, iterator)
                    await upload.complete()
                return upload.outcome
        return await put_object(shared, bucket, key, pending, object_arguments, events, overwrite)
    finally:
        body.release()


async def _send_parts(sender: _PartSender, first_chunks: list[memoryview], chunks: AsyncIterator[memoryview]) -> None:
    try:
        async with anyio.create_task_group() as task_group:
            for chunk in first_chunks:
                await sender.add(chunk, task_group, counted=True)
            first_chunks.clear()
            async for chunk in chunks:
                await sender.add(chunk, task_group, counted=False)
            await sender.finish(task_group)
    except BaseExceptionGroup as group:
        raise single_error(group) from None


class _PartSender:
    """Cuts chunks into parts and sends each in a task of a task group, at most ``max_parts_in_flight`` at once."""

    def __init__(self, upload: MultipartUpload, body: BudgetHold, settings: SinkSettings) -> None:
        self._upload = upload
        self._body = body
        self._plan = PartPlan(settings.part_size)
        self._slots = anyio.Semaphore(settings.max_parts_in_flight)

    async def add(self, chunk: memoryview, task_group: TaskGroup, *, counted: bool) -> None:
        if not counted:
            await self._body.grow(len(chunk))
        for part in self._plan.add(chunk):
            await self._start(part, task_group)

    async def finish(self, task_group: TaskGroup) -> None:
        last = self._plan.finish()
        if last is not None:
            await self._start(last, task_group)

    async def _start(self, part: tuple[int, list[memoryview]], task_group: TaskGroup) -> None:
        # Waiting for a slot before taking more chunks bounds the parts in flight: the encoder waits too.
        number, pieces = part
        await self._slots.acquire()
        task_group.start_soon(self._send, number, pieces, self._body.split(sum(len(piece) for piece in pieces)))

    async def _send(self, number: int, pieces: list[memoryview], part: BudgetHold) -> None:
        try:
            await self._upload.send_part(number, pieces)
        finally:
            part.release()
            self._slots.release()


def single_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """
    The error that stands for a task group's failures: the first real error, else the first of them.

    A task group wraps its failures; callers expect the ClientError (or cancellation) itself, as documented. Parts in
    flight often fail together for one cause (a refused UploadPart, a dead endpoint): the first real error stands
    for them all, and cancellations of the sibling parts are only the consequence.

    :param group: What the task group raised.
    :return: One of its leaf exceptions.
    """
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
