"""The encoder: features in, the bytes of one FeatureCollection out, in chunks, whatever the batching."""

from __future__ import annotations

import datetime
import functools
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from decimal import Decimal
from typing import Any, ClassVar

import anyio
import geojson
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink.encoding import (
    COLLECTION_HEAD,
    COLLECTION_TAIL,
    EncodingStats,
    _next_batch_size,
    encode_collection,
)
from model_runner.sink.exceptions import FeatureEncodingError

pytestmark = pytest.mark.anyio


async def encode(features: Any, **options: Any) -> tuple[bytes, list[int], EncodingStats]:
    stats = EncodingStats()
    sizes = []
    pieces = []
    async for chunk in encode_collection(features, stats=stats, **options):
        sizes.append(len(chunk))
        pieces.append(bytes(chunk))
    return b"".join(pieces), sizes, stats


async def agen(features: Iterable[Any]) -> AsyncIterator[Any]:
    for feature in features:
        await anyio.lowlevel.checkpoint()
        yield feature


FEATURES = list(synthetic_detections(500, seed=3))
EXPECTED = orjson.dumps({"type": "FeatureCollection", "features": FEATURES})


@pytest.mark.parametrize("trip", [1, 4])
@pytest.mark.parametrize("batch", [1, 2, 7, 256, 5000])
@pytest.mark.parametrize("kind", ["list", "generator", "async"])
async def test_any_batching_of_any_source_gives_the_same_bytes(batch: int, kind: str, trip: int) -> None:
    source = {"list": FEATURES, "generator": iter(FEATURES), "async": agen(FEATURES)}[kind]
    body, sizes, stats = await encode(source, batch_features=batch, batches_per_trip=trip)
    assert body == EXPECTED
    assert stats.features == 500
    assert stats.bytes == len(body) == sum(sizes)


class CountingLimiter:
    """A capacity limiter that counts the trips to a worker thread made through it."""

    def __init__(self) -> None:
        self.limiter = anyio.CapacityLimiter(1)
        self.trips = 0

    async def __aenter__(self) -> None:
        self.trips += 1
        await self.limiter.__aenter__()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.limiter.__aexit__(*exc_info)


@pytest.mark.parametrize("kind", ["list", "generator"])
@pytest.mark.parametrize("trip", [1, 4])
async def test_a_trip_to_a_worker_thread_encodes_up_to_batches_per_trip_batches(trip: int, kind: str) -> None:
    counter = CountingLimiter()
    # A tiny target time shrinks every batch after the first to one feature: 40 batches of 1.
    limiter: Any = counter
    source = FEATURES[:40] if kind == "list" else iter(FEATURES[:40])
    body, _, _ = await encode(source, batch_features=1, call_seconds=1e-9, limiter=limiter, batches_per_trip=trip)
    assert body == orjson.dumps({"type": "FeatureCollection", "features": FEATURES[:40]})
    # A list's end is known; a generator takes one more trip to find itself exhausted after a last full batch.
    assert counter.trips == 40 // trip + (kind == "generator")


@pytest.mark.parametrize("trip", [1, 4])
async def test_a_slow_source_gets_batches_sized_on_its_pulling_too(trip: int) -> None:
    # A generator's own work holds the GIL as orjson does: pulling one feature here takes longer than a batch's
    # whole target, so every batch after the first holds one feature, where orjson's time alone would double it.
    def slow() -> Iterator[Any]:
        for feature in FEATURES[:30]:
            time.sleep(0.002)
            yield feature

    stats = EncodingStats(marks=[])
    chunks = [
        bytes(chunk)
        async for chunk in encode_collection(
            slow(), batch_features=4, call_seconds=0.001, stats=stats, batches_per_trip=trip
        )
    ]
    assert b"".join(chunks) == orjson.dumps({"type": "FeatureCollection", "features": FEATURES[:30]})
    assert stats.marks is not None
    ends = [features for _, features in stats.marks]
    assert [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)] == [4] + [1] * 26


async def test_batches_per_trip_under_one_is_refused() -> None:
    with pytest.raises(ValueError, match="batches_per_trip"):
        await encode(FEATURES, batches_per_trip=0)


