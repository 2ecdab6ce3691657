"""The sinks under faults injected between them and S3: they store the exact collection or fail clearly, and
never leave a partial object or a multipart upload behind."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import anyio
import orjson
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from support.proxy import FaultProxy, Rule

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ClientSettings, FeatureEncodingError, S3Sink, SinkSettings
from model_runner.sink.settings import MiB

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

# Parts as small as S3 allows, so a collection of ~12 MB makes three of them.
SMALL_PARTS = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, max_parts_in_flight=2)
MULTIPART_COUNT = 25_000


@pytest.fixture(scope="module")
def multipart_features() -> list[dict[str, Any]]:
    return list(synthetic_detections(MULTIPART_COUNT, seed=5))


def collection(features: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"type": "FeatureCollection", "features": features})


def assert_nothing_left(s3: Any, bucket: str) -> None:
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


def sink_through(
    proxy: FaultProxy, bucket: str, settings: SinkSettings = SMALL_PARTS, max_attempts: int | None = None
) -> AsyncS3Sink:
    client = ClientSettings(endpoint_url=proxy.url, max_attempts=max_attempts)
    return AsyncS3Sink(bucket, "faults", client=client, settings=settings)


async def test_flaky_network_every_write_stores_the_exact_collection(
    proxy: FaultProxy, bucket: str, s3: Any, multipart_features: list[dict[str, Any]]
) -> None:
    puts = {"PutObject", "UploadPart"}
    proxy.add_rule(Rule(None, "slowdown", probability=0.15))
    proxy.add_rule(Rule(None, "reset", probability=0.05))
    proxy.add_rule(Rule(puts, "error500_after", probability=0.05))
    # Each attempt fails a quarter of the time here: ten attempts make a lost write a one-in-a-million event.
    sink = sink_through(proxy, bucket, SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB), max_attempts=10)
    small = {f"small-{i}": list(synthetic_detections(50, seed=i)) for i in range(40)}
    async with anyio.create_task_group() as group:
        for image_id, features in small.items():
            group.start_soon(sink.write, image_id, features)
        group.start_soon(sink.write, "large", multipart_features)
    assert sum(rule.applied for rule in proxy.rules) > 5
    for image_id, features in [*small.items(), ("large", multipart_features)]:
        stored = s3.get_object(Bucket=bucket, Key=f"faults/{image_id}.geojson")["Body"].read()
        assert stored == collection(features)
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


async def test_every_upload_part_refused_fails_and_aborts(
    proxy: FaultProxy, bucket: str, s3: Any, multipart_features: list[dict[str, Any]]
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "refuse", status=403, code="AccessDenied"))
    assert await sink_through(proxy, bucket).write("refused", multipart_features) is False
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert_nothing_left(s3, bucket)


async def test_upload_parts_failing_past_retries_raise_the_client_error_and_abort(
    proxy: FaultProxy, bucket: str, s3: Any, multipart_features: list[dict[str, Any]]
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "refuse", status=500, code="InternalError"))
    sink = sink_through(proxy, bucket, SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB), max_attempts=2)
    with pytest.raises(ClientError) as raised:
        await sink.write("failing", multipart_features)
    assert raised.value.response["Error"]["Code"] == "InternalError"
    assert raised.value.operation_name == "UploadPart"
    assert_nothing_left(s3, bucket)


async def test_an_unserialisable_feature_after_parts_were_uploaded_aborts(
    proxy: FaultProxy, bucket: str, s3: Any, multipart_features: list[dict[str, Any]]
) -> None:
    def features() -> Iterator[Any]:
        yield from multipart_features
        # Pulled in a worker thread: waiting here holds the bad feature back until a part has gone to S3.
        deadline = time.monotonic() + 30
        while proxy.count("UploadPart") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        yield {"type": "Feature", "properties": {"bad": {1, 2}}}

    with pytest.raises(FeatureEncodingError) as raised:
        await sink_through(proxy, bucket).write("bad", features())
    assert raised.value.index == MULTIPART_COUNT
    assert proxy.count("UploadPart") >= 1
    # Exactly one abort S3 accepted: moto answers 500 to an abort racing a part it is still receiving, which
    # botocore retries, so attempts may be more.
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert_nothing_left(s3, bucket)


async def slow_features(features: Iterable[Any], pause_after: int, pause: anyio.Event) -> AsyncIterator[Any]:
    for index, feature in enumerate(features):
        if index == pause_after:
            pause.set()
            await anyio.sleep_forever()
        yield feature


async def test_a_write_cancelled_mid_multipart_aborts_the_upload(
    proxy: FaultProxy, bucket: str, s3: Any, multipart_features: list[dict[str, Any]]
) -> None:
    paused = anyio.Event()
    source = slow_features(itertools.cycle(multipart_features), MULTIPART_COUNT, paused)
    async with anyio.create_task_group() as group:
        group.start_soon(sink_through(proxy, bucket).write, "cancelled", source)
        await paused.wait()
        # The proxy counts in its own thread: there is no event of this loop to wait on.
        while proxy.count("UploadPart") < 2:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        group.cancel_scope.cancel()
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert_nothing_left(s3, bucket)


async def test_a_write_timing_out_mid_multipart_aborts_the_upload(
    proxy: FaultProxy, bucket: str, s3: Any, multipart_features: list[dict[str, Any]]
) -> None:
    # Parts stall at the proxy, so the timeout strikes while they are in flight.
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=30))
    with pytest.raises(TimeoutError):
        with anyio.fail_after(3):
            await sink_through(proxy, bucket).write("timed-out", multipart_features)
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert_nothing_left(s3, bucket)


async def test_a_write_cancelled_while_s3_creates_the_upload_still_aborts_it(
    proxy: FaultProxy, bucket: str, s3: Any, multipart_features: list[dict[str, Any]]
) -> None:
    # S3 creates the upload after the cancellation: only a write that waits for the upload id can abort it.
    proxy.add_rule(Rule({"CreateMultipartUpload"}, "delay", delay=1.5))

    async def expire_once_s3_creates(scope: anyio.CancelScope) -> None:
        # Not a fixed deadline: reaching the Create takes longer than any chosen one on a slow machine or Python.
        while proxy.peak_in_flight.get("CreateMultipartUpload", 0) < 1:  # noqa: ASYNC110
            await anyio.sleep(0.005)
        scope.deadline = anyio.current_time()

    with pytest.raises(TimeoutError):
        with anyio.fail_after(60) as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(expire_once_s3_creates, scope)
                await sink_through(proxy, bucket).write("cancelled-early", multipart_features)
    assert proxy.count("CreateMultipartUpload") == 1
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert_nothing_left(s3, bucket)


async def test_the_endpoint_down_gives_a_clear_error_within_the_retry_budget(proxy: FaultProxy, bucket: str) -> None:
    proxy.stop()
    sink = sink_through(proxy, bucket)
    with anyio.fail_after(60):  # a guard against a hang, not a speed check
        with pytest.raises(EndpointConnectionError):
            await sink.write("unreachable", [])


async def test_an_endpoint_that_resets_every_request_gives_a_clear_error(
    proxy: FaultProxy, bucket: str, s3: Any
) -> None:
    proxy.add_rule(Rule(None, "down"))
    with anyio.fail_after(60), pytest.raises(Exception) as raised:
        await sink_through(proxy, bucket).write("dead", list(synthetic_detections(10)))
    assert "Connection" in type(raised.value).__name__
    assert_nothing_left(s3, bucket)


def test_the_sync_facade_survives_the_same_faults(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    proxy.add_rule(Rule({"PutObject"}, "slowdown", times=2))
    proxy.add_rule(Rule({"PutObject"}, "reset", times=1))
    features = list(synthetic_detections(100, seed=9))
    sink = S3Sink(bucket, "faults", client=ClientSettings(endpoint_url=proxy.url, max_attempts=5))
    result = sink.write_with_result("sync", features)
    assert proxy.count("PutObject") == 4
    # aiohttp itself retries an idempotent request once on a reset connection, below botocore's count.
    assert result.retries >= 2
    assert s3.get_object(Bucket=bucket, Key="faults/sync.geojson")["Body"].read() == collection(features)
