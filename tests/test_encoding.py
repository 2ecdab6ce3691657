"""The encoder: features in, the bytes of one FeatureCollection out, in chunks, whatever the batching."""

from __future__ import annotations

import datetime
import functools
import math
from collections.abc import AsyncIterator, Iterable
from decimal import Decimal
from typing import Any, ClassVar

import anyio
import geojson
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
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


@pytest.mark.parametrize("batch", [1, 2, 7, 256, 5000])
@pytest.mark.parametrize("kind", ["list", "generator", "async"])
async def test_any_batching_of_any_source_gives_the_same_bytes(batch: int, kind: str) -> None:
    source = {"list": FEATURES, "generator": iter(FEATURES), "async": agen(FEATURES)}[kind]
    body, sizes, stats = await encode(source, batch_features=batch)
    assert body == EXPECTED
    assert stats.features == 500
    assert stats.bytes == len(body) == sum(sizes)


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


@pytest.mark.parametrize("kind", ["list", "generator", "async"])
async def test_unserialisable_value_names_the_feature_index(kind: str) -> None:
    features: list[Any] = list(FEATURES[:300])
    features[217] = {"type": "Feature", "properties": {"bad": object()}, "geometry": None}
    source = {"list": features, "generator": iter(features), "async": agen(features)}[kind]
    with pytest.raises(FeatureEncodingError) as raised:
        await encode(source, batch_features=16)
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
features_strategy = st.lists(
    st.fixed_dictionaries(
        {"type": st.just("Feature"), "properties": st.dictionaries(st.text(), json_values, max_size=4)},
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
