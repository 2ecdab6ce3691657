"""Where features are pulled: S3Sink on the calling thread, AsyncS3Sink in worker threads or, asked, on the loop."""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import orjson
import pytest

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, S3Sink, SinkSettings
from model_runner.sink.settings import MiB

pytestmark = pytest.mark.timeout(60)

# Parts as small as S3 allows, so a collection of ~12 MB makes three of them.
SMALL_PARTS = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, max_parts_in_flight=2)


def collection(features: list[Any]) -> bytes:
    return orjson.dumps({"type": "FeatureCollection", "features": features})


def detections_table(features: list[Any]) -> sqlite3.Connection:
    """An sqlite3 database holding the features: its connection and cursors work only in the thread that made it."""
    db = sqlite3.connect(":memory:")
    db.execute("create table detections (feature text)")
    db.executemany("insert into detections values (?)", [(orjson.dumps(feature).decode(),) for feature in features])
    return db


@pytest.mark.parametrize(
    ("count", "settings", "parts"),
    [pytest.param(50, SinkSettings(), 0, id="single-put"), pytest.param(25_000, SMALL_PARTS, 3, id="multipart")],
)
def test_a_source_tied_to_the_calling_thread_is_pulled_there(
    bucket: str, read_object: Callable[[str], bytes], count: int, settings: SinkSettings, parts: int
) -> None:
    features = list(synthetic_detections(count, seed=8))
    rows = detections_table(features).execute("select feature from detections order by rowid")
    result = S3Sink(bucket, "db", settings=settings).write_with_result(
        "scene", map(lambda row: orjson.loads(row[0]), rows)
    )
    assert read_object("db/scene.geojson") == collection(features)
    assert (result.features, result.parts) == (count, parts)


class TracedGeometry:
    """A geometry given through ``__geo_interface__``, as shapely's are: it notes the threads that encode it."""

    def __init__(self, encoded_on: set[int]) -> None:
        self.encoded_on = encoded_on

    @property
    def __geo_interface__(self) -> dict[str, Any]:
        self.encoded_on.add(threading.get_ident())
        return {"type": "Point", "coordinates": [1.5, 2.5]}


def traced_features(count: int, encoded_on: set[int]) -> Iterator[dict[str, Any]]:
    for number in range(count):
        yield {"type": "Feature", "geometry": TracedGeometry(encoded_on), "properties": {"n": number}}


def expected_traced(count: int) -> bytes:
    point = {"type": "Point", "coordinates": [1.5, 2.5]}
    return collection([{"type": "Feature", "geometry": point, "properties": {"n": n}} for n in range(count)])


@pytest.mark.parametrize(
    ("count", "settings"),
    [pytest.param(50, SinkSettings(), id="single-put"), pytest.param(60_000, SMALL_PARTS, id="multipart")],
)
def test_s3sink_encodes_an_iterable_on_the_calling_thread(
    bucket: str, read_object: Callable[[str], bytes], count: int, settings: SinkSettings
) -> None:
    # Encoded where it was pulled, a feature is freed young: it does not reach the garbage collector's oldest
    # generation, whose full collections would stall every thread of the process.
    encoded_on: set[int] = set()
    assert S3Sink(bucket, "traced", settings=settings).write("scene", traced_features(count, encoded_on))
    assert encoded_on == {threading.get_ident()}
    assert read_object("traced/scene.geojson") == expected_traced(count)


@pytest.mark.anyio
async def test_async_sink_encodes_an_iterable_in_a_worker_thread(
    bucket: str, read_object: Callable[[str], bytes]
) -> None:
    encoded_on: set[int] = set()
    assert await AsyncS3Sink(bucket, "traced").write("scene", traced_features(50, encoded_on))
    assert len(encoded_on) == 1
    assert threading.get_ident() not in encoded_on
    assert read_object("traced/scene.geojson") == expected_traced(50)


def test_a_large_source_is_pulled_as_the_upload_takes_it(bucket: str, s3: Any) -> None:
    features = list(synthetic_detections(25_000, seed=9))
    total = len(features) * 4
    pulled_by: set[int] = set()
    pulled = 0
    pulled_at_first_part: list[int] = []

    def source() -> Iterator[Any]:
        nonlocal pulled
        for feature in itertools.islice(itertools.cycle(features), total):
            pulled_by.add(threading.get_ident())
            pulled += 1
            yield feature

    def progress(bytes_done: int, features_done: int) -> None:
        if not pulled_at_first_part:
            pulled_at_first_part.append(pulled)

    result = S3Sink(bucket, "big", settings=SMALL_PARTS).write_with_result("scene", source(), on_progress=progress)
    assert result.features == total
    assert pulled_by == {threading.get_ident()}
    # Back-pressure: when the first part was stored, most of the source was still unread.
    assert pulled_at_first_part[0] < total / 2


def test_an_error_raised_by_the_source_fails_the_write(bucket: str, caplog: pytest.LogCaptureFixture, s3: Any) -> None:
    def source() -> Iterator[Any]:
        yield from synthetic_detections(25_000, seed=4)
        raise LookupError("the model lost its input")

    caplog.set_level(logging.ERROR)
    with pytest.raises(LookupError, match="lost its input"):
        S3Sink(bucket, "out", settings=SMALL_PARTS).write("scene", source())
    assert any("LookupError" in record.getMessage() for record in caplog.records)
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


def test_a_bad_image_id_is_refused_before_any_feature_is_pulled(bucket: str) -> None:
    pulled: list[Any] = []
    with pytest.raises(ValueError, match="no file name"):
        S3Sink(bucket, "out").write("a/b/", (pulled.append(n) for n in range(10)))
    assert pulled == []


async def on_the_loop(features: Iterable[Any]) -> AsyncIterator[Any]:
    for feature in features:
        yield feature


@pytest.mark.anyio
async def test_async_sink_pulls_a_source_wrapped_in_an_async_generator_on_the_loop(
    bucket: str, read_object: Callable[[str], bytes]
) -> None:
    features = list(synthetic_detections(50, seed=8))
    rows = detections_table(features).execute("select feature from detections order by rowid")
    sink = AsyncS3Sink(bucket, "db")
    assert await sink.write("scene", on_the_loop(orjson.loads(text) for (text,) in rows))
    assert read_object("db/scene.geojson") == collection(features)


@pytest.mark.anyio
async def test_async_sink_pulls_a_plain_iterable_off_the_loop(
    bucket: str, stored_keys: Callable[[], list[str]]
) -> None:
    rows = detections_table(list(synthetic_detections(5))).execute("select feature from detections")
    with pytest.raises(sqlite3.ProgrammingError, match="same thread"):
        await AsyncS3Sink(bucket, "db").write("scene", (orjson.loads(text) for (text,) in rows))
    assert stored_keys() == []
