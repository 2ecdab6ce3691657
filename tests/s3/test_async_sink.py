"""AsyncS3Sink: writes from asyncio, of lists, iterables and async iterables, alone and concurrently."""

from __future__ import annotations

import base64
import json
import logging
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio
import anyio.lowlevel
import geojson
import orjson
import pytest
from botocore.exceptions import ClientError
from support.bad_inputs import NOT_COLLECTIONS

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, FeatureEncodingError, SinkSettings, WriteResult
from model_runner.sink import async_s3_sink as async_s3_sink_module

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

EMPTY_COLLECTION = b'{"type":"FeatureCollection","features":[]}'


def collection(features: list[Any]) -> bytes:
    return orjson.dumps({"type": "FeatureCollection", "features": features})


async def agen(features: Iterable[Any]) -> AsyncIterator[Any]:
    for feature in features:
        yield feature
        await anyio.lowlevel.checkpoint()


class AsyncDetections:
    """An async iterable that is not an async generator."""

    def __init__(self, features: list[Any]) -> None:
        self._features = features

    def __aiter__(self) -> AsyncIterator[Any]:
        return agen(self._features)


async def test_context_manager(bucket: str, read_object: Callable[[str], bytes]) -> None:
    sink = AsyncS3Sink(bucket, "out")
    async with sink as entered:
        assert entered is sink
        assert await entered.write("scene", list(synthetic_detections(5))) is True
    assert read_object("out/scene.geojson") == collection(list(synthetic_detections(5)))


async def test_aclose_without_context_manager(bucket: str, read_object: Callable[[str], bytes]) -> None:
    sink = AsyncS3Sink(bucket, "out")
    assert await sink.write("scene", []) is True
    assert await sink.aclose() is None
    assert read_object("out/scene.geojson") == EMPTY_COLLECTION


async def test_sink_dropped_without_closing(bucket: str, read_object: Callable[[str], bytes]) -> None:
    for index in range(5):
        assert await AsyncS3Sink(bucket, "out").write(f"scene-{index}", [])
    for index in range(5):
        assert read_object(f"out/scene-{index}.geojson") == EMPTY_COLLECTION


async def test_validate_existing_bucket(bucket: str) -> None:
    async with AsyncS3Sink(bucket, "out") as sink:
        assert await sink.validate_s3_bucket() is True


