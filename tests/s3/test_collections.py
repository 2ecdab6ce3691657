"""A whole FeatureCollection as input: its features and its other members (bbox, foreign members) are written."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import geojson
import orjson
import pytest

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, S3Sink, SinkSettings

pytestmark = pytest.mark.timeout(120)

BBOX = [-44.0, -24.0, -43.0, -23.0]


def geojson_collection(count: int) -> geojson.FeatureCollection:
    features = [geojson.Feature(**feature) for feature in synthetic_detections(count, seed=7)]
    return geojson.FeatureCollection(features, bbox=BBOX, name="scene-7", model={"name": "detector", "version": 3})


def dict_collection(count: int) -> dict[str, Any]:
    return {"type": "FeatureCollection", "bbox": BBOX, "features": list(synthetic_detections(count, seed=8))}


def assert_round_trips(body: bytes, collection: Any) -> None:
    stored = orjson.loads(body)
    assert stored == orjson.loads(orjson.dumps(dict(collection)))
    # The members come before the features, which follow in chunks.
    assert body.startswith(b'{"type":"FeatureCollection","bbox":[')
    assert body.endswith(b"]}")


@pytest.mark.anyio
@pytest.mark.parametrize("make", [geojson_collection, dict_collection])
async def test_async_sink_writes_a_collection_with_its_members(
    bucket: str, read_object: Callable[[str], bytes], make: Callable[[int], Any]
) -> None:
    collection = make(40)
    async with AsyncS3Sink(bucket, "out") as sink:
        assert await sink.write("scene", collection) is True
        result = await sink.write_with_result("again", collection)
    assert result.features == 40
    assert_round_trips(read_object("out/scene.geojson"), collection)
    assert read_object("out/again.geojson") == read_object("out/scene.geojson")


@pytest.mark.parametrize("make", [geojson_collection, dict_collection])
def test_s3_sink_writes_a_multipart_collection_with_its_members(
    bucket: str, s3: Any, read_object: Callable[[str], bytes], make: Callable[[int], Any]
) -> None:
    collection = make(15_000)  # about 7 MB: two parts of 5 MiB
    sink = S3Sink(bucket, "out", settings=SinkSettings(part_size=5 * 1024 * 1024, multipart_threshold=1024))
    assert sink.write("scene", collection) is True
    result = sink.write_with_result("again", collection)
    assert result.parts == 2
    assert result.features == 15_000
    assert_round_trips(read_object("out/scene.geojson"), collection)
    assert read_object("out/again.geojson") == read_object("out/scene.geojson")
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_a_collection_of_no_feature_keeps_its_members(bucket: str, read_object: Callable[[str], bytes]) -> None:
    assert S3Sink(bucket, "out").write("empty", geojson.FeatureCollection([], bbox=BBOX))
    assert (
        read_object("out/empty.geojson")
        == b'{"type":"FeatureCollection","bbox":[-44.0,-24.0,-43.0,-23.0],"features":[]}'
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mapping", "says"),
    [
        ({"type": "Feature", "geometry": None, "properties": {}}, r"not dict \(pass collection\['features'\]\)"),
        (geojson.Feature(geometry=geojson.Point((1, 2))), r"not Feature \(pass collection\['features'\]\)"),
        ({"features": []}, r"not dict \(pass collection\['features'\]\)"),
        ({"type": "FeatureCollection"}, 'holds its features in "features"'),
        ({"type": "FeatureCollection", "features": {"a": 1}}, r"not dict \(pass collection\['features'\]\)"),
    ],
)
async def test_a_mapping_that_is_not_a_collection_is_refused_with_its_hint(
    bucket: str, stored_keys: Callable[[], list[str]], mapping: Any, says: str
) -> None:
    async with AsyncS3Sink(bucket, "out") as sink:
        with pytest.raises(TypeError, match=says):
            await sink.write("scene", mapping)
    with pytest.raises(TypeError, match=says):
        S3Sink(bucket, "out").write_with_result("scene", mapping)
    assert stored_keys() == []


@pytest.mark.anyio
async def test_a_member_json_cannot_hold_fails_the_write_and_stores_nothing(
    bucket: str, s3: Any, stored_keys: Callable[[], list[str]]
) -> None:
    collection = {**dict_collection(10), "mask": object()}
    settings = SinkSettings(multipart_threshold=1024)
    async with AsyncS3Sink(bucket, "out", settings=settings) as sink:
        with pytest.raises(TypeError, match="members 'bbox', 'mask' cannot be written as JSON"):
            await sink.write("scene", collection)
    assert stored_keys() == []
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
