"""Bad input gets a clear error before any request, and nothing is written; awkward but valid input works."""

from __future__ import annotations

import datetime
import math
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import orjson
import pytest
from support.bad_inputs import NOT_COLLECTIONS
from support.proxy import FaultProxy

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ClientSettings, FeatureEncodingError, S3Sink, SinkSettings
from model_runner.sink.settings import MiB

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


def sink(proxy: FaultProxy, bucket: str, **options: Any) -> AsyncS3Sink:
    return AsyncS3Sink(bucket, "input", client=ClientSettings(endpoint_url=proxy.url), **options)


@pytest.mark.parametrize("image_id", ["", "a/b/", "/", "s3://bucket/folder/"])
async def test_an_image_id_with_no_file_name_is_refused_before_any_request(
    proxy: FaultProxy, bucket: str, image_id: str
) -> None:
    with pytest.raises(ValueError, match="no file name"):
        await sink(proxy, bucket).write(image_id, [])
    assert proxy.log == []


@pytest.mark.parametrize("features", NOT_COLLECTIONS)
async def test_features_that_are_not_a_collection_are_refused_before_any_request(
    proxy: FaultProxy, bucket: str, features: Any
) -> None:
    with pytest.raises(TypeError, match="iterable or async iterable of GeoJSON features"):
        await sink(proxy, bucket).write("image", features)
    assert proxy.log == []


def unserialisable(feature: dict[str, Any]) -> dict[str, Any]:
    return {**feature, "properties": {**feature["properties"], "mask": object()}}


def bare_geometry(feature: dict[str, Any]) -> dict[str, Any]:
    return dict(feature["geometry"])


def nan_coordinate(feature: dict[str, Any]) -> dict[str, Any]:
    return {**feature, "geometry": {"type": "Point", "coordinates": [math.nan, 1.0]}}


def infinite_numpy_coordinate(feature: dict[str, Any]) -> dict[str, Any]:
    return {**feature, "geometry": {"type": "Point", "coordinates": np.array([1.0, -math.inf])}}


def colliding_keys(feature: dict[str, Any]) -> dict[str, Any]:
    return {**feature, "properties": {**feature["properties"], 7: "int key", "7": "str key"}}


def big_integer(feature: dict[str, Any]) -> dict[str, Any]:
    return {**feature, "id": 2**64}


BAD_FEATURES = [
    pytest.param(unserialisable, "object", id="unserialisable"),
    pytest.param(bare_geometry, "geometry, not a Feature", id="bare geometry"),
    pytest.param(nan_coordinate, "coordinate is nan", id="NaN coordinate"),
    pytest.param(infinite_numpy_coordinate, "coordinate is -inf", id="-inf numpy coordinate"),
    pytest.param(colliding_keys, "written as the JSON key", id="colliding keys"),
    pytest.param(big_integer, "as a string", id="big integer"),
]


@pytest.mark.parametrize(("spoil", "says"), BAD_FEATURES)
async def test_a_bad_feature_in_a_small_collection_names_its_index_and_writes_nothing(
    proxy: FaultProxy, bucket: str, s3: Any, spoil: Callable[[dict[str, Any]], Any], says: str
) -> None:
    features: list[Any] = list(synthetic_detections(30))
    features[12] = spoil(features[12])
    with pytest.raises(FeatureEncodingError, match=f"feature 12 .*{says}"):
        await sink(proxy, bucket).write("image", features)
    assert proxy.count("PutObject") == 0
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


MULTIPART_COUNT = 25_000


@pytest.fixture(scope="module")
def multipart_features() -> list[dict[str, Any]]:
    return list(synthetic_detections(MULTIPART_COUNT, seed=9))


