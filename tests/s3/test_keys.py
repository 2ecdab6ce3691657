"""Object keys: ``posixpath.join(prefix, <last segment of image id> + ".geojson")``, as in the seed."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_runner.sink import AsyncS3Sink, S3Sink
from model_runner.sink.async_s3_sink import object_key

pytestmark = pytest.mark.timeout(60)

FEATURE = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1.5, 2.5]}, "properties": {}}

KEY_CASES = [
    ("", "scene", "scene.geojson"),
    ("", "dir/scene", "scene.geojson"),
    ("out", "scene", "out/scene.geojson"),
    ("out/", "scene", "out/scene.geojson"),
    ("a/b", "s3://imagery/dir/scene-1.tif", "a/b/scene-1.tif.geojson"),
    ("a/b/", "x/y/z", "a/b/z.geojson"),
    ("out", "scene.tif", "out/scene.tif.geojson"),
    ("out", "1b4c:s3://bucket/key.ntf", "out/key.ntf.geojson"),
    ("out", "no-slash:but:colons", "out/no-slash:but:colons.geojson"),
    ("résultats/", "s3://b/São Paulo 1", "résultats/São Paulo 1.geojson"),
]
KEY_IDS = [f"{prefix!r}+{image_id!r}" for prefix, image_id, _ in KEY_CASES]

NO_LAST_SEGMENT = ["", "a/b/", "/", "s3://bucket/dir/"]


@pytest.mark.parametrize(("prefix", "image_id", "expected"), KEY_CASES, ids=KEY_IDS)
def test_object_key(prefix: str, image_id: str, expected: str) -> None:
    assert object_key(prefix, image_id) == expected
    assert AsyncS3Sink("results-bucket", prefix).object_key(image_id) == expected


@pytest.mark.parametrize("image_id", NO_LAST_SEGMENT)
def test_object_key_needs_a_last_segment(image_id: str) -> None:
    with pytest.raises(ValueError):
        object_key("out", image_id)
    with pytest.raises(ValueError):
        AsyncS3Sink("results-bucket", "out").object_key(image_id)


segments = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), max_size=20)


@given(
    prefix=st.lists(segments, max_size=4).map("/".join),
    image_id=st.lists(segments, min_size=1, max_size=4).map("/".join),
)
def test_object_key_is_the_seed_formula(prefix: str, image_id: str) -> None:
    name = image_id.split("/")[-1]
    if name:
        assert object_key(prefix, image_id) == posixpath.join(prefix, name + ".geojson")
    else:
        with pytest.raises(ValueError):
            object_key(prefix, image_id)


@pytest.mark.parametrize(("prefix", "image_id", "expected"), KEY_CASES, ids=KEY_IDS)
def test_s3_sink_writes_to_the_derived_key(
    bucket: str, stored_keys: Callable[[], list[str]], prefix: str, image_id: str, expected: str
) -> None:
    assert S3Sink(bucket, prefix).write(image_id, [FEATURE]) is True
    assert stored_keys() == [expected]


@pytest.mark.anyio
@pytest.mark.parametrize(("prefix", "image_id", "expected"), KEY_CASES, ids=KEY_IDS)
async def test_async_sink_writes_to_the_derived_key(
    bucket: str, stored_keys: Callable[[], list[str]], prefix: str, image_id: str, expected: str
) -> None:
    async with AsyncS3Sink(bucket, prefix) as sink:
        result = await sink.write_with_result(image_id, [FEATURE])
    assert result.key == expected
    assert result.bucket == bucket
    assert stored_keys() == [expected]


def test_same_last_segment_overwrites(
    bucket: str, stored_keys: Callable[[], list[str]], read_object: Callable[[str], bytes]
) -> None:
    sink = S3Sink(bucket, "out")
    assert sink.write("s3://first/scene", [FEATURE])
    assert sink.write("s3://second/scene", [])
    assert stored_keys() == ["out/scene.geojson"]
    assert read_object("out/scene.geojson") == b'{"type":"FeatureCollection","features":[]}'


@pytest.mark.parametrize("image_id", NO_LAST_SEGMENT)
def test_s3_sink_write_refuses_image_id_without_last_segment(
    bucket: str, stored_keys: Callable[[], list[str]], image_id: str
) -> None:
    with pytest.raises(ValueError):
        S3Sink(bucket, "out").write(image_id, [FEATURE])
    assert stored_keys() == []


@pytest.mark.anyio
@pytest.mark.parametrize("image_id", NO_LAST_SEGMENT)
async def test_async_sink_write_refuses_image_id_without_last_segment(
    bucket: str, stored_keys: Callable[[], list[str]], image_id: str
) -> None:
    sink = AsyncS3Sink(bucket, "out")
    with pytest.raises(ValueError):
        await sink.write(image_id, [FEATURE])
    with pytest.raises(ValueError):
        await sink.write_with_result(image_id, [FEATURE])
    assert stored_keys() == []


def test_keys_of_many_images_share_the_prefix(bucket: str, s3: Any) -> None:
    sink = S3Sink(bucket, "run-7/")
    for index in range(3):
        assert sink.write(f"s3://imagery/tile-{index}.tif", [FEATURE])
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="run-7/")
    assert sorted(item["Key"] for item in listed["Contents"]) == [
        "run-7/tile-0.tif.geojson",
        "run-7/tile-1.tif.geojson",
        "run-7/tile-2.tif.geojson",
    ]