async def test_empty_collection_is_exactly_head_and_tail() -> None:
    for source in ([], iter(()), agen([])):
        body, _, stats = await encode(source)
        assert body == COLLECTION_HEAD + COLLECTION_TAIL == b'{"type":"FeatureCollection","features":[]}'
        assert stats.features == 0


async def test_geojson_objects_encode_like_dicts() -> None:
    features = [
        geojson.Feature(id=1, geometry=geojson.Point((1.5, 2.5)), properties={"class": "car"}),
        geojson.Feature(geometry=geojson.Polygon([[(0, 0), (1, 0), (1, 1), (0, 0)]]), properties={}),
    ]
    body, _, _ = await encode(features)
    assert orjson.loads(body) == orjson.loads(geojson.dumps(geojson.FeatureCollection(features)))


async def test_numpy_datetime_decimal_nan_and_geo_interface_values() -> None:
    class Shape:
        __geo_interface__: ClassVar[dict[str, Any]] = {"type": "Point", "coordinates": [3.0, 4.0]}

    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    feature = {
        "type": "Feature",
        "geometry": Shape(),
        "properties": {
            "score": np.float32(0.5),
            "count": np.int64(7),
            "bbox": np.array([1, 2, 3, 4], dtype=np.int32),
            "strided": np.arange(10.0)[::3],
            "when": when,
            "day": datetime.date(2026, 1, 2),
            "price": Decimal("1.25"),
            "nan": math.nan,
            "inf": -math.inf,
            "text": "Rio de Janeiro, São Paulo, 東京 🛰",
        },
    }
    body, _, _ = await encode([feature])
    properties = orjson.loads(body)["features"][0]["properties"]
    assert orjson.loads(body)["features"][0]["geometry"] == {"type": "Point", "coordinates": [3.0, 4.0]}
    assert properties["score"] == 0.5 and properties["count"] == 7
    assert properties["bbox"] == [1, 2, 3, 4] and properties["strided"] == [0.0, 3.0, 6.0, 9.0]
    assert properties["when"] == "2026-01-02T03:04:05+00:00" and properties["day"] == "2026-01-02"
    assert properties["price"] == 1.25
    assert properties["nan"] is None and properties["inf"] is None
    assert properties["text"] == "Rio de Janeiro, São Paulo, 東京 🛰"


async def test_non_string_keys_are_written_as_strings() -> None:
    body, _, _ = await encode([{"type": "Feature", "properties": {1: "a", 2.5: "b"}, "geometry": None}])
    assert orjson.loads(body)["features"][0]["properties"] == {"1": "a", "2.5": "b"}


@pytest.mark.parametrize("trip", [1, 4])
@pytest.mark.parametrize("kind", ["list", "generator", "async"])
async def test_unserialisable_value_names_the_feature_index(kind: str, trip: int) -> None:
    features: list[Any] = list(FEATURES[:300])
    features[217] = {"type": "Feature", "properties": {"bad": object()}, "geometry": None}
    source = {"list": features, "generator": iter(features), "async": agen(features)}[kind]
    with pytest.raises(FeatureEncodingError) as raised:
        await encode(source, batch_features=16, batches_per_trip=trip)
    assert raised.value.index == 217
    assert isinstance(raised.value, TypeError)
    assert "feature 217" in str(raised.value) and "object" in str(raised.value)


async def test_a_feature_that_is_not_a_mapping_names_its_index() -> None:
    with pytest.raises(FeatureEncodingError, match=r"feature 2 .*str"):
        await encode([FEATURES[0], FEATURES[1], "not a feature"])


async def test_one_huge_feature_is_never_split_by_the_encoder() -> None:
    ring = [[float(i % 360 - 180), float(i % 170 - 85)] for i in range(300_000)]
    huge = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}
    features = [huge, *FEATURES[:50]]
    body, sizes, stats = await encode(features, batch_features=8)
    assert orjson.loads(body) == {"type": "FeatureCollection", "features": features}
    assert max(sizes) >= len(orjson.dumps(huge)) > 3_000_000
    assert stats.features == 51