@pytest.mark.parametrize(("spoil", "says"), BAD_FEATURES)
async def test_a_bad_feature_after_parts_were_uploaded_leaves_no_object_and_no_upload(
    proxy: FaultProxy,
    bucket: str,
    s3: Any,
    multipart_features: list[dict[str, Any]],
    spoil: Callable[[dict[str, Any]], Any],
    says: str,
) -> None:
    async def features() -> AsyncIterator[Any]:
        for feature in multipart_features:
            yield feature
        # Hold the bad feature back until a part has reached S3.
        with anyio.fail_after(60):
            while proxy.count("UploadPart") == 0:  # noqa: ASYNC110 - the proxy counts in its own thread
                await anyio.sleep(0.01)
        yield spoil(multipart_features[0])

    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
    with pytest.raises(FeatureEncodingError, match=f"feature {MULTIPART_COUNT} .*{says}") as raised:
        await sink(proxy, bucket, settings=settings).write("spoiled", features())
    assert raised.value.index == MULTIPART_COUNT
    # moto may answer 500 to an abort that races a part still arriving, which botocore retries: one abort or two.
    assert proxy.count("UploadPart") >= 1 and proxy.count("AbortMultipartUpload") >= 1
    assert proxy.count("CompleteMultipartUpload") == 0
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


@pytest.mark.parametrize("name", ["ab", "bad bucket", "", "a" * 256, "bucket/with/slash"])
def test_bucket_names_s3_would_reject_are_refused_at_construction(name: str) -> None:
    for sink_class in (AsyncS3Sink, S3Sink):
        with pytest.raises(ValueError, match="not a valid S3 bucket name"):
            sink_class(name, "prefix")


@pytest.mark.parametrize("prefix", ["bad\udcff", "p" * 1020])
def test_prefixes_s3_would_reject_are_refused_at_construction(prefix: str) -> None:
    for sink_class in (AsyncS3Sink, S3Sink):
        with pytest.raises(ValueError, match="prefix"):
            sink_class("bucket", prefix)


async def test_an_image_id_that_is_not_valid_unicode_is_refused(proxy: FaultProxy, bucket: str) -> None:
    with pytest.raises(ValueError, match="not valid Unicode"):
        await sink(proxy, bucket).write("image-\udcff", [])
    assert proxy.log == []


async def test_keys_cannot_escape_the_prefix(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    result = await sink(proxy, bucket).write_with_result("../../../etc/passwd", [])
    assert result.key == "input/passwd.geojson"
    assert [item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["input/passwd.geojson"]


async def test_awkward_but_valid_input_round_trips(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    feature = {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": np.array([1.5, -2.25])},
        "properties": {
            "name": "São Paulo, 東京, Zürich 🛰",
            "score": np.float32(0.75),
            "count": np.int64(3),
            "seen": datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.timezone.utc),
            "nan": math.nan,
        },
    }
    result = await sink(proxy, bucket).write_with_result("awkward", [feature])
    stored = orjson.loads(s3.get_object(Bucket=bucket, Key=result.key)["Body"].read())
    properties = stored["features"][0]["properties"]
    assert stored["features"][0]["geometry"]["coordinates"] == [1.5, -2.25]
    assert properties == {
        "name": "São Paulo, 東京, Zürich 🛰",
        "score": 0.75,
        "count": 3,
        "seen": "2026-11-25T12:00:00+00:00",
        "nan": None,
    }


async def test_one_feature_larger_than_a_part_is_split_across_parts(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    ring = [[float(i % 360 - 180), float(i % 180 - 90)] for i in range(900_000)]
    huge = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}
    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
    result = await sink(proxy, bucket, settings=settings).write_with_result("huge", [huge])
    expected = orjson.dumps({"type": "FeatureCollection", "features": [huge]})
    assert len(orjson.dumps(huge)) > 2 * settings.part_size
    assert result.parts == proxy.count("UploadPart") >= 3
    assert s3.get_object(Bucket=bucket, Key=result.key)["Body"].read() == expected


async def test_writes_leave_no_temporary_files(
    proxy: FaultProxy, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # forget the cached directory, so TMPDIR is read again
    assert tempfile.gettempdir() == str(tmp_path)
    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
    await sink(proxy, bucket, settings=settings).write("temp", list(synthetic_detections(15_000)))
    assert os.listdir(tmp_path) == []
