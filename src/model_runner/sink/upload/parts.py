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
    "part_size_for",
    "seal",
    "seal_continuing",
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
    """A request body that owns its bytes, their size and their CRC32 (base64, as S3 writes it)."""

    body: io.BytesIO
    size: int
    checksum: str


def seal(pieces: list[memoryview]) -> SealedBody:
    """
    Copy pieces into one request body and checksum them, a piece at a time.

    Meant for a worker thread: each copy holds the GIL only briefly and zlib releases it, so the event loop is never
    kept waiting for a whole part. The body is a ``BytesIO`` that owns its buffer because botocore would wrap bytes
    in one that aiohttp then copies, on the event loop.

    :param pieces: The body's bytes, in order.
    :return: The body, its size and its CRC32.
    """
    return seal_continuing(pieces, 0)[0]


def seal_continuing(pieces: list[memoryview], running: int) -> tuple[SealedBody, int]:
    """
    :func:`seal`, also folding the pieces into the running CRC32 of the object they belong to.

    :param pieces: The body's bytes, in order.
    :param running: The CRC32 of the object's bytes before these.
    :return: The sealed body, and the CRC32 of the object's bytes up to the end of these.
    """
    body = io.BytesIO()
    crc = 0
    for piece in pieces:
        body.write(piece)
        # Each piece is a chunk of at most a batch, still in the CPU's cache for its second CRC.
        crc = zlib.crc32(piece, crc)
        running = zlib.crc32(piece, running)
    size = body.tell()
    body.seek(0)
    return SealedBody(body, size, crc32_base64(crc)), running


class ObjectCrc:
    """
    The CRC32 of an object whose parts are sealed concurrently, computed as they are sealed: no second pass over
    the object, nothing on the event loop (zlib has no ``crc32_combine``).

    A part's sealing waits until the part before it has been folded in, so the parts must be sealed numbered from 1
    without a gap; each is sealed as soon as its turn comes, while the parts before it are uploaded.
    """

    def __init__(self) -> None:
        #: The CRC32 of the parts sealed so far.
        self.value = 0
        self._next = 1
        self._turned = anyio.Event()

    async def seal(
        self, number: int, pieces: list[memoryview], limiter: anyio.CapacityLimiter | None = None
    ) -> SealedBody:
        """
        Seal a part in a worker thread once the parts before it are, folding it into the object's CRC32.

        :param number: The part number, from 1.
        :param pieces: The part's bytes.
        :param limiter: Worker threads to seal it in; anyio's default by default.
        :return: The sealed part.
        """
        while self._next != number:
            await self._turned.wait()
        sealed, self.value = await anyio.to_thread.run_sync(seal_continuing, pieces, self.value, limiter=limiter)
        self._next = number + 1
        turned, self._turned = self._turned, anyio.Event()
        turned.set()
        return sealed

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