def test_batch_size_adapts_to_the_time_of_a_call() -> None:
    # Slow calls shrink the batch in proportion, fast ones grow it at most twofold, never below one feature.
    assert _next_batch_size(1000, 0.004, 0.001) == 250
    assert _next_batch_size(1000, 0.0001, 0.001) == 2000
    assert _next_batch_size(1, 0.5, 0.001) == 1
    assert _next_batch_size(10_000, 0.0, 0.001) == 16384


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
position = st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=2, max_size=3)
simple_geometries = st.one_of(
    st.fixed_dictionaries({"type": st.just("Point"), "coordinates": position}),
    st.fixed_dictionaries({"type": st.just("MultiPoint"), "coordinates": st.lists(position, max_size=4)}),
    st.fixed_dictionaries({"type": st.just("LineString"), "coordinates": st.lists(position, min_size=2, max_size=4)}),
    st.fixed_dictionaries(
        {"type": st.just("Polygon"), "coordinates": st.lists(st.lists(position, min_size=4, max_size=6), max_size=2)}
    ),
)
geometries = st.recursive(
    simple_geometries,
    lambda members: st.fixed_dictionaries(
        {"type": st.just("GeometryCollection"), "geometries": st.lists(members, max_size=3)}
    ),
    max_leaves=4,
)
features_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.just("Feature"),
            "geometry": st.none() | geometries,
            "properties": st.dictionaries(st.text(), json_values, max_size=4),
        },
        optional={"id": st.text() | st.integers(0, 10**9)},
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(features=features_strategy, batch=st.integers(1, 50))
def test_any_json_features_round_trip_for_any_batch_size(features: list[dict[str, Any]], batch: int) -> None:
    body, _, stats = anyio.run(functools.partial(encode, features, batch_features=batch))
    assert orjson.loads(body) == {"type": "FeatureCollection", "features": features}
    assert body == orjson.dumps({"type": "FeatureCollection", "features": features})
    assert stats.features == len(features)


# What the encoder refuses: output that would not be valid GeoJSON, or valid JSON, or not what the caller gave.


def feature_with(geometry: Any, **properties: Any) -> dict[str, Any]:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def among_valid(bad: Any, at: int = 217, count: int = 300) -> list[Any]:
    features: list[Any] = list(FEATURES[:count])
    features[at] = bad
    return features


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"type": "Point", "coordinates": [1.0, 2.0]}, "a Point geometry, not a Feature; wrap it"),
        (geojson.Polygon([[(0, 0), (1, 0), (1, 1), (0, 0)]]), "a Polygon geometry, not a Feature; wrap it"),
        ({"type": "GeometryCollection", "geometries": []}, "a GeometryCollection geometry, not a Feature"),
        (geojson.FeatureCollection([]), "a FeatureCollection, not a Feature; pass its features"),
        ({"geometry": None, "properties": {}}, 'no "type"'),
        ({"type": "feature", "geometry": None, "properties": {}}, "'feature', not \"Feature\""),
    ],
)
async def test_a_mapping_that_is_not_a_feature_is_refused_with_its_index_and_what_it_is(bad: Any, says: str) -> None:
    with pytest.raises(FeatureEncodingError) as raised:
        await encode(among_valid(bad), batch_features=16)
    assert raised.value.index == 217
    assert "feature 217" in str(raised.value) and says in str(raised.value)


NON_FINITE = [math.nan, math.inf, -math.inf]


def point(x: Any, y: Any = 2.0) -> dict[str, Any]:
    return {"type": "Point", "coordinates": [x, y]}


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("geometry", "where"),
    [
        (point, "geometry.coordinates[0]"),
        (lambda v: {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, v], [0, 0]]]}, "coordinates[0][2][1]"),
        (lambda v: {"type": "MultiPoint", "coordinates": np.array([[0.0, 1.0], [2.0, v]])}, "coordinates[1][1]"),
        (lambda v: {"type": "Point", "coordinates": np.array([1.0, 2.0, v])[::2]}, "coordinates[1]"),
        (lambda v: point(np.float32(v)), "coordinates[0]"),
        (lambda v: point(Decimal(v)), "coordinates[0]"),
        (
            lambda v: {
                "type": "GeometryCollection",
                "geometries": [point(0.0), {"type": "LineString", "coordinates": [[0, 0], [v, 1]]}],
            },
            "geometry.geometries[1].coordinates[1][0]",
        ),
        (
            lambda v: {
                "type": "GeometryCollection",
                "geometries": [{"type": "GeometryCollection", "geometries": [point(1.0), point(v)]}],
            },
            "geometries[0].geometries[1].coordinates[0]",
        ),
    ],
    ids=["Point", "Polygon", "numpy array", "strided numpy array", "numpy float32", "Decimal", "collection", "nested"],
)
async def test_a_non_finite_coordinate_is_refused_with_the_feature_index(
    geometry: Callable[[float], Any], where: str, value: float
) -> None:
    with pytest.raises(FeatureEncodingError) as raised:
        await encode(among_valid(feature_with(geometry(value), score=0.5)), batch_features=16)
    assert raised.value.index == 217
    assert "feature 217" in str(raised.value) and where in str(raised.value) and "finite" in str(raised.value)


