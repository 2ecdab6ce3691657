"""
Requests whose answer decides what is stored or left behind (a create, a complete, an abort): each runs in a task of
its own, which no cancellation of the write reaches, anyio's or asyncio's own, and is waited for a bounded time.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio

from model_runner.sink.logs import upload_logger as logger

__all__ = [
    "ABORT_TIMEOUT_SECONDS",
    "ANSWER_TIMEOUT_SECONDS",
    "answer",
    "finish_or_settle",
    "run_to_the_end",
    "tell_cancelled",
]


# An abort must finish even when the write was cancelled, but must not hang a shutdown either.
ABORT_TIMEOUT_SECONDS = 60.0
# How long a cancelled write waits for S3's answer to a request that decides what is stored or left behind.
ANSWER_TIMEOUT_SECONDS = 60.0

_Answer = TypeVar("_Answer")


async def finish_or_settle(
    request: Coroutine[Any, Any, _Answer], settle: Callable[[asyncio.Task[_Answer]], Coroutine[Any, Any, None]]
) -> _Answer:
    """
    Send a request in a task of its own and return its answer. Cancelled meanwhile, the caller runs ``settle`` on
    the request's task to its end (:func:`run_to_the_end`), then the cancellation propagates.

    :param request: The request, not yet started.
    :param settle: What to do with the request still in flight once the caller is cancelled; it bounds its own
        duration, e.g. with :func:`answer`.
    :return: S3's answer.
    :raises botocore.exceptions.ClientError: If S3 refuses the request after retries.
    """
    task = asyncio.create_task(request)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await run_to_the_end(settle(task))
        raise


async def run_to_the_end(work: Coroutine[Any, Any, object]) -> None:
    """
    Run ``work`` in a task of its own, which no cancellation of the caller reaches, and wait for its end; then raise
    the first cancellation that came meanwhile, if any. A failure of the work is logged, not raised.

    :param work: Clean-up that bounds its own duration.
    :raises asyncio.CancelledError: Once the work is done, if the caller was cancelled meanwhile.
    """
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


async def answer(request: asyncio.Task[_Answer]) -> _Answer | None:
    """
    S3's answer to a request of a write, waited for after the write was cancelled.

    :param request: The request's task.
    :return: The answer, or `None` if the request failed.
    :raises TimeoutError: If there is no answer within :data:`ANSWER_TIMEOUT_SECONDS`; the request is cancelled.
    """
    done, _ = await asyncio.wait({request}, timeout=ANSWER_TIMEOUT_SECONDS)
    if not done:
        request.cancel()
        raise TimeoutError(f"no answer within {ANSWER_TIMEOUT_SECONDS} s")
    if request.cancelled() or request.exception() is not None:
        return None
    return request.result()


def tell_cancelled(bucket: str, key: str, operation: str, stored: bool | None) -> None:
    """
    Log what a write cancelled while S3 stored its object left: the object whole, nothing, or unknown.

    :param bucket: The bucket.
    :param key: The object key.
    :param operation: The request in flight, e.g. ``"PutObject"``.
    :param stored: Whether the object is stored; `None` if S3 did not tell.
    """
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
