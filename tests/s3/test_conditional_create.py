"""overwrite=False stores an object only if no object has its key (S3's If-None-Match: *): refused for a single
PutObject and for a multipart upload, the existing object untouched and no upload left. Races and lost answers are
in tests/faults/test_conditional_faults.py."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ObjectExistsError, S3Sink, SinkError, SinkSettings
from model_runner.sink.settings import MiB

pytestmark = [pytest.mark.timeout(120)]

# Parts as small as S3 allows: ~12 MB of features make a multipart upload of three parts.
SMALL_PARTS = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
KEY = "conditional/image.geojson"
EXISTING = b'{"type":"FeatureCollection","features":[]}'


def collection(features: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"type": "FeatureCollection", "features": features})


@pytest.fixture(scope="module")
def large() -> list[dict[str, Any]]:
    return list(synthetic_detections(25_000, seed=14))


@pytest.fixture
def existing(s3: Any, bucket: str) -> str:
    s3.put_object(Bucket=bucket, Key=KEY, Body=EXISTING)
    return s3.head_object(Bucket=bucket, Key=KEY)["ETag"]


def assert_untouched(s3: Any, bucket: str, etag: str) -> None:
    stored = s3.get_object(Bucket=bucket, Key=KEY)
    assert stored["Body"].read() == EXISTING
    assert stored["ETag"] == etag
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_object_exists_error_is_a_sink_error() -> None:
    assert issubclass(ObjectExistsError, SinkError)


@pytest.mark.anyio
@pytest.mark.parametrize("size", ["single", "multipart"])
async def test_an_existing_object_refuses_a_write_without_overwrite(
    size: str, s3: Any, bucket: str, existing: str, large: list[dict[str, Any]]
) -> None:
    features = large if size == "multipart" else list(synthetic_detections(10, seed=1))
    sink = AsyncS3Sink(bucket, "conditional", settings=SMALL_PARTS)
    with pytest.raises(ObjectExistsError) as raised:
        await sink.write_with_result("image", features, overwrite=False)
    assert (raised.value.bucket, raised.value.key) == (bucket, KEY)
    # write raises it too: False is what the seed answers for an unusable bucket.
    with pytest.raises(ObjectExistsError):
        await sink.write("image", features, overwrite=False)
    assert_untouched(s3, bucket, existing)


@pytest.mark.parametrize("size", ["single", "multipart"])
def test_the_sync_sink_refuses_too(size: str, s3: Any, bucket: str, existing: str, large: list[dict[str, Any]]) -> None:
    features = large if size == "multipart" else list(synthetic_detections(10, seed=1))
    sink = S3Sink(bucket, "conditional", settings=SMALL_PARTS)
    with pytest.raises(ObjectExistsError):
        sink.write("image", iter(features), overwrite=False)
    with pytest.raises(ObjectExistsError):
        sink.write_with_result("image", features, overwrite=False)
    assert_untouched(s3, bucket, existing)


@pytest.mark.anyio
@pytest.mark.parametrize("size", ["single", "multipart"])
async def test_without_an_object_a_write_without_overwrite_stores_it(
    size: str, s3: Any, bucket: str, large: list[dict[str, Any]]
) -> None:
    features = large if size == "multipart" else list(synthetic_detections(10, seed=1))
    result = await AsyncS3Sink(bucket, "conditional", settings=SMALL_PARTS).write_with_result(
        "image", features, overwrite=False
    )
    assert (result.parts > 0) == (size == "multipart")
    assert s3.get_object(Bucket=bucket, Key=KEY)["Body"].read() == collection(features)


@pytest.mark.anyio
async def test_the_default_still_overwrites(s3: Any, bucket: str, existing: str) -> None:
    features = list(synthetic_detections(10, seed=2))
    assert await AsyncS3Sink(bucket, "conditional").write("image", features) is True
    assert s3.get_object(Bucket=bucket, Key=KEY)["Body"].read() == collection(features)


@pytest.mark.anyio
@pytest.mark.parametrize("overwrite", ["no", 0, None, 1])
async def test_an_overwrite_that_is_not_a_bool_is_a_type_error(
    overwrite: Any, s3: Any, bucket: str, stored_keys: Any
) -> None:
    features = list(synthetic_detections(10, seed=3))
    sink = AsyncS3Sink(bucket, "conditional")
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        await sink.write("image", features, overwrite=overwrite)
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        await sink.write_with_result("image", features, overwrite=overwrite)
    pulled = []
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        S3Sink(bucket, "conditional").write("image", (pulled.append(f) or f for f in features), overwrite=overwrite)
    assert pulled == []
    assert stored_keys() == []