async def test_a_geojson_feature_with_nan_coordinates_is_refused() -> None:
    bad = geojson.Feature(geometry=geojson.Point((math.nan, 1.0)), properties={"class": "car"})
    with pytest.raises(FeatureEncodingError, match=r"feature 1 .*coordinate is nan"):
        await encode([FEATURES[0], bad, FEATURES[1]])


async def test_a_shape_with_infinite_coordinates_is_refused() -> None:
    class Shape:
        __geo_interface__: ClassVar[dict[str, Any]] = {"type": "Point", "coordinates": (math.inf, 4.0)}

    with pytest.raises(FeatureEncodingError, match=r"feature 0 .*coordinate is inf"):
        await encode([feature_with(Shape())])


async def test_nan_outside_coordinates_is_written_as_null() -> None:
    # Nulls in arrays outside a geometry, and text that looks like one, must not be taken for bad coordinates.
    feature = {
        "type": "Feature",
        "bbox": [0.0, math.nan, 1.0, 1.0],
        "geometry": {"type": "Point", "coordinates": [1.0, 2.0], "note": "[null,null]"},
        "properties": {
            "score": math.nan,
            "scores": [0.5, math.nan, -math.inf, None],
            "array": np.array([math.nan, 1.0]),
            "price": Decimal("NaN"),
            "huge": Decimal("1e400"),
            "text": ",null]",
        },
    }
    body, _, _ = await encode([feature, feature_with(None)])
    written = orjson.loads(body)["features"]
    assert written[0]["bbox"] == [0.0, None, 1.0, 1.0]
    assert written[0]["properties"] == {
        "score": None,
        "scores": [0.5, None, None, None],
        "array": [None, 1.0],
        "price": None,
        "huge": None,
        "text": ",null]",
    }
    assert written[1]["geometry"] is None


@pytest.mark.parametrize(
    ("properties", "where"),
    [
        ({1: "int key", "1": "str key"}, "1, '1' at properties "),
        ({"classes": [{"a": 1}, {True: "yes", "true": "also"}]}, "True, 'true' at properties.classes[1] "),
        ({"nested": {"deeper": {2.5: "float", "2.5": "str"}}}, "2.5, '2.5' at properties.nested.deeper "),
    ],
    ids=["properties", "in a list", "nested"],
)
async def test_keys_written_as_the_same_json_key_are_refused_with_the_feature_index(
    properties: dict[Any, Any], where: str
) -> None:
    with pytest.raises(FeatureEncodingError) as raised:
        await encode(among_valid(feature_with(None, **{}) | {"properties": properties}), batch_features=16)
    assert raised.value.index == 217
    assert "feature 217" in str(raised.value) and where in str(raised.value) and "distinct" in str(raised.value)


@pytest.mark.parametrize("batch", [1, 7, 256, 5000])
async def test_features_with_non_string_keys_among_others_are_written_as_orjson_writes_them(batch: int) -> None:
    features = [
        feature | {"properties": {**feature["properties"], "scores": {0: 0.9, 1: 0.1}}} if index % 3 == 0 else feature
        for index, feature in enumerate(FEATURES)
    ]
    body, _, stats = await encode(features, batch_features=batch)
    assert body == orjson.dumps({"type": "FeatureCollection", "features": features}, option=orjson.OPT_NON_STR_KEYS)
    assert stats.features == len(features)


@pytest.mark.parametrize("batch", [16, 5000])
async def test_a_collision_among_features_that_all_have_non_string_keys_names_its_index(batch: int) -> None:
    features = [feature | {"properties": {0: "zero", 1: "one"}} for feature in FEATURES]
    features[217] = features[217] | {"properties": {0: "zero", "0": "also zero"}}
    with pytest.raises(FeatureEncodingError, match=r"feature 217 .*0, '0' at properties are all written as"):
        await encode(features, batch_features=batch)


