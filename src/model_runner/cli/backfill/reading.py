"""
The backfill's reading of a source file: checking its top level and hashing it, then reading its features
incrementally, a FeatureCollection with ijson and NDJSON a line at a time.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import IO, Any

import ijson
import orjson

from model_runner.cli.backfill.sources import LINE_SUFFIXES, SourceError

__all__ = ["inspect_source", "read_features"]

_READ_BYTES = 1024 * 1024
# ijson's C backend, yajl2_c, is the one a wheel ships: any other reads collections several times slower.
_FAST_BACKEND = "yajl2_c"

logger = logging.getLogger(__name__)


@functools.cache
def _warn_if_slow_backend() -> None:
    # Told when the first file is read, once a process, not on import: importing is no reason to log.
    if ijson.backend != _FAST_BACKEND:
        logger.warning("ijson uses its %s backend: reading collections is several times slower", ijson.backend)


def _json_error(error: Exception) -> str:
    # yajl's messages go on to quote the text around the error, as bytes for invalid UTF-8: the first line says it.
    message = error.args[0] if error.args else ""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return str(message).strip().partition("\n")[0] or type(error).__name__


def _check_collection(file: IO[bytes]) -> None:
    _warn_if_slow_backend()
    # GeoJSON writers put "type" first, so this reads one buffer; a file putting it last is parsed one more time.
    try:
        kind = next(ijson.items(file, "type"), None)
    except (ijson.JSONError, ValueError) as error:
        raise SourceError(f"not valid JSON: {_json_error(error)}") from None
    if kind != "FeatureCollection":
        found = f"type {kind!r}" if kind is not None else "no top-level type"
        raise SourceError(f"not a GeoJSON FeatureCollection: {found}")


def inspect_source(path: Path) -> str:
    """
    Check a file's top level and hash it; blocking, for a worker thread.

    :param path: The file.
    :return: The hex SHA-256 of its bytes.
    :raises SourceError: If it cannot be read, or a collection file is not a FeatureCollection.
    """
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            if path.suffix.lower() not in LINE_SUFFIXES:
                _check_collection(file)
                file.seek(0)
            while chunk := file.read(_READ_BYTES):
                digest.update(chunk)
    except OSError as error:
        raise SourceError(f"cannot read: {error.strerror or error}") from None
    return digest.hexdigest()


def _collection_features(file: IO[bytes]) -> Iterator[Any]:
    _warn_if_slow_backend()
    count = 0
    try:
        for feature in ijson.items(file, "features.item", use_float=True):
            yield feature
            count += 1
    except (ijson.JSONError, ValueError) as error:
        raise SourceError(f"not valid JSON after feature {count}: {_json_error(error)}") from None


def _line_features(file: IO[bytes]) -> Iterator[Any]:
    for number, line in enumerate(file, 1):
        if not line.strip():
            continue
        try:
            feature = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            raise SourceError(f"line {number} is not valid JSON: {error}") from None
        if not isinstance(feature, dict):
            raise SourceError(f"line {number} is not a JSON object")
        yield feature


def read_features(path: Path) -> Generator[Any, None, None]:
    """
    Read a source file's features, incrementally: a FeatureCollection with ijson, NDJSON a line at a time.

    :param path: A ``.geojson``/``.json`` FeatureCollection or a ``.ndjson``/``.geojsonl`` file.
    :return: Its features, as dicts with float coordinates.
    :raises SourceError: If the file cannot be read or is not valid JSON; features before the error were given.
    """
    try:
        with path.open("rb") as file:
            yield from (_line_features if path.suffix.lower() in LINE_SUFFIXES else _collection_features)(file)
    except OSError as error:
        raise SourceError(f"cannot read: {error.strerror or error}") from None