async def test_validate_missing_bucket(missing_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    async with AsyncS3Sink(missing_bucket, "out") as sink:
        assert await sink.validate_s3_bucket() is False
    assert any(record.levelno == logging.ERROR for record in caplog.records)


async def test_write_to_missing_bucket(missing_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    async with AsyncS3Sink(missing_bucket, "out") as sink:
        assert await sink.write("scene", list(synthetic_detections(3))) is False
    errors = [
        record
        for record in caplog.records
        if record.levelno == logging.ERROR and record.name == async_s3_sink_module.logger.name
    ]
    assert errors
    assert missing_bucket in errors[0].getMessage()


async def test_write_with_result_to_missing_bucket_raises(missing_bucket: str) -> None:
    async with AsyncS3Sink(missing_bucket, "out") as sink:
        with pytest.raises(ClientError):
            await sink.write_with_result("scene", [])


async def test_list(bucket: str, read_object: Callable[[str], bytes]) -> None:
    features = list(synthetic_detections(100, seed=11))
    async with AsyncS3Sink(bucket, "out") as sink:
        assert await sink.write("s3://imagery/scene.tif", features) is True
    body = read_object("out/scene.tif.geojson")
    assert body == collection(features)
    assert orjson.loads(body) == {"type": "FeatureCollection", "features": features}


async def test_generator(bucket: str, read_object: Callable[[str], bytes]) -> None:
    async with AsyncS3Sink(bucket, "out") as sink:
        assert await sink.write("scene", synthetic_detections(100, seed=12)) is True
    assert read_object("out/scene.geojson") == collection(list(synthetic_detections(100, seed=12)))


async def test_async_generator(bucket: str, read_object: Callable[[str], bytes]) -> None:
    features = list(synthetic_detections(100, seed=13))
    async with AsyncS3Sink(bucket, "out") as sink:
        assert await sink.write("scene", agen(features)) is True
    assert read_object("out/scene.geojson") == collection(features)


async def test_async_iterable(bucket: str, read_object: Callable[[str], bytes]) -> None:
    features = list(synthetic_detections(30, seed=14))
    async with AsyncS3Sink(bucket, "out") as sink:
        assert await sink.write("scene", AsyncDetections(features)) is True
    assert orjson.loads(read_object("out/scene.geojson"))["features"] == features


@pytest.mark.parametrize(
    "make_empty",
    [
        pytest.param(lambda: [], id="list"),
        pytest.param(lambda: iter(()), id="iterator"),
        pytest.param(lambda: (feature for feature in ()), id="generator"),
        pytest.param(lambda: agen([]), id="async-generator"),
    ],
)
async def test_empty_collection(
    bucket: str, read_object: Callable[[str], bytes], make_empty: Callable[[], Any]
) -> None:
    async with AsyncS3Sink(bucket, "out") as sink:
        result = await sink.write_with_result("empty", make_empty())
    assert read_object("out/empty.geojson") == EMPTY_COLLECTION
    assert result.features == 0
    assert result.bytes == len(EMPTY_COLLECTION)
    assert result.parts == 0


async def test_geojson_objects(bucket: str, read_object: Callable[[str], bytes]) -> None:
    features = [
        geojson.Feature(geometry=geojson.Point((10.25, -3.5)), properties={"class": "aircraft"}, id=1),
        geojson.Feature(geometry=geojson.LineString([(0.0, 0.0), (2.0, 2.0)]), properties={"n": None}),
        {"type": "Feature", "geometry": geojson.Point((5.0, 6.0)), "properties": {}},
    ]
    async with AsyncS3Sink(bucket, "out") as sink:
        assert await sink.write("geo", agen(features)) is True
    stored = orjson.loads(read_object("out/geo.geojson"))
    assert stored == json.loads(geojson.dumps(geojson.FeatureCollection(features)))
    assert stored["features"][2]["geometry"] == {"type": "Point", "coordinates": [5.0, 6.0]}


async def test_object_attributes_and_result(
    bucket: str,
    s3: Any,
    read_object: Callable[[str], bytes],
) -> None:
    features = list(synthetic_detections(40, seed=15))
    async with AsyncS3Sink(bucket, "attrs/") as sink:
        result = await sink.write_with_result("scene", features)
    assert isinstance(result, WriteResult)
    body = read_object("attrs/scene.geojson")
    head = s3.head_object(Bucket=bucket, Key="attrs/scene.geojson")
    assert head["ContentType"] == "application/geo+json"
    assert head["ContentLength"] == len(body) == result.bytes
    assert result.key == "attrs/scene.geojson"
    assert result.features == 40
    assert result.parts == 0
    assert result.etag == head["ETag"]
    assert result.checksum == base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()


async def test_acl_setting(bucket: str, s3: Any) -> None:
    async with AsyncS3Sink(bucket, "out", settings=SinkSettings(acl="public-read")) as public:
        assert await public.write("public", [])
    async with AsyncS3Sink(bucket, "out") as default:
        assert await default.write("default", [])

    def all_users_permissions(key: str) -> list[str]:
        grants = s3.get_object_acl(Bucket=bucket, Key=key)["Grants"]
        public = [grant for grant in grants if grant["Grantee"].get("URI", "").endswith("/AllUsers")]
        return [grant["Permission"] for grant in public]

    assert all_users_permissions("out/public.geojson") == ["READ"]
    assert all_users_permissions("out/default.geojson") == []


@pytest.mark.parametrize("features", NOT_COLLECTIONS)
async def test_features_not_a_collection(
    bucket: str,
    stored_keys: Callable[[], list[str]],
    features: Any,
) -> None:
    async with AsyncS3Sink(bucket, "out") as sink:
        with pytest.raises(TypeError):
            await sink.write("scene", features)
        with pytest.raises(TypeError):
            await sink.write_with_result("scene", features)
    assert stored_keys() == []


async def test_unserialisable_feature_stores_nothing(
    bucket: str,
    stored_keys: Callable[[], list[str]],
) -> None:
    features = [
        *synthetic_detections(3),
        {"type": "Feature", "geometry": None, "properties": {"bad": object()}},
    ]
    async with AsyncS3Sink(bucket, "out") as sink:
        with pytest.raises(FeatureEncodingError) as raised:
            await sink.write("scene", agen(features))
    assert raised.value.index == 3
    assert stored_keys() == []


async def test_concurrent_writes_on_one_sink(bucket: str, read_object: Callable[[str], bytes]) -> None:
    results: dict[int, bool] = {}

    async def write(sink: AsyncS3Sink, index: int) -> None:
        source: Any = synthetic_detections(20, seed=index)
        if index % 2:
            source = agen(list(source))
        results[index] = await sink.write(f"s3://imagery/scene-{index}", source)

    async with AsyncS3Sink(bucket, "concurrent") as sink, anyio.create_task_group() as group:
        for index in range(50):
            group.start_soon(write, sink, index)
    assert results == dict.fromkeys(range(50), True)
    for index in range(50):
        expected = collection(list(synthetic_detections(20, seed=index)))
        assert read_object(f"concurrent/scene-{index}.geojson") == expected


async def test_concurrent_writes_on_many_sinks(bucket: str, stored_keys: Callable[[], list[str]]) -> None:
    results: list[bool] = []

    async def write(index: int) -> None:
        results.append(await AsyncS3Sink(bucket, f"p{index % 4}").write(f"scene-{index}", []))

    async with anyio.create_task_group() as group:
        for index in range(20):
            group.start_soon(write, index)
    assert results == [True] * 20
    assert stored_keys() == sorted(f"p{index % 4}/scene-{index}.geojson" for index in range(20))