async def test_non_string_keys_and_decimal_digits_in_one_batch_are_not_a_collision() -> None:
    feature = feature_with(None, classes={1: "car", 2: "bus"}, price=Decimal("1.10000000000000000001"))
    body, _, _ = await encode([feature, feature])
    assert body.count(b'"classes":{"1":"car","2":"bus"},"price":1.10000000000000000001') == 2


@pytest.mark.parametrize("value", [2**64, 2**70, -(2**63) - 1], ids=["2**64", "2**70", "-2**63-1"])
async def test_an_integer_json_cannot_hold_names_the_feature_and_says_what_to_do(value: int) -> None:
    with pytest.raises(FeatureEncodingError) as raised:
        await encode(among_valid(feature_with(None, id=value)), batch_features=16)
    message = str(raised.value)
    assert raised.value.index == 217 and "feature 217" in message
    assert f"{value} at properties.id" in message
    assert "pass it as a string" in message and "Decimal" in message
    body, _, _ = await encode([feature_with(None, high=2**64 - 1, low=-(2**63))])
    assert b'"high":18446744073709551615,"low":-9223372036854775808' in body


async def test_an_integer_key_json_cannot_hold_says_what_to_do() -> None:
    with pytest.raises(FeatureEncodingError, match=r"feature 0 .*18446744073709551616 at properties \(a key\).*string"):
        await encode([feature_with(None, **{}) | {"properties": {2**64: "x"}}])


@pytest.mark.parametrize(
    "text", ["1.10000000000000000001", "12345678901234567890123456789", "-0.000000000000000000000000001", "1E+300"]
)
async def test_a_decimal_keeps_its_digits(text: str) -> None:
    body, _, _ = await encode(
        [feature_with(point(Decimal(text), Decimal("-22.94195312345678901")), value=Decimal(text))]
    )
    # Decimal's own text: "-1E-27" for the third, the same number.
    assert f'"value":{Decimal(text)}}}'.encode() in body
    parsed = json.loads(body, parse_float=Decimal, parse_int=Decimal)["features"][0]
    assert parsed["properties"]["value"] == Decimal(text)
    assert parsed["geometry"]["coordinates"] == [Decimal(text), Decimal("-22.94195312345678901")]
    assert orjson.loads(body)["features"][0]["properties"]["value"] == float(text)


async def test_a_big_integer_passed_as_a_decimal_is_written_with_all_its_digits() -> None:
    body, _, _ = await encode([feature_with(None, id=Decimal(2**70))])
    assert b'"id":1180591620717411303424' in body


def coordinate_lists(geometry: dict[str, Any]) -> list[list[Any]]:
    """The lists in a geometry that hold numbers: each position's."""
    if geometry["type"] == "GeometryCollection":
        return [found for member in geometry["geometries"] for found in coordinate_lists(member)]
    lists, stack = [], [geometry["coordinates"]]
    while stack:
        item = stack.pop()
        if item and not isinstance(item[0], list):
            lists.append(item)
        else:
            stack.extend(item)
    return lists


@settings(max_examples=60, deadline=None)
@given(features=features_strategy, batch=st.integers(1, 50), value=st.sampled_from(NON_FINITE), data=st.data())
def test_a_non_finite_coordinate_anywhere_is_refused_for_any_batch_size(
    features: list[dict[str, Any]], batch: int, value: float, data: st.DataObject
) -> None:
    candidates = [
        index for index, feature in enumerate(features) if feature["geometry"] and coordinate_lists(feature["geometry"])
    ]
    assume(candidates)
    index = data.draw(st.sampled_from(candidates))
    numbers = data.draw(st.sampled_from(coordinate_lists(features[index]["geometry"])))
    numbers[data.draw(st.integers(0, len(numbers) - 1))] = value
    with pytest.raises(FeatureEncodingError) as raised:
        anyio.run(functools.partial(encode, features, batch_features=batch))
    assert raised.value.index == index


async def test_a_null_coordinate_is_refused() -> None:
    with pytest.raises(FeatureEncodingError, match=r"feature 0 .*coordinate is None \(at geometry.coordinates\[1\]\)"):
        await encode([feature_with({"type": "Point", "coordinates": [1.0, None]})])
