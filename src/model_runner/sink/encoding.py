"""Features -> the bytes of one GeoJSON FeatureCollection or text sequence, in chunks, encoded off the event loop."""

from __future__ import annotations

import contextlib
import json
import math
import re
import reprlib
import sys
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from itertools import chain, islice, repeat
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

import anyio
import anyio.to_thread
import orjson

from model_runner.sink.exceptions import FeatureEncodingError

if TYPE_CHECKING:
    import geojson

__all__ = [
    "COLLECTION_HEAD",
    "COLLECTION_TAIL",
    "CONTENT_TYPES",
    "OUTPUT_FORMATS",
    "SUFFIXES",
    "Collection",
    "EncodedBatch",
    "EncodedFeatures",
    "EncodingStats",
    "Feature",
    "FeatureSource",
    "Features",
    "OutputFormat",
    "ThreadBoundFeatures",
    "check_features",
    "check_members",
    "encode_batch",
    "encode_collection",
]

Feature: TypeAlias = "geojson.Feature | Mapping[str, Any]"
"""A GeoJSON feature: a ``geojson.Feature``, or any mapping whose ``type`` is ``"Feature"``."""
Features: TypeAlias = "Iterable[Feature] | AsyncIterable[Feature]"
"""Features from a list, any iterable, or an async iterable."""
Collection: TypeAlias = "geojson.FeatureCollection | Mapping[str, Any]"
"""A GeoJSON FeatureCollection: a ``geojson.FeatureCollection``, or any mapping whose ``type`` is
``"FeatureCollection"``."""
FeatureSource: TypeAlias = "Features | Collection"
"""What a write takes: features, or a whole collection whose other members (``bbox``...) are written too."""

OutputFormat: TypeAlias = Literal["geojson", "geojsonseq"]
"""``"geojson"``: one FeatureCollection; ``"geojsonseq"``: a GeoJSON text sequence, one feature a line."""
OUTPUT_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)
CONTENT_TYPES: Mapping[OutputFormat, str] = {
    "geojson": "application/geo+json",
    "geojsonseq": "application/geo+json-seq",
}
# .geojsonl is what GDAL's GeoJSONSeq driver names newline-delimited sequences (.geojsons those with RS).
SUFFIXES: Mapping[OutputFormat, str] = {"geojson": ".geojson", "geojsonseq": ".geojsonl"}

COLLECTION_HEAD = b'{"type":"FeatureCollection","features":['
COLLECTION_TAIL = b"]}"


class ThreadBoundFeatures(Iterable[Any]):
    """
    Features from an iterable that one thread alone may pull (an sqlite3 cursor, a thread-local session): the
    encoder runs each of its trips, which pull and encode a few batches, through ``run_sync`` on that thread,
    instead of in a worker thread.

    Pulled and encoded in the same call, most features are freed before the garbage collector promotes them to
    its oldest generation, whose full collections walk every object in the process.
    """

    def __init__(self, features: Iterable[Any], run_sync: Callable[..., Awaitable[Any]]) -> None:
        """
        :param features: The features.
        :param run_sync: An async function that runs ``function(*args)`` on that thread and returns its result:
            ``await run_sync(function, *args)``, as ``anyio.to_thread.run_sync`` is called.
        """
        self.iterator = iter(features)
        self.run_sync = run_sync

    def __iter__(self) -> Iterator[Any]:
        return self.iterator


EncodedBatch: TypeAlias = "tuple[memoryview, int, float]"
"""One batch of features encoded: its bytes (without the separator before it), its features, its seconds in orjson."""


class EncodedFeatures(AsyncIterable[Any]):
    """
    Features encoded before the write takes them, a group of batches at a time (a writer's adds, each encoded by
    :func:`encode_batch` as it was added): the encoder passes their bytes on.

    What waits for the upload is then bytes, which the garbage collector does not track, rather than features that
    would wait long enough to reach its oldest generation.
    """

    def __init__(self, groups: AsyncIterable[list[EncodedBatch]]) -> None:
        """
        :param groups: The encoded batches, in order, a group at a time.
        """
        self.groups = groups

    def __aiter__(self) -> AsyncIterator[Any]:
        raise TypeError("encoded features are only for encode_collection")


