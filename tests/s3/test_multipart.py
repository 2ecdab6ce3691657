"""Large collections go through multipart upload, round-trip intact and leave no upload behind."""

from __future__ import annotations

import base64
import itertools
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio
import orjson
import pytest

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, FeatureEncodingError, S3Sink, SinkSettings

pytestmark = pytest.mark.timeout(120)

BIG_COUNT = 60_000


@pytest.fixture(scope="module")
def big_features() -> list[dict[str, Any]]:
    """A 60,000-feature collection, about 30 MB encoded: generated once for the module."""
    return list(synthetic_detections(BIG_COUNT, seed=60))


@pytest.fixture(scope="module")
def big_body(big_features: list[dict[str, Any]]) -> bytes:
    """The exact bytes the big collection must be stored as."""
    return orjson.dumps({"type": "FeatureCollection", "features": big_features})


async def agen(features: Iterable[Any]) -> AsyncIterator[Any]:
    for feature in features:
        yield feature


def assert_round_trip(s3: Any, bucket: str, key: str, body: bytes, features: list[dict[str, Any]]) -> None:
    stored = s3.get_object(Bucket=bucket, Key=key)
    data = stored["Body"].read()
    assert stored["ContentType"] == "application/geo+json"
    assert len(data) == len(body)
    assert data == body
    assert orjson.loads(data)["features"] == features
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_big_body_exceeds_the_default_threshold(big_body: bytes) -> None:
    assert len(big_body) > SinkSettings().multipart_threshold * 3


def test_s3_sink_multipart_round_trip(
    bucket: str, s3: Any, big_features: list[dict[str, Any]], big_body: bytes
) -> None:
    sink = S3Sink(bucket, "big")
    result = sink.write_with_result("s3://imagery/huge-scene.ntf", big_features)
    assert result.parts > 1
    assert result.bytes == len(big_body)
    assert result.features == BIG_COUNT
    # The CRC32 of the whole object (issue 15), no longer the composite ``<crc of crcs>-<parts>``.
    assert result.checksum == base64.b64encode(zlib.crc32(big_body).to_bytes(4, "big")).decode()
    assert result.key == "big/huge-scene.ntf.geojson"
    assert_round_trip(s3, bucket, "big/huge-scene.ntf.geojson", big_body, big_features)


def test_s3_sink_write_multipart(
    bucket: str,
    s3: Any,
    big_features: list[dict[str, Any]],
    big_body: bytes,
) -> None:
    assert S3Sink(bucket, "big").write("scene", iter(big_features)) is True
    assert_round_trip(s3, bucket, "big/scene.geojson", big_body, big_features)


@pytest.mark.anyio
async def test_async_sink_multipart_round_trip(
    bucket: str, s3: Any, big_features: list[dict[str, Any]], big_body: bytes
) -> None:
    async with AsyncS3Sink(bucket, "big") as sink:
        result = await sink.write_with_result("scene", big_features)
    assert result.parts > 1
    assert result.bytes == len(big_body)
    assert result.features == BIG_COUNT
    assert_round_trip(s3, bucket, "big/scene.geojson", big_body, big_features)


@pytest.mark.anyio
async def test_async_sink_multipart_from_async_generator(
    bucket: str, s3: Any, big_features: list[dict[str, Any]], big_body: bytes
) -> None:
    async with AsyncS3Sink(bucket, "big") as sink:
        result = await sink.write_with_result("streamed", agen(big_features))
    assert result.parts > 1
    assert result.bytes == len(big_body)
    assert_round_trip(s3, bucket, "big/streamed.geojson", big_body, big_features)


@pytest.mark.anyio
async def test_concurrent_multipart_writes(
    bucket: str, s3: Any, big_features: list[dict[str, Any]], big_body: bytes
) -> None:
    async with AsyncS3Sink(bucket, "big") as sink, anyio.create_task_group() as group:
        for index in range(2):
            group.start_soon(sink.write, f"scene-{index}", big_features)
    for index in range(2):
        assert_round_trip(s3, bucket, f"big/scene-{index}.geojson", big_body, big_features)


@pytest.mark.anyio
async def test_failure_after_parts_were_sent_leaves_nothing(
    bucket: str, s3: Any, stored_keys: Callable[[], list[str]], big_features: list[dict[str, Any]]
) -> None:
    features = itertools.chain(big_features, ["not a feature"])
    async with AsyncS3Sink(bucket, "big") as sink:
        with pytest.raises(FeatureEncodingError) as raised:
            await sink.write("broken", features)
    assert raised.value.index == BIG_COUNT
    assert stored_keys() == []
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_below_threshold_is_a_single_put(bucket: str, s3: Any) -> None:
    features = list(synthetic_detections(100, seed=61))
    result = S3Sink(bucket, "small").write_with_result("scene", features)
    assert result.parts == 0
    body = orjson.dumps({"type": "FeatureCollection", "features": features})
    assert_round_trip(s3, bucket, "small/scene.geojson", body, features)


def test_threshold_setting(bucket: str, s3: Any) -> None:
    features = list(synthetic_detections(100, seed=62))
    sink = S3Sink(bucket, "small", settings=SinkSettings(multipart_threshold=1024))
    result = sink.write_with_result("scene", features)
    assert result.parts == 1
    body = orjson.dumps({"type": "FeatureCollection", "features": features})
    assert result.bytes == len(body)
    assert_round_trip(s3, bucket, "small/scene.geojson", body, features)
