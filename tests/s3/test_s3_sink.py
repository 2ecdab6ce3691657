"""S3Sink, the synchronous facade: writes, validation, errors, threads and callers inside an event loop."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import geojson
import orjson
import pytest
from support.bad_inputs import NOT_COLLECTIONS

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import FeatureEncodingError, InvalidAssumedRoleException, S3Sink, SinkSettings
from model_runner.sink import s3_sink as s3_sink_module

pytestmark = pytest.mark.timeout(60)

EMPTY_COLLECTION = b'{"type":"FeatureCollection","features":[]}'


def collection(features: list[Any]) -> bytes:
    return orjson.dumps({"type": "FeatureCollection", "features": features})


def test_write_stores_compact_collection(bucket: str, read_object: Callable[[str], bytes]) -> None:
    features = list(synthetic_detections(25, seed=1))
    assert S3Sink(bucket, "out").write("s3://imagery/scene-1.tif", features) is True
    body = read_object("out/scene-1.tif.geojson")
    assert body == collection(features)
    assert orjson.loads(body) == {"type": "FeatureCollection", "features": features}


def test_body_is_raw_utf8(bucket: str, read_object: Callable[[str], bytes]) -> None:
    feature = {"type": "Feature", "geometry": None, "properties": {"place": "São Paulo", "note": "東京 ✓"}}
    assert S3Sink(bucket, "").write("utf8", [feature])
    body = read_object("utf8.geojson")
    assert "São Paulo".encode() in body
    assert "東京 ✓".encode() in body
    assert b"\\u" not in body
    assert orjson.loads(body)["features"] == [feature]


def test_object_attributes(bucket: str, s3: Any) -> None:
    assert S3Sink(bucket, "out").write("scene", list(synthetic_detections(3)))
    head = s3.head_object(Bucket=bucket, Key="out/scene.geojson")
    assert head["ContentType"] == "application/geo+json"


@pytest.mark.parametrize(
    "make_features",
    [
        pytest.param(lambda features: list(features), id="list"),
        pytest.param(lambda features: tuple(features), id="tuple"),
        pytest.param(lambda features: (feature for feature in features), id="generator"),
        pytest.param(lambda features: map(dict, features), id="map"),
        pytest.param(lambda features: {str(i): f for i, f in enumerate(features)}.values(), id="dict-values"),
    ],
)
def test_any_iterable_of_features(
    bucket: str, read_object: Callable[[str], bytes], make_features: Callable[[list[Any]], Any]
) -> None:
    features = list(synthetic_detections(40, seed=2))
    assert S3Sink(bucket, "out").write("scene", make_features(features))
    assert read_object("out/scene.geojson") == collection(features)


def test_iterable_that_is_not_a_sequence(bucket: str, read_object: Callable[[str], bytes]) -> None:
    features = list(synthetic_detections(10, seed=3))

    class Detections:
        def __iter__(self) -> Iterator[Any]:
            return iter(features)

    assert S3Sink(bucket, "out").write("scene", Detections())
    assert orjson.loads(read_object("out/scene.geojson"))["features"] == features


@pytest.mark.parametrize(
    "empty",
    [pytest.param([], id="list"), pytest.param((), id="tuple"), pytest.param(iter([]), id="iterator")],
)
def test_empty_collection(bucket: str, read_object: Callable[[str], bytes], empty: Any) -> None:
    assert S3Sink(bucket, "out").write("empty", empty)
    assert read_object("out/empty.geojson") == EMPTY_COLLECTION


def test_geojson_objects(bucket: str, read_object: Callable[[str], bytes]) -> None:
    features = [
        geojson.Feature(geometry=geojson.Point((-43.2, -22.9)), properties={"score": 0.75}, id="a"),
        geojson.Feature(
            geometry=geojson.Polygon([[(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 0.0)]]),
            properties={},
            id="b",
        ),
        {"type": "Feature", "geometry": geojson.Point((1.0, 2.0)), "properties": {"plain": True}},
    ]
    assert S3Sink(bucket, "out").write("geo", features)
    stored = orjson.loads(read_object("out/geo.geojson"))
    assert stored == json.loads(geojson.dumps(geojson.FeatureCollection(features)))
    assert stored["features"][0]["geometry"] == {"type": "Point", "coordinates": [-43.2, -22.9]}


@pytest.mark.parametrize("features", NOT_COLLECTIONS)
def test_features_not_a_collection(bucket: str, stored_keys: Callable[[], list[str]], features: Any) -> None:
    sink = S3Sink(bucket, "out")
    with pytest.raises(TypeError):
        sink.write("scene", features)
    with pytest.raises(TypeError):
        sink.write_with_result("scene", features)
    assert stored_keys() == []


def test_feature_that_is_not_a_mapping(bucket: str, stored_keys: Callable[[], list[str]]) -> None:
    features = [*synthetic_detections(5), 42]
    with pytest.raises(FeatureEncodingError) as raised:
        S3Sink(bucket, "out").write("scene", features)
    assert isinstance(raised.value, TypeError)
    assert raised.value.index == 5
    assert stored_keys() == []


def test_validate_existing_bucket(bucket: str) -> None:
    assert S3Sink(bucket, "out").validate_s3_bucket() is True


def test_validate_missing_bucket(missing_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    assert S3Sink(missing_bucket, "out").validate_s3_bucket() is False
    assert any(record.levelno == logging.ERROR for record in caplog.records)


def test_write_to_missing_bucket(missing_bucket: str, s3: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    assert S3Sink(missing_bucket, "out").write("scene", list(synthetic_detections(3))) is False
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert errors, "a failed write must be logged at error level"
    assert any(missing_bucket in record.getMessage() for record in errors)
    bucket_names = [entry["Name"] for entry in s3.list_buckets()["Buckets"]]
    assert missing_bucket not in bucket_names


def test_write_to_missing_bucket_logs_on_the_s3_sink_logger(
    missing_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    assert S3Sink(missing_bucket, "out").write("scene", []) is False
    names = [record.name for record in caplog.records if record.levelno == logging.ERROR]
    assert s3_sink_module.logger.name in names, f"error records came from {names}"


def test_write_to_forbidden_bucket(bucket: str, s3: Any, caplog: pytest.LogCaptureFixture) -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
            }
        ],
    }
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    caplog.set_level(logging.ERROR)
    assert S3Sink(bucket, "out").write("scene", list(synthetic_detections(3))) is False
    assert any(record.levelno == logging.ERROR for record in caplog.records)
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_write_with_result(bucket: str, s3: Any, read_object: Callable[[str], bytes]) -> None:
    features = list(synthetic_detections(30, seed=4))
    result = S3Sink(bucket, "out").write_with_result("scene", features)
    body = read_object("out/scene.geojson")
    assert result.bucket == bucket
    assert result.key == "out/scene.geojson"
    assert result.bytes == len(body)
    assert result.features == 30
    assert result.parts == 0
    assert result.checksum == base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    assert result.etag == s3.head_object(Bucket=bucket, Key="out/scene.geojson")["ETag"]


def test_acl_default_grants_owner_full_control(bucket: str, s3: Any) -> None:
    assert S3Sink(bucket, "out").write("scene", [])
    grants = s3.get_object_acl(Bucket=bucket, Key="out/scene.geojson")["Grants"]
    assert any(grant["Permission"] == "FULL_CONTROL" for grant in grants)
    assert not any("AllUsers" in grant["Grantee"].get("URI", "") for grant in grants)


def test_acl_setting_is_applied(bucket: str, s3: Any) -> None:
    assert S3Sink(bucket, "out", settings=SinkSettings(acl="public-read")).write("scene", [])
    grants = s3.get_object_acl(Bucket=bucket, Key="out/scene.geojson")["Grants"]
    public = [grant for grant in grants if grant["Grantee"].get("URI", "").endswith("/global/AllUsers")]
    assert [grant["Permission"] for grant in public] == ["READ"]


def test_content_type_setting_is_applied(bucket: str, s3: Any) -> None:
    settings = SinkSettings(content_type="application/json")
    assert S3Sink(bucket, "out", settings=settings).write("scene", [])
    assert s3.head_object(Bucket=bucket, Key="out/scene.geojson")["ContentType"] == "application/json"


def test_assumed_role(bucket: str, read_object: Callable[[str], bytes]) -> None:
    sink = S3Sink(bucket, "out", "arn:aws:iam::123456789012:role/model-runner-writer")
    assert sink.validate_s3_bucket()
    assert sink.write("scene", list(synthetic_detections(2)))
    assert read_object("out/scene.geojson") == collection(list(synthetic_detections(2)))


def test_malformed_assumed_role(bucket: str, stored_keys: Callable[[], list[str]]) -> None:
    sink = S3Sink(bucket, "out", "not-a-role-arn")
    with pytest.raises(InvalidAssumedRoleException):
        sink.write("scene", [])
    assert stored_keys() == []


def test_many_sinks_and_writes_in_sequence(bucket: str, read_object: Callable[[str], bytes]) -> None:
    for index in range(20):
        features = list(synthetic_detections(3, seed=index))
        assert S3Sink(bucket, f"p{index % 3}").write(f"scene-{index}", features)
    for index in range(20):
        expected = collection(list(synthetic_detections(3, seed=index)))
        assert read_object(f"p{index % 3}/scene-{index}.geojson") == expected


def test_threads_share_one_sink(bucket: str, read_object: Callable[[str], bytes]) -> None:
    sink = S3Sink(bucket, "threads")
    threads_count, writes_per_thread = 8, 6
    start = threading.Barrier(threads_count)
    results: dict[str, bool] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(thread_index: int) -> None:
        try:
            start.wait()
            for write_index in range(writes_per_thread):
                image_id = f"t{thread_index}-w{write_index}"
                seed = thread_index * 100 + write_index
                stored = sink.write(image_id, synthetic_detections(50, seed=seed))
                with lock:
                    results[image_id] = stored
        except BaseException as error:
            with lock:
                errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert len(results) == threads_count * writes_per_thread
    assert all(results.values())
    for thread_index in range(threads_count):
        for write_index in range(writes_per_thread):
            expected = collection(list(synthetic_detections(50, seed=thread_index * 100 + write_index)))
            assert read_object(f"threads/t{thread_index}-w{write_index}.geojson") == expected


@pytest.mark.anyio
async def test_called_from_a_coroutine(bucket: str, read_object: Callable[[str], bytes]) -> None:
    sink = S3Sink(bucket, "loop")
    features = list(synthetic_detections(20, seed=5))
    assert sink.validate_s3_bucket() is True
    assert sink.write("scene", features) is True
    assert read_object("loop/scene.geojson") == collection(features)
    # The caller's loop is still usable afterwards.
    await anyio.lowlevel.checkpoint()
    assert sink.write("again", features[:1]) is True


@pytest.mark.anyio
async def test_called_from_worker_threads_of_a_running_loop(
    bucket: str,
    read_object: Callable[[str], bytes],
) -> None:
    sink = S3Sink(bucket, "workers")
    results: dict[int, bool] = {}

    async def write(index: int) -> None:
        features = list(synthetic_detections(10, seed=index))
        results[index] = await anyio.to_thread.run_sync(sink.write, f"scene-{index}", features)

    async with anyio.create_task_group() as group:
        for index in range(10):
            group.start_soon(write, index)
    assert results == dict.fromkeys(range(10), True)
    for index in range(10):
        expected = collection(list(synthetic_detections(10, seed=index)))
        assert read_object(f"workers/scene-{index}.geojson") == expected


def test_called_from_asyncio_run_in_another_thread(bucket: str, read_object: Callable[[str], bytes]) -> None:
    sink = S3Sink(bucket, "nested")
    outcome: list[bool] = []

    async def main() -> None:
        outcome.append(sink.write("scene", [{"type": "Feature", "geometry": None, "properties": {"n": 1}}]))

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    thread.join(30)
    assert outcome == [True]
    assert orjson.loads(read_object("nested/scene.geojson"))["features"][0]["properties"] == {"n": 1}
