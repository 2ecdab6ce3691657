"""Features -> the bytes of one GeoJSON FeatureCollection, in chunks, encoded off the event loop."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import islice
from typing import Any, TypeAlias

import anyio
import anyio.to_thread
import orjson

from model_runner.sink.exceptions import FeatureEncodingError

__all__ = ["COLLECTION_HEAD", "COLLECTION_TAIL", "EncodingStats", "FeatureSource", "encode_collection"]

FeatureSource: TypeAlias = "Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]]"

COLLECTION_HEAD = b'{"type":"FeatureCollection","features":['
COLLECTION_TAIL = b"]}"

# NaN and infinities become null, as orjson always does; numpy values are written natively.
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
# Non-string keys cost orjson speed on every dict, so they are only allowed on a batch that needs them.
_LENIENT_OPTIONS = _OPTIONS | orjson.OPT_NON_STR_KEYS
# A batch never grows past this, however small its features: it bounds one chunk's size.
_MAX_BATCH_FEATURES = 16384


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


def _default(value: Any) -> Any:
    geo_interface = getattr(value, "__geo_interface__", None)
    if geo_interface is not None:
        return geo_interface
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Decimal):
        return float(value)
    # numpy arrays orjson cannot take natively: non-contiguous, object or unusual dtypes.
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"type {type(value).__name__} is not JSON serializable")


def _dumps(features: list[Any], first_index: int) -> bytes:
    for offset, feature in enumerate(features):
        if not isinstance(feature, Mapping):
            raise FeatureEncodingError(first_index + offset, f"a feature is a mapping, not {type(feature).__name__}")
    try:
        return orjson.dumps(features, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        pass
    try:
        return orjson.dumps(features, default=_default, option=_LENIENT_OPTIONS)
    except orjson.JSONEncodeError:
        # Find the culprit only now, so the fast path pays nothing for the error's index.
        for offset, feature in enumerate(features):
            try:
                orjson.dumps(feature, default=_default, option=_LENIENT_OPTIONS)
            except orjson.JSONEncodeError as error:
                raise FeatureEncodingError(first_index + offset, str(error)) from error
        raise


def _timed_dumps(features: list[Any], first_index: int) -> tuple[bytes, float]:
    started = time.perf_counter()
    data = _dumps(features, first_index)
    return data, time.perf_counter() - started


def _pull_and_dumps(iterator: Iterator[Any], count: int, first_index: int) -> tuple[bytes, int, float]:
    # Pulled in the worker thread: a generator's own work stays off the event loop too.
    batch = list(islice(iterator, count))
    if not batch:
        return b"", 0, 0.0
    data, seconds = _timed_dumps(batch, first_index)
    return data, len(batch), seconds


def _next_batch_size(size: int, seconds: float, target: float) -> int:
    if seconds <= 0:
        return min(size * 2, _MAX_BATCH_FEATURES)
    # Grow at most 2x a step so one unusually cheap batch cannot make the next one hold the GIL for long.
    wanted = int(size * target / seconds)
    return max(1, min(wanted, size * 2, _MAX_BATCH_FEATURES))


async def _encoded_batches(
    features: FeatureSource, batch_size: int, target_seconds: float, limiter: anyio.CapacityLimiter | None
) -> AsyncIterator[tuple[bytes, int, float]]:
    index = 0
    if isinstance(features, AsyncIterable):
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
            data, seconds = await anyio.to_thread.run_sync(_timed_dumps, batch, index, limiter=limiter)
            yield data, len(batch), seconds
            index += len(batch)
            batch_size = _next_batch_size(batch_size, seconds, target_seconds)
        return
    sync_iterator = iter(features)
    while True:
        data, count, seconds = await anyio.to_thread.run_sync(
            _pull_and_dumps, sync_iterator, batch_size, index, limiter=limiter
        )
        if count:
            yield data, count, seconds
        if count < batch_size:
            return  # a short batch means the iterator is exhausted: no trip to a thread to find out
        index += count
        batch_size = _next_batch_size(batch_size, seconds, target_seconds)


async def encode_collection(
    features: FeatureSource,
    *,
    batch_features: int = 1000,
    call_seconds: float = 0.001,
    limiter: anyio.CapacityLimiter | None = None,
    stats: EncodingStats | None = None,
) -> AsyncGenerator[memoryview, None]:
    """
    Encode features as one compact UTF-8 GeoJSON FeatureCollection, chunk by chunk.

    Features are pulled and serialised with orjson in worker threads, a batch at a time, each batch sized so that
    one orjson call lasts about ``call_seconds``: orjson holds the GIL for a whole call, so this bounds how long
    the event loop waits. The chunks, joined, are the collection's bytes.

    :param features: GeoJSON features (mappings, e.g. ``geojson.Feature``), from an iterable or async iterable.
    :param batch_features: Features in the first batch.
    :param call_seconds: Target duration of one orjson call.
    :param limiter: Limits the worker threads used, e.g. shared by all the writes of a sink.
    :param stats: Updated as chunks are produced.
    :return: An async iterator of chunks of bytes.
    :raises FeatureEncodingError: If a feature is not a mapping or holds a value JSON cannot represent.
    """
    stats = stats if stats is not None else EncodingStats()
    yield memoryview(COLLECTION_HEAD)
    stats.bytes += len(COLLECTION_HEAD)
    separator = memoryview(b",")
    first = True
    async for data, count, seconds in _encoded_batches(features, batch_features, call_seconds, limiter):
        if not first:
            yield separator
            stats.bytes += 1
        first = False
        # Drop the batch's own brackets without copying it.
        chunk = memoryview(data)[1:-1]
        stats.features += count
        stats.bytes += len(chunk)
        stats.seconds += seconds
        if stats.marks is not None:
            stats.marks.append((stats.bytes, stats.features))
        yield chunk
    yield memoryview(COLLECTION_TAIL)
    stats.bytes += len(COLLECTION_TAIL)