# NaN and infinities become null, as orjson always does (refused in coordinates); numpy values are written natively.
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
# Non-string keys cost orjson speed on every dict, so they are only allowed on a group of features that needs them.
_LENIENT_OPTIONS = _OPTIONS | orjson.OPT_NON_STR_KEYS
# A batch never grows past this, however small its features: it bounds one chunk's size.
_MAX_BATCH_FEATURES = 16384
# Features with non-string keys are looked at this many at a time: a group without any pays nothing more, and
# what orjson.loads builds for one with some is freed before the garbage collector moves it to its oldest
# generation (a full collection walks every feature in memory). 16 measured best of 16 to 256.
_LENIENT_GROUP = 16

_GEOMETRY_TYPES = frozenset(
    {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon", "GeometryCollection"}
)
# orjson writes NaN and infinities as null; in coordinates, that null is an array element, after "[" or ",".
# Measured on serialised features: `b"null" in data` scans 1.8 GB/s; the first pattern 3.1 GB/s on Python 3.10 to
# 3.12 but 1.7 on 3.13, the second 2.5 on all of them. Both find the same.
_ARRAY_NULL = re.compile(rb"null(?<=[\[,]null)" if sys.version_info < (3, 13) else rb"n(?=ull)(?<=[\[,]n)")
_INTEGER_RANGE = range(-(2**63), 2**64)
_INTEGER_ERRORS = ("Integer exceeds 64-bit range", "Dict integer key must be within 64-bit range")


@dataclass
class EncodingStats:
    """
    What an encoding has done so far: features and bytes out, and seconds spent in orjson.

    ``marks``, when a list, gets ``(bytes, features)`` after each batch: how many features end within how many
    bytes, so that bytes stored can be told as features stored.
    """

    features: int = 0
    bytes: int = 0
    seconds: float = 0.0
    marks: list[tuple[int, int]] | None = field(default=None, repr=False)

    def add_batch(self, size: int, features: int, seconds: float) -> None:
        """
        Count an encoded batch.

        :param size: Its bytes.
        :param features: Its features.
        :param seconds: Its time in orjson.
        """
        self.features += features
        self.bytes += size
        self.seconds += seconds
        if self.marks is not None:
            self.marks.append((self.bytes, self.features))


def _default(value: Any) -> Any:
    geo_interface = getattr(value, "__geo_interface__", None)
    if geo_interface is not None:
        return geo_interface
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Decimal):
        return _decimal(value)
    # numpy arrays orjson cannot take natively: non-contiguous, object or unusual dtypes.
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"type {type(value).__name__} is not JSON serializable")


def _decimal(value: Decimal) -> orjson.Fragment | float:
    # Its own text is a JSON number with every digit; past a double's range most readers fail on it, so such a
    # value goes the way of a float's infinity, as NaN does.
    if value.is_nan():
        return math.nan
    as_float = float(value)
    if math.isinf(as_float):
        return as_float
    return orjson.Fragment(str(value))


# orjson.dumps costs about 2 us a call beside its work: a feature at a time triples a sequence's encoding time. So a
# batch is dumped as one list with this marker after each feature; orjson escapes control characters in strings,
# so the only raw 0x1E bytes in its output are the markers', each between two commas.
_MARK = orjson.Fragment(b"\x1e")
_NEWLINE = b"\n"


class _Framing:
    """How an object lays features out: what opens it, what goes between two runs of features, what closes it."""

    head = b""
    separator = b""
    tail = b""
    #: Whether the object can hold a collection's members other than its features (``bbox``...).
    holds_members = False

    def encode(self, features: list[Any], option: int) -> memoryview:
        """The features' bytes as laid out in the object, without ``head``, ``separator`` or ``tail``."""
        raise NotImplementedError

    def from_array(self, data: bytes, features: list[Any], option: int) -> memoryview:
        """The same, given the features' bytes as one JSON array."""
        raise NotImplementedError


class _CollectionFraming(_Framing):
    """One FeatureCollection: its features are the elements of an array."""

    head = COLLECTION_HEAD
    separator = b","
    tail = COLLECTION_TAIL
    holds_members = True

    def encode(self, features: list[Any], option: int) -> memoryview:
        return self.from_array(orjson.dumps(features, default=_default, option=option), features, option)

    def from_array(self, data: bytes, features: list[Any], option: int) -> memoryview:
        # Drop the array's own brackets without copying it.
        return memoryview(data)[1:-1]


