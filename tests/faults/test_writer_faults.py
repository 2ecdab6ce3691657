"""The open writer under faults on the wire: an upload S3 refuses poisons the writer, which then stores nothing and
leaves no multipart upload; a network failing now and then still stores every batch whole."""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError
from support.proxy import FaultProxy, Rule
from support.threads import run_on_threads

from model_runner.sink import AsyncS3Sink, ClientSettings, S3Sink, SinkError, SinkSettings
from model_runner.sink.settings import MiB

pytestmark = pytest.mark.timeout(180)

SMALL_PARTS = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, max_parts_in_flight=2)


PAD = "x" * 300


def batch(number: int, size: int = 10_000) -> list[dict[str, Any]]:
    return [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [number, n]},
            "properties": {"b": [number, n], "pad": PAD},
        }
        for n in range(size)
    ]


def assert_nothing_left(s3: Any, bucket: str) -> None:
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


@pytest.mark.anyio
async def test_a_refused_part_poisons_the_writer_its_adds_and_exit_raise_and_nothing_is_left(
    proxy: FaultProxy, bucket: str, s3: Any
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "refuse", status=403, code="AccessDenied"))
    sink = AsyncS3Sink(bucket, "refused", settings=SMALL_PARTS, client=ClientSettings(endpoint_url=proxy.url))
    with pytest.raises(ClientError, match="AccessDenied") as at_exit:
        async with sink.open("scene") as writer:
            deadline = time.monotonic() + 120
            with pytest.raises(ClientError, match="AccessDenied"):
                number = 0
                while True:
                    assert time.monotonic() < deadline, "the refused part never reached the adds"
                    await writer.add(batch(number))
                    number += 1
            with pytest.raises(ClientError):
                await writer.add(batch(number))
    assert at_exit.value.operation_name == "UploadPart"
    assert writer.result is None
    assert proxy.count("AbortMultipartUpload") >= 1
    await sink.aclose()
    assert_nothing_left(s3, bucket)


class Tracked(dict[str, Any]):
    """A feature that a weak reference can watch: orjson writes it as the dict it is."""


@pytest.mark.anyio
async def test_a_writer_holds_its_buffered_batches_as_bytes_not_features(
    proxy: FaultProxy, bucket: str, read_object: Any
) -> None:
    # The write is held at its bucket check, so nothing is taken from the writer's buffer while batches are added.
    proxy.add_rule(Rule({"HeadBucket"}, "delay", delay=3.0))
    sink = AsyncS3Sink(bucket, "held", client=ClientSettings(endpoint_url=proxy.url))
    watched: list[weakref.ref[Tracked]] = []
    async with sink.open("scene") as writer:
        for number in range(3):
            features = [Tracked(feature) for feature in batch(number, 100)]
            watched += map(weakref.ref, features)
            await writer.add(features)
            del features
        gc.collect()
        # Encoded as they were added: the writer keeps none of the features it was given.
        assert [ref for ref in watched if ref() is not None] == []
        assert proxy.count("HeadBucket") == 0
    assert writer.result is not None
    assert writer.result.features == 300
    stored = orjson.loads(read_object("held/scene.geojson"))
    assert stored["features"] == batch(0, 100) + batch(1, 100) + batch(2, 100)
    await sink.aclose()


def test_the_sync_writer_stores_every_batch_whole_through_retried_requests(
    proxy: FaultProxy, bucket: str, s3: Any
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "slowdown", times=2))
    proxy.add_rule(Rule({"UploadPart"}, "error500_after", times=1))
    proxy.add_rule(Rule({"CompleteMultipartUpload"}, "slowdown", times=1))
    client = ClientSettings(endpoint_url=proxy.url, max_attempts=10)
    sink = S3Sink(bucket, "flaky", settings=SMALL_PARTS, client=client)

    def model(thread: int) -> None:
        for number in range(thread, 16, 4):
            writer.add(batch(number, 2_000), timeout=120)

    with sink.open("scene") as writer:
        run_on_threads(model, 4)
    assert writer.result is not None and writer.result.parts >= 2  # 16 batches of about 0.65 MB
    features = orjson.loads(s3.get_object(Bucket=bucket, Key="flaky/scene.geojson")["Body"].read())["features"]
    numbers = [feature["properties"]["b"][0] for feature in features[::2_000]]
    assert sorted(numbers) == list(range(16))
    assert [feature["properties"]["b"] for feature in features] == [
        [number, n] for number in numbers for n in range(2_000)
    ]
    assert proxy.count("UploadPart") == writer.result.parts + 3
    assert proxy.count("CompleteMultipartUpload") == 2
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_an_add_that_times_out_while_the_writer_is_full_fails_it_and_nothing_is_stored(
    proxy: FaultProxy, bucket: str, s3: Any
) -> None:
    # Parts that take long to store fill the writer: the encoder waits for a part slot, then the buffered batches.
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=5.0))
    sink = S3Sink(bucket, "timed-out", settings=SMALL_PARTS, client=ClientSettings(endpoint_url=proxy.url))
    with pytest.raises(SinkError, match="cancelled while handing its batch over"), sink.open("scene") as writer:
        with pytest.raises(TimeoutError):
            for number in range(60):
                writer.add(batch(number), timeout=1.0)
        with pytest.raises(SinkError):
            writer.add(batch(60))
    assert writer.result is None
    assert_nothing_left(s3, bucket)
