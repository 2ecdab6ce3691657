"""The end of a sink or of its event loop while writes are in flight: they finish, or abort, on an open client."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import warnings
from typing import Any

import pytest
from support.proxy import FaultProxy, Rule

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ClientSettings, SinkSettings
from model_runner.sink.settings import MiB

pytestmark = pytest.mark.timeout(120)

# Parts as small as S3 allows, so a collection of ~12 MB makes three of them.
SMALL_PARTS = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, max_parts_in_flight=2)


@pytest.fixture(scope="module")
def multipart_features() -> list[dict[str, Any]]:
    return list(synthetic_detections(25_000, seed=5))


def uploads_left(s3: Any, bucket: str) -> list[str]:
    return [upload["Key"] for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


async def until_in_flight(proxy: FaultProxy, operation: str) -> None:
    deadline = time.monotonic() + 30
    # The proxy counts in its own thread: there is no event of this loop to wait on.
    while not proxy.peak_in_flight.get(operation) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert proxy.peak_in_flight.get(operation), f"no {operation} reached the proxy"


def test_a_loop_ending_during_a_multipart_write_aborts_it_and_leaves_no_session_open(
    proxy: FaultProxy,
    bucket: str,
    s3: Any,
    multipart_features: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=0.5))
    # An abort takes a round trip: the client must stay open until its answer.
    proxy.add_rule(Rule({"AbortMultipartUpload"}, "delay", delay=0.5))
    sink = AsyncS3Sink(bucket, "shutdown", client=ClientSettings(endpoint_url=proxy.url), settings=SMALL_PARTS)
    writes: list[asyncio.Task[bool]] = []

    async def main() -> None:
        # A fire-and-forget write, still running when asyncio.run ends and cancels it.
        writes.append(asyncio.create_task(sink.write("background", multipart_features)))
        await until_in_flight(proxy, "UploadPart")

    caplog.set_level(logging.ERROR, logger="asyncio")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        asyncio.run(main())
        assert writes.pop().cancelled()
        # The task's frames, and the tracebacks of the records logged so far, hold the client: dropped, whatever
        # it left open is reported when collected.
        logged = [record.getMessage() for record in caplog.records]
        caplog.clear()
        gc.collect()
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert uploads_left(s3, bucket) == []
    assert [warning for warning in caught if issubclass(warning.category, ResourceWarning)] == []
    logged += [record.getMessage() for record in caplog.records]
    assert [message for message in logged if "Unclosed" in message] == []


@pytest.mark.anyio
async def test_aclose_waits_for_a_write_in_flight(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    proxy.add_rule(Rule({"PutObject"}, "delay", delay=1.0))
    sink = AsyncS3Sink(bucket, "aclose", client=ClientSettings(endpoint_url=proxy.url))
    write = asyncio.create_task(sink.write("scene", list(synthetic_detections(50, seed=1))))
    await until_in_flight(proxy, "PutObject")
    await sink.aclose()
    assert write.done()
    assert write.result() is True
    assert "Contents" in s3.list_objects_v2(Bucket=bucket)


@pytest.mark.anyio
async def test_leaving_async_with_waits_for_a_cancelled_write_to_abort(
    proxy: FaultProxy, bucket: str, s3: Any, multipart_features: list[dict[str, Any]]
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=30))
    proxy.add_rule(Rule({"AbortMultipartUpload"}, "delay", delay=1.0))
    async with AsyncS3Sink(
        bucket, "aclose", client=ClientSettings(endpoint_url=proxy.url), settings=SMALL_PARTS
    ) as sink:
        write = asyncio.create_task(sink.write("cancelled", multipart_features))
        await until_in_flight(proxy, "UploadPart")
        write.cancel()
    assert write.cancelled()
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert uploads_left(s3, bucket) == []