class _SequenceFraming(_Framing):
    """A GeoJSON text sequence, newline-delimited: each feature on a line of its own, ended by a newline."""

    def encode(self, features: list[Any], option: int) -> memoryview:
        marked = list(chain.from_iterable(zip(features, repeat(_MARK))))
        lines = _marked_lines(orjson.dumps(marked, default=_default, option=option), len(features))
        if lines is None:  # a Fragment of the caller's holds a raw 0x1E: a feature at a time, then
            option |= orjson.OPT_APPEND_NEWLINE
            lines = [orjson.dumps(feature, default=_default, option=option) for feature in features]
        return memoryview(b"".join(lines))

    def from_array(self, data: bytes, features: list[Any], option: int) -> memoryview:
        return self.encode(features, option)


def _marked_lines(data: bytes, count: int) -> list[bytes | memoryview] | None:
    # data is [f1,<mark>,f2,<mark>]: each feature ends one byte before its mark, the next starts two bytes after.
    view = memoryview(data)
    lines: list[bytes | memoryview] = []
    find = data.find
    start = 1
    for _ in range(count):
        mark = find(b"\x1e", start)
        if mark < 0:
            return None
        lines += (view[start : mark - 1], _NEWLINE)
        start = mark + 2
    return lines if start == len(data) else None


_FRAMINGS: Mapping[OutputFormat, _Framing] = {"geojson": _CollectionFraming(), "geojsonseq": _SequenceFraming()}


def _framing(output_format: OutputFormat) -> _Framing:
    framing = _FRAMINGS.get(output_format)
    if framing is None:
        accepted = ", ".join(map(repr, OUTPUT_FORMATS))
        raise ValueError(f"output_format must be one of {accepted}, not {reprlib.repr(output_format)}")
    return framing


def check_features(features: object, what: str = "features") -> None:
    """
    Refuse what is not a collection of features, before any request.

    :param features: What a caller passed as features.
    :param what: How the error names it: ``features``, or ``a batch`` for a writer's ``add``.
    :raises TypeError: If it is a string, bytes, a mapping or not iterable; a mapping gets a hint.
    """
    if isinstance(features, (str, bytes, bytearray, Mapping)) or not isinstance(features, (Iterable, AsyncIterable)):
        hint = " (pass collection['features'])" if isinstance(features, Mapping) else ""
        raise TypeError(
            f"{what} must be an iterable or async iterable of GeoJSON features, not {type(features).__name__}{hint}"
        )


def check_members(members: Mapping[str, Any] | None, output_format: OutputFormat) -> None:
    """
    Check that an object of a format can hold a collection's members other than ``type`` and ``features``.

    :param members: The collection's members, or `None`.
    :param output_format: The format.
    :raises ValueError: If the format is unknown, or is a text sequence and there are such members: a sequence
        holds features only.
    """
    framing = _framing(output_format)
    others = [name for name in members or () if name not in ("type", "features")]
    if others and not framing.holds_members:
        raise ValueError(
            f"a GeoJSON text sequence holds features only, not the collection's {', '.join(map(repr, others))}: "
            "drop them, or write output_format='geojson'"
        )


