"""Cutting a stream of chunks into parts, and sealing a part's pieces into a request body with its CRC32."""

from __future__ import annotations

import base64
import io
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import anyio
import anyio.to_thread

from model_runner.sink.settings import MAX_PART_SIZE

__all__ = [
    "INLINE_SEAL_BYTES",
    "MAX_PARTS",
    "PARTS_PER_SIZE_STEP",
    "ObjectCrc",
    "PartPlan",
    "SealedBody",
    "crc32_base64",
    "crc32_combine",
    "part_size_for",
    "seal",
]

# S3 allows 10,000 parts. The size of an object streamed from a generator is not known in advance, so the part
# size doubles every 900 parts: from any allowed size, 10,000 parts then reach past S3's 5 TiB object limit.
MAX_PARTS = 10_000
PARTS_PER_SIZE_STEP = 900
# Copying and checksumming this much takes tens of microseconds: less than a trip to a worker thread.
INLINE_SEAL_BYTES = 256 * 1024


def part_size_for(part_number: int, base_part_size: int) -> int:
    """
    Size of a part: ``base_part_size``, doubled every 900 parts, at most 5 GiB.

    :param part_number: Number of the part, from 1.
    :param base_part_size: Size of the first parts.
    :return: The size in bytes of that part (the last part of an upload may be shorter).
    """
    return int(min(base_part_size * 2 ** ((part_number - 1) // PARTS_PER_SIZE_STEP), MAX_PART_SIZE))


@dataclass
class PartPlan:
    """Cuts a stream of chunks into parts of the planned sizes, splitting a chunk that straddles two parts."""

    base_part_size: int
    number: int = 1
    pieces: list[memoryview] = field(default_factory=list)
    size: int = 0

    def add(self, chunk: memoryview) -> list[tuple[int, list[memoryview]]]:
        """
        Add a chunk.

        :param chunk: The next bytes of the object.
        :return: The parts that this chunk completed, as ``(part number, pieces)``.
        """
        completed = []
        while chunk:
            room = part_size_for(self.number, self.base_part_size) - self.size
            piece, chunk = chunk[:room], chunk[room:]
            self.pieces.append(piece)
            self.size += len(piece)
            if len(piece) == room:
                completed.append(self._take())
        return completed

    def finish(self) -> tuple[int, list[memoryview]] | None:
        """
        Take the last, possibly shorter, part.

        :return: The last part, or `None` if the chunks filled whole parts exactly.
        """
        return self._take() if self.size else None

    def _take(self) -> tuple[int, list[memoryview]]:
        part = (self.number, self.pieces)
        self.number += 1
        self.pieces, self.size = [], 0
        if self.number > MAX_PARTS:
            raise ValueError("object exceeds S3's 10,000 parts")
        return part


class SealedBody(NamedTuple):
    """A request body that owns its bytes, their size and their CRC32 (base64, as S3 writes it, and the number)."""

    body: io.BytesIO
    size: int
    checksum: str
    crc: int


def seal(pieces: list[memoryview]) -> SealedBody:
    """
    Copy pieces into one request body and checksum them, a piece at a time.

    Meant for a worker thread: each copy holds the GIL only briefly and zlib releases it, so the event loop is never
    kept waiting for a whole part. The body is a ``BytesIO`` that owns its buffer because botocore would wrap bytes
    in one that aiohttp then copies, on the event loop.

    :param pieces: The body's bytes, in order.
    :return: The body, its size and its CRC32.
    """
    body = io.BytesIO()
    crc = 0
    for piece in pieces:
        body.write(piece)
        crc = zlib.crc32(piece, crc)
    size = body.tell()
    body.seek(0)
    return SealedBody(body, size, crc32_base64(crc), crc)


# CRC-32's polynomial, bits reflected as zlib keeps them.
_POLY = 0xEDB88320


def _multiply(a: int, b: int) -> int:
    # a * b modulo the polynomial, both reflected (zlib's multmodp).
    product = 0
    bit = 1 << 31
    while bit:
        if a & bit:
            product ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
        bit >>= 1
    return product


# x ** (2 ** k) modulo the polynomial, for k from 0 to 31.
_X_TO_2_TO_K = [1 << 30]
for _ in range(31):
    _X_TO_2_TO_K.append(_multiply(_X_TO_2_TO_K[-1], _X_TO_2_TO_K[-1]))


def crc32_combine(first: int, second: int, second_length: int) -> int:
    """
    The CRC32 of two byte strings end to end, from theirs (zlib's ``crc32_combine``, which Python's zlib lacks):
    a few hundred integer operations, instead of a second pass over the bytes.

    :param first: The CRC32 of the first string.
    :param second: The CRC32 of the second.
    :param second_length: The second's length in bytes.
    :return: The CRC32 of both.
    """
    # first * x ** (8 * second_length): the first string's CRC moved past the second's bytes.
    shift, k = 1 << 31, 3
    while second_length:
        if second_length & 1:
            shift = _multiply(_X_TO_2_TO_K[k & 31], shift)
        second_length >>= 1
        k += 1
    return _multiply(shift, first) ^ second


class ObjectCrc:
    """
    The CRC32 of an object whose parts are sealed concurrently and in any order: each part's own CRC32, combined in
    part order when asked, with no second pass over the bytes and nothing but a few integer operations on the loop.
    """

    def __init__(self) -> None:
        self._parts: dict[int, tuple[int, int]] = {}

    async def seal(
        self, number: int, pieces: list[memoryview], limiter: anyio.CapacityLimiter | None = None
    ) -> SealedBody:
        """
        Seal a part in a worker thread, and keep its CRC32 for the object's.

        :param number: The part number, from 1.
        :param pieces: The part's bytes.
        :param limiter: Worker threads to seal it in; anyio's default by default.
        :return: The sealed part.
        """
        sealed = await anyio.to_thread.run_sync(seal, pieces, limiter=limiter)
        self._parts[number] = (sealed.crc, sealed.size)
        return sealed

    @property
    def value(self) -> int:
        """
        :return: The CRC32 of the parts sealed so far, end to end in part order.
        """
        value = 0
        for number in sorted(self._parts):
            crc, size = self._parts[number]
            value = crc32_combine(value, crc, size)
        return value

    @property
    def checksum(self) -> str:
        """
        :return: The CRC32 of the parts sealed so far, base64, as S3 reports it.
        """
        return crc32_base64(self.value)


def crc32_base64(crc: int) -> str:
    """
    A CRC32 as S3 writes it.

    :param crc: The CRC32, as :func:`zlib.crc32` gives it.
    :return: Its four big-endian bytes, base64.
    """
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")
