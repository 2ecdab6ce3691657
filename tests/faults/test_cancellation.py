"""Whatever cancels a write, anyio or asyncio itself, and wherever it lands, no multipart upload is left behind,
and a write cancelled while S3 stores the object tells whether it was stored.

The fault proxy holds the request of one operation for a while; the write is cancelled as soon as the proxy has that
request in hand, so the cancellation lands while it is in flight, however long the write took to get there."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import orjson
import pytest
from support.proxy import FaultProxy, Rule

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ClientSettings, SinkSettings
from model_runner.sink.settings import MiB

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

# A 1 MiB threshold creates the upload early; ~6 MB of features then make two parts, a full one and a short one.
PARTS = SinkSettings(part_size=5 * MiB, multipart_threshold=1 * MiB, max_parts_in_flight=2)
# How long the proxy holds the request the cancellation must land on: far longer than noticing it takes.
HELD = 1.5

Write = Callable[[], Awaitable[Any]]
Ready = Callable[[], bool]


@pytest.fixture(scope="module")
def features() -> list[dict[str, Any]]:
    return list(synthetic_detections(12_000, seed=11))


def body(features: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"type": "FeatureCollection", "features": features})


async def until(condition: Ready) -> None:
    deadline = time.monotonic() + 60
    # The proxy counts in its own thread: there is no event of this loop to wait on.
    while not condition():
        assert time.monotonic() < deadline, "the request never reached the proxy"
        await asyncio.sleep(0.005)


def in_flight(proxy: FaultProxy, operation: str) -> Ready:
    # Held by a "delay" rule, a request that has reached the proxy is still in flight.
    return lambda: proxy.peak_in_flight.get(operation, 0) >= 1


async def anyio_fail_after(write: Write, ready: Ready) -> None:
    async def expire(scope: anyio.CancelScope) -> None:
        await until(ready)
        scope.deadline = anyio.current_time()

    with pytest.raises(TimeoutError):
        with anyio.fail_after(120) as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(expire, scope)
                await write()


async def task_cancel(write: Write, ready: Ready) -> None:
    task = asyncio.ensure_future(write())
    await until(ready)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def asyncio_wait_for(write: Write, ready: Ready) -> None:
    task = asyncio.ensure_future(write())
    await until(ready)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(task, 0.01)
    assert task.cancelled()


async def asyncio_timeout(write: Write, ready: Ready) -> None:
    async def expire(deadline: Any) -> None:
        await until(ready)
        deadline.reschedule(asyncio.get_running_loop().time())

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as deadline:
            watcher = asyncio.ensure_future(expire(deadline))
            try:
                await write()
            finally:
                watcher.cancel()


class Stop(Exception):
    pass


async def asyncio_task_group(write: Write, ready: Ready) -> None:
    async def stop() -> None:
        await until(ready)
        raise Stop

    with pytest.raises(BaseExceptionGroup) as raised:
        async with asyncio.TaskGroup() as group:
            written = group.create_task(write())
            group.create_task(stop())
    assert raised.group_contains(Stop)
    assert written.cancelled()


# Python 3.10 has neither asyncio.timeout nor asyncio.TaskGroup; task.cancel() and wait_for take the same path there.
CANCELLERS = [anyio_fail_after, task_cancel, asyncio_wait_for]
if sys.version_info >= (3, 11):
    CANCELLERS += [asyncio_timeout, asyncio_task_group]


def sink(proxy: FaultProxy, bucket: str, settings: SinkSettings = PARTS) -> AsyncS3Sink:
    return AsyncS3Sink(bucket, "cancelled", client=ClientSettings(endpoint_url=proxy.url), settings=settings)


def uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def objects(s3: Any, bucket: str) -> list[str]:
    return [item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def told(caplog: pytest.LogCaptureFixture, operation: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "model_runner.sink.upload" and f"cancelled during {operation}" in record.getMessage()
    ]


@pytest.mark.parametrize("cancel", CANCELLERS)
async def test_a_write_cancelled_while_s3_creates_the_upload_aborts_it(
    proxy: FaultProxy, bucket: str, s3: Any, features: list[dict[str, Any]], cancel: Callable[[Write, Ready], Any]
) -> None:
    proxy.add_rule(Rule({"CreateMultipartUpload"}, "delay", delay=HELD))
    await cancel(lambda: sink(proxy, bucket).write("image", features), in_flight(proxy, "CreateMultipartUpload"))
    assert proxy.count("CreateMultipartUpload") == 1
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert uploads(s3, bucket) == []
    assert objects(s3, bucket) == []


@pytest.mark.parametrize("cancel", CANCELLERS)
async def test_a_write_cancelled_while_parts_are_in_flight_aborts_the_upload(
    proxy: FaultProxy, bucket: str, s3: Any, features: list[dict[str, Any]], cancel: Callable[[Write, Ready], Any]
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=HELD))
    await cancel(lambda: sink(proxy, bucket).write("image", features), in_flight(proxy, "UploadPart"))
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert uploads(s3, bucket) == []
    assert objects(s3, bucket) == []


@pytest.mark.parametrize("cancel", CANCELLERS)
async def test_a_write_cancelled_while_s3_completes_the_upload_waits_and_tells_it_is_stored(
    proxy: FaultProxy,
    bucket: str,
    s3: Any,
    features: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
    cancel: Callable[[Write, Ready], Any],
) -> None:
    caplog.set_level(logging.INFO, logger="model_runner.sink.upload")
    proxy.add_rule(Rule({"CompleteMultipartUpload"}, "delay", delay=HELD))
    await cancel(lambda: sink(proxy, bucket).write("image", features), in_flight(proxy, "CompleteMultipartUpload"))
    assert uploads(s3, bucket) == []
    assert s3.get_object(Bucket=bucket, Key="cancelled/image.geojson")["Body"].read() == body(features)
    assert told(caplog, "CompleteMultipartUpload") == [
        f"write of s3://{bucket}/cancelled/image.geojson was cancelled during CompleteMultipartUpload: "
        "S3 stored the object whole"
    ]
    assert proxy.count("AbortMultipartUpload") == 0


@pytest.mark.parametrize("cancel", [anyio_fail_after, task_cancel])
async def test_a_write_cancelled_while_s3_refuses_to_complete_aborts_and_tells_nothing_is_stored(
    proxy: FaultProxy,
    bucket: str,
    s3: Any,
    features: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
    cancel: Callable[[Write, Ready], Any],
) -> None:
    caplog.set_level(logging.INFO, logger="model_runner.sink.upload")
    proxy.add_rule(Rule({"CompleteMultipartUpload"}, "refuse", delay=HELD, status=400, code="InvalidPart"))
    await cancel(lambda: sink(proxy, bucket).write("image", features), in_flight(proxy, "CompleteMultipartUpload"))
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert uploads(s3, bucket) == []
    assert objects(s3, bucket) == []
    assert told(caplog, "CompleteMultipartUpload") == [
        f"write of s3://{bucket}/cancelled/image.geojson was cancelled during CompleteMultipartUpload: "
        "nothing is stored"
    ]


@pytest.mark.parametrize("cancel", CANCELLERS)
async def test_a_write_cancelled_while_s3_puts_the_object_waits_and_tells_it_is_stored(
    proxy: FaultProxy, bucket: str, s3: Any, caplog: pytest.LogCaptureFixture, cancel: Callable[[Write, Ready], Any]
) -> None:
    caplog.set_level(logging.INFO, logger="model_runner.sink.upload")
    small = list(synthetic_detections(100, seed=3))
    proxy.add_rule(Rule({"PutObject"}, "delay", delay=HELD))
    await cancel(lambda: sink(proxy, bucket).write("image", small), in_flight(proxy, "PutObject"))
    assert s3.get_object(Bucket=bucket, Key="cancelled/image.geojson")["Body"].read() == body(small)
    assert told(caplog, "PutObject") == [
        f"write of s3://{bucket}/cancelled/image.geojson was cancelled during PutObject: S3 stored the object whole"
    ]


@pytest.mark.parametrize("cancel", [anyio_fail_after, task_cancel])
async def test_a_write_cancelled_while_s3_refuses_the_put_tells_nothing_is_stored(
    proxy: FaultProxy, bucket: str, s3: Any, caplog: pytest.LogCaptureFixture, cancel: Callable[[Write, Ready], Any]
) -> None:
    caplog.set_level(logging.INFO, logger="model_runner.sink.upload")
    proxy.add_rule(Rule({"PutObject"}, "refuse", delay=HELD, status=400, code="InvalidRequest"))
    small = list(synthetic_detections(100, seed=3))
    await cancel(lambda: sink(proxy, bucket).write("image", small), in_flight(proxy, "PutObject"))
    assert objects(s3, bucket) == []
    assert told(caplog, "PutObject") == [
        f"write of s3://{bucket}/cancelled/image.geojson was cancelled during PutObject: nothing is stored"
    ]


async def write_cancelled_twice(
    proxy: FaultProxy, first: Callable[[asyncio.Task[Any]], None], write: Write, ready: Ready
) -> None:
    task = asyncio.ensure_future(write())
    await until(ready)
    first(task)
    # The abort's first attempt is held, then refused with a 503 that botocore retries: a write whose abort
    # gives up on the second cancellation never sends the retry.
    await until(in_flight(proxy, "AbortMultipartUpload"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_second_native_cancellation_during_the_abort_still_leaves_no_upload(
    proxy: FaultProxy, bucket: str, s3: Any, features: list[dict[str, Any]]
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=HELD))
    proxy.add_rule(Rule({"AbortMultipartUpload"}, "slowdown", delay=HELD, times=1))
    write = sink(proxy, bucket).write
    await write_cancelled_twice(
        proxy, asyncio.Task.cancel, lambda: write("image", features), in_flight(proxy, "UploadPart")
    )
    assert proxy.count("AbortMultipartUpload") == 2
    assert uploads(s3, bucket) == []
    assert objects(s3, bucket) == []


@pytest.mark.parametrize("operation", ["CreateMultipartUpload", "UploadPart"])
async def test_a_native_cancellation_during_the_abort_of_an_anyio_cancellation_still_leaves_no_upload(
    proxy: FaultProxy, bucket: str, s3: Any, features: list[dict[str, Any]], operation: str
) -> None:
    proxy.add_rule(Rule({operation}, "delay", delay=HELD))
    proxy.add_rule(Rule({"AbortMultipartUpload"}, "slowdown", delay=HELD, times=1))
    scopes: list[anyio.CancelScope] = []

    async def write() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await sink(proxy, bucket).write("image", features)

    await write_cancelled_twice(proxy, lambda _: scopes[0].cancel(), write, in_flight(proxy, operation))
    assert proxy.count("AbortMultipartUpload") == 2
    assert uploads(s3, bucket) == []
    assert objects(s3, bucket) == []


async def test_an_abort_that_fails_logs_the_upload_id_at_error_for_an_operator(
    proxy: FaultProxy, bucket: str, s3: Any, features: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "refuse", status=400, code="InvalidRequest"))
    proxy.add_rule(Rule({"AbortMultipartUpload"}, "refuse", status=403, code="AccessDenied"))
    with pytest.raises(Exception, match="InvalidRequest"):
        await sink(proxy, bucket).write("image", features)
    left = uploads(s3, bucket)
    assert [upload["Key"] for upload in left] == ["cancelled/image.geojson"]
    upload_id = left[0]["UploadId"]
    errors = [
        record
        for record in caplog.records
        if record.name == "model_runner.sink.upload" and record.levelno == logging.ERROR
    ]
    assert len(errors) == 1
    assert (errors[0].bucket, errors[0].key, errors[0].upload_id) == (bucket, "cancelled/image.geojson", upload_id)
    message = errors[0].getMessage()
    assert all(part in message for part in (bucket, "cancelled/image.geojson", upload_id, "AccessDenied"))
    s3.abort_multipart_upload(Bucket=bucket, Key="cancelled/image.geojson", UploadId=upload_id)