def _collection_head(members: Mapping[str, Any]) -> bytes:
    others = {name: value for name, value in members.items() if name not in ("type", "features")}
    if not others:
        return COLLECTION_HEAD
    try:
        data = orjson.dumps(others, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError as error:
        names = ", ".join(map(repr, others))
        raise TypeError(f"the collection's members {names} cannot be written as JSON: {error}") from error
    # Before "features", so that the features can still follow in chunks.
    return b'{"type":"FeatureCollection",' + data[1:-1] + b',"features":['


def _dumps(features: list[Any], first_index: int, framing: _Framing) -> memoryview:
    _check_types(features, first_index)
    try:
        data = framing.encode(features, _OPTIONS)
    except orjson.JSONEncodeError:
        data = _dumps_lenient(features, first_index, framing)
    if _ARRAY_NULL.search(data) is not None:
        _check_coordinates(features, first_index)
    return data


def _check_types(features: list[Any], first_index: int) -> None:
    try:
        # In C: a Python loop over the features would cost a tenth of orjson's own time.
        if list(map(dict.get, features, repeat("type"))).count("Feature") == len(features):
            return
    except (TypeError, ValueError):
        pass  # not a dict, or a "type" that cannot be compared: the loop below says which
    for offset, feature in enumerate(features):
        problem = _not_a_feature(feature)
        if problem is not None:
            raise FeatureEncodingError(first_index + offset, problem)


def _not_a_feature(feature: Any) -> str | None:
    if not isinstance(feature, Mapping):
        return f"a feature is a mapping, not {type(feature).__name__}"
    if "type" not in feature:
        return 'it has no "type"; a GeoJSON feature has "type": "Feature"'
    kind = feature["type"]
    if not isinstance(kind, str):
        return f'its "type" is {reprlib.repr(kind)}, not "Feature"'
    if kind == "Feature":
        return None
    if kind in _GEOMETRY_TYPES:
        return f'it is a {kind} geometry, not a Feature; wrap it: {{"type": "Feature", "geometry": it, ...}}'
    if kind == "FeatureCollection":
        return "it is a FeatureCollection, not a Feature; pass its features"
    return f'its "type" is {reprlib.repr(kind)}, not "Feature"'


def _dumps_lenient(features: list[Any], first_index: int, framing: _Framing) -> memoryview:
    # Only non-string keys can be written alike (1 and "1" are both written "1"): a group without any is written as
    # the fast path writes it, and only a group with some pays for looking for collisions.
    pieces: list[memoryview] = []
    for start in range(0, len(features), _LENIENT_GROUP):
        group = features[start : start + _LENIENT_GROUP]
        try:
            piece = framing.encode(group, _OPTIONS)
        except orjson.JSONEncodeError:
            piece = _dumps_checked(group, first_index + start, framing)
        pieces.append(piece)
    return memoryview(framing.separator.join(pieces))


def _dumps_checked(features: list[Any], first_index: int, framing: _Framing) -> memoryview:
    try:
        data = orjson.dumps(features, default=_default, option=_LENIENT_OPTIONS)
    except orjson.JSONEncodeError:
        data = b""
    if data and _reencodes_alike(data):
        return framing.from_array(data, features, _LENIENT_OPTIONS)
    # Something is wrong, or a Decimal's digits differ: a feature at a time says which, if any.
    for offset, feature in enumerate(features):
        try:
            feature_data = orjson.dumps(feature, default=_default, option=_LENIENT_OPTIONS)
        except orjson.JSONEncodeError as error:
            raise FeatureEncodingError(first_index + offset, _reason(feature, error)) from error
        problem = _colliding_keys(feature, feature_data)
        if problem is not None:
            raise FeatureEncodingError(first_index + offset, problem)
    return framing.from_array(
        data or orjson.dumps(features, default=_default, option=_LENIENT_OPTIONS), features, _LENIENT_OPTIONS
    )


def _reason(feature: Any, error: orjson.JSONEncodeError) -> str:
    if str(error) not in _INTEGER_ERRORS:
        return str(error)
    found = _find(feature, "", _is_big_integer)
    where = f"{reprlib.repr(found[1])} at {found[0]}" if found is not None else "an integer"
    return (
        f"{where} is outside the range of JSON integers written here, -2**63 to 2**64-1: pass it as a string"
        " (str(value)), as a Decimal to write it as a JSON number with all its digits, or as a float"
    )


def _reencodes_alike(data: bytes) -> bool:
    # orjson.loads keeps one of two equal keys, so JSON with a duplicate key does not encode back to its bytes. Nor
    # does a Decimal written with more digits than a float keeps, which has no duplicate: the caller looks closer.
    try:
        return orjson.dumps(orjson.loads(data)) == data
    except orjson.JSONDecodeError:
        return False


def _colliding_keys(feature: Any, data: bytes) -> str | None:
    if _reencodes_alike(data):
        return None
    duplicates = _duplicate_keys(data)
    if not duplicates:
        return None
    found = _find(feature, "", _has_colliding_keys)
    keys = f"{', '.join(map(repr, _colliding(found[1])))} at {found[0] or 'its top level'} " if found else ""
    return f"its keys {keys}are all written as the JSON key {json.dumps(duplicates[0])}; make them distinct"


def _duplicate_keys(data: bytes) -> list[str]:
    duplicates: list[str] = []

    def check(pairs: list[tuple[str, Any]]) -> None:
        keys = [key for key, _ in pairs]
        duplicates.extend(key for key in dict.fromkeys(keys) if keys.count(key) > 1)

    json.loads(data, object_pairs_hook=check)
    return duplicates


def _check_coordinates(features: list[Any], first_index: int) -> None:
    # The batch holds a null in an array; only those in a geometry are refused, so look at the geometries alone.
    geometries = [_geometry(feature) for feature in features]
    if _ARRAY_NULL.search(orjson.dumps(geometries, default=_default, option=_LENIENT_OPTIONS)) is None:
        return
    for offset, geometry in enumerate(geometries):
        if _ARRAY_NULL.search(orjson.dumps(geometry, default=_default, option=_LENIENT_OPTIONS)) is None:
            continue
        found = _null_coordinate(geometry, "geometry")
        if found is not None:
            raise FeatureEncodingError(
                first_index + offset,
                f"a coordinate is {found[1]!r} (at {found[0]}), which JSON can only write as null: GeoJSON"
                " coordinates are finite numbers; fix or drop the feature",
            )


def _geometry(feature: Mapping[str, Any]) -> Any:
    plain = _plain(feature)
    return _plain(plain.get("geometry")) if isinstance(plain, Mapping) else None


def _null_coordinate(geometry: Any, path: str) -> tuple[str, Any] | None:
    if not isinstance(geometry, Mapping):
        return None
    if geometry.get("type") == "GeometryCollection":
        members = _plain(geometry.get("geometries"))
        for index, member in enumerate(members if isinstance(members, (list, tuple)) else ()):
            found = _null_coordinate(_plain(member), f"{path}.geometries[{index}]")
            if found is not None:
                return found
        return None
    return _find(geometry.get("coordinates"), f"{path}.coordinates", _written_as_null)


def _find(value: Any, path: str, predicate: Callable[[Any], bool]) -> tuple[str, Any] | None:
    """The first value, key included, that ``predicate`` is true of, walking what orjson would write, and where."""
    value = _plain(value)
    if predicate(value):
        return path, value
    if isinstance(value, Mapping):
        for key, item in value.items():
            if predicate(key):
                return f"{path} (a key)", key
            found = _find(item, f"{path}.{key}" if path else str(key), predicate)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find(item, f"{path}[{index}]", predicate)
            if found is not None:
                return found
    return None


def _plain(value: Any) -> Any:
    """What orjson writes a value as, for the values it does not write natively (numpy ones included)."""
    if value is None or isinstance(value, (dict, list, tuple, str, int, float, Decimal)):
        return value
    try:
        return _default(value)
    except TypeError:
        return value


def _written_as_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, Decimal) and isinstance(_decimal(value), float)


def _is_big_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value not in _INTEGER_RANGE


def _colliding(mapping: Mapping[Any, Any]) -> list[Any]:
    written: dict[bytes, list[Any]] = {}
    for key in mapping:
        with contextlib.suppress(orjson.JSONEncodeError):
            written.setdefault(orjson.dumps({key: None}, option=_LENIENT_OPTIONS), []).append(key)
    return [key for keys in written.values() if len(keys) > 1 for key in keys]


def _has_colliding_keys(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(_colliding(value))


def _timed_dumps(features: list[Any], first_index: int, framing: _Framing) -> tuple[memoryview, float]:
    started = time.perf_counter()
    data = _dumps(features, first_index, framing)
    return data, time.perf_counter() - started


def _pull_and_dumps(iterator: Iterator[Any], count: int, first_index: int, framing: _Framing) -> EncodedBatch:
    # Pulled in the worker thread: a generator's own work stays off the event loop too.
    batch = list(islice(iterator, count))
    if not batch:
        return memoryview(b""), 0, 0.0
    data, seconds = _timed_dumps(batch, first_index, framing)
    return data, len(batch), seconds


def _encode_trip(
    iterator: Iterator[Any], batch_size: int, first_index: int, framing: _Framing, target: float, batches: int
) -> tuple[list[EncodedBatch], int, bool]:
    # Up to `batches` batches in one trip to a worker thread: fewer hand-overs of the GIL between this thread and
    # the loop that sends it work.
    encoded: list[EncodedBatch] = []
    for turn in range(batches):
        if turn:
            # Releases the GIL for a moment: a thread waiting for it (another event loop's) takes it now, not after
            # the switch interval.
            time.sleep(0)
        started = time.perf_counter()
        data, count, seconds = _pull_and_dumps(iterator, batch_size, first_index, framing)
        if count:
            encoded.append((data, count, seconds))
        if count < batch_size:
            return encoded, batch_size, True  # a short batch means the iterator is exhausted
        first_index += count
        # Sized on pulling and encoding together: a generator's own work holds the GIL as orjson does. Measured on
        # 300k features from a generator, worst loop stall: 34.7 -> 18.0 ms through S3Sink, 11.5 -> 9.1 ms awaited.
        batch_size = _next_batch_size(batch_size, time.perf_counter() - started, target)
    return encoded, batch_size, False


def _next_batch_size(size: int, seconds: float, target: float) -> int:
    if seconds <= 0:
        return min(size * 2, _MAX_BATCH_FEATURES)
    # Grow at most 2x a step so one unusually cheap batch cannot make the next one hold the GIL for long.
    wanted = int(size * target / seconds)
    return max(1, min(wanted, size * 2, _MAX_BATCH_FEATURES))


def _encoded_batches(
    features: Features,
    batch_size: int,
    target_seconds: float,
    limiter: anyio.CapacityLimiter | None,
    framing: _Framing,
    batches_per_trip: int,
    index: int = 0,
) -> AsyncIterator[EncodedBatch]:
    if isinstance(features, EncodedFeatures):
        return _passed_on(features)
    if isinstance(features, AsyncIterable):
        return _from_async_iterable(features, batch_size, target_seconds, limiter, framing, index)
    return _from_iterable(features, batch_size, target_seconds, limiter, framing, batches_per_trip, index)


async def _passed_on(features: EncodedFeatures) -> AsyncIterator[EncodedBatch]:
    async for group in features.groups:
        for encoded_batch in group:
            yield encoded_batch


async def _from_async_iterable(
    features: AsyncIterable[Any],
    batch_size: int,
    target_seconds: float,
    limiter: anyio.CapacityLimiter | None,
    framing: _Framing,
    index: int,
) -> AsyncIterator[EncodedBatch]:
    # Pulled on the loop, the only place an async iterable can be; encoded in a worker thread.
    iterator = aiter(features)
    exhausted = False
    while not exhausted:
        batch: list[Any] = []
        async for feature in iterator:
            batch.append(feature)
            if len(batch) >= batch_size:
                break
        else:
            exhausted = True
        if not batch:
            break
        data, seconds = await anyio.to_thread.run_sync(_timed_dumps, batch, index, framing, limiter=limiter)
        yield data, len(batch), seconds
        index += len(batch)
        batch_size = _next_batch_size(batch_size, seconds, target_seconds)


async def _from_iterable(
    features: Iterable[Any],
    batch_size: int,
    target_seconds: float,
    limiter: anyio.CapacityLimiter | None,
    framing: _Framing,
    batches_per_trip: int,
    index: int,
) -> AsyncIterator[EncodedBatch]:
    # Pulled and encoded together, in trips to a worker thread, or to the thread a ThreadBoundFeatures names.
    if isinstance(features, ThreadBoundFeatures):
        iterator, run_sync = features.iterator, features.run_sync
    else:
        iterator, run_sync = iter(features), partial(anyio.to_thread.run_sync, limiter=limiter)
    # A sequence's end is known: no trip is spent finding it empty.
    end = index + len(features) if isinstance(features, (list, tuple)) else None
    exhausted = end == index
    while not exhausted:
        encoded, batch_size, exhausted = await run_sync(
            _encode_trip, iterator, batch_size, index, framing, target_seconds, batches_per_trip
        )
        for data, count, seconds in encoded:
            yield data, count, seconds
            index += count
        exhausted = exhausted or index == end


async def encode_batch(
    features: Features,
    first_index: int,
    *,
    output_format: OutputFormat = "geojson",
    batch_features: int = 1000,
    call_seconds: float = 0.001,
    limiter: anyio.CapacityLimiter | None = None,
    batches_per_trip: int = 1,
) -> list[EncodedBatch]:
    """
    Pull and encode a batch of features as :func:`encode_collection` would (an iterable in worker threads, an async
    iterable on the loop), for :class:`EncodedFeatures`.

    :param features: The features: an iterable or async iterable.
    :param first_index: The first one's index within the object, for errors.
    :param output_format: The object's format.
    :param batch_features: Features in the first orjson call; later ones adapt to ``call_seconds``.
    :param call_seconds: Target duration of one orjson call.
    :param limiter: Limits the worker threads used.
    :param batches_per_trip: Batches encoded per trip to a worker thread.
    :return: The encoded batches, in order.
    :raises FeatureEncodingError: As :func:`encode_collection` does, naming the feature's index within the object.
    """
    framing = _framing(output_format)
    batches = _encoded_batches(features, batch_features, call_seconds, limiter, framing, batches_per_trip, first_index)
    return [encoded_batch async for encoded_batch in batches]


async def encode_collection(
    features: Features,
    *,
    batch_features: int = 1000,
    call_seconds: float = 0.001,
    limiter: anyio.CapacityLimiter | None = None,
    stats: EncodingStats | None = None,
    members: Mapping[str, Any] | None = None,
    output_format: OutputFormat = "geojson",
    batches_per_trip: int = 1,
) -> AsyncGenerator[memoryview, None]:
    """
    Encode features as one compact UTF-8 GeoJSON FeatureCollection, or a GeoJSON text sequence, chunk by chunk.

    Features are pulled and serialised with orjson in worker threads (:class:`ThreadBoundFeatures` on their own), in
    batches sized so that one orjson call, with the pulling from an iterable, lasts about ``call_seconds``: orjson
    holds the GIL for a whole call, so this bounds how long the event loop waits. The chunks, joined, are the
    object's bytes. NaN and infinities outside coordinates are written as ``null``, a ``Decimal`` with all its digits.

    :param features: GeoJSON features (mappings, e.g. ``geojson.Feature``), from an iterable or async iterable.
    :param batch_features: Features in the first batch.
    :param call_seconds: Target duration of one batch's orjson call (and pulling, for an iterable).
    :param limiter: Limits the worker threads used, e.g. shared by all the writes of a sink.
    :param stats: Updated as chunks are produced.
    :param members: A collection's members but ``type`` and ``features`` (``bbox``...), written before the features.
    :param output_format: ``"geojson"``, a FeatureCollection; ``"geojsonseq"``, one feature a line, each line
        ended by a newline (no feature: no byte).
    :param batches_per_trip: Batches of an iterable encoded per trip to a worker thread, the GIL released between
        two: one for the caller's own loop, more for a private loop (a third thread waits through fewer hand-overs).
    :return: An async iterator of chunks of bytes.
    :raises FeatureEncodingError: If a feature is not a mapping whose ``type`` is ``"Feature"``, holds a value JSON
        cannot represent (an integer past 64 bits...), NaN or an infinity in its geometry's coordinates, or two keys
        written as the same JSON key (``1`` and ``"1"``).
    :raises ValueError: For an unknown format, a sequence with ``members``, ``batches_per_trip`` < 1; before any chunk.
    :raises TypeError: If a member cannot be written as JSON; before any chunk.
    """
    if batches_per_trip < 1:
        raise ValueError("batches_per_trip must be at least 1")
    stats = stats if stats is not None else EncodingStats()
    check_members(members, output_format)
    framing = _framing(output_format)
    head = framing.head
    if members:
        head = await anyio.to_thread.run_sync(_collection_head, members, limiter=limiter)
    if head:
        yield memoryview(head)
        stats.bytes += len(head)
    separator = memoryview(framing.separator)
    first = True
    batches = _encoded_batches(features, batch_features, call_seconds, limiter, framing, batches_per_trip)
    async for chunk, count, seconds in batches:
        if not first and separator:
            yield separator
            stats.bytes += len(separator)
        first = False
        stats.add_batch(len(chunk), count, seconds)
        yield chunk
    if framing.tail:
        yield memoryview(framing.tail)
        stats.bytes += len(framing.tail)
