"""Cutting a stream of chunks into parts, and sealing a part's pieces into a request body with its CRC32."""

from __future__ import annotations

import base64
import io
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

from model_runner.sink.settings import MAX_PART_SIZE

__all__ = [
    "INLINE_SEAL_BYTES",
    "MAX_PARTS",
    "PARTS_PER_SIZE_STEP",
    "PartPlan",
    "SealedBody",
    "composite_crc32",
    "crc32_base64",
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
    body = io.BytesIO()
    crc = 0
    for piece in pieces:
        body.write(piece)
        crc = zlib.crc32(piece, crc)
    size = body.tell()
    body.seek(0)
    return SealedBody(body, size, crc32_base64(crc))


def crc32_base64(crc: int) -> str:
    """
    A CRC32 as S3 writes it.

    :param crc: The CRC32, as :func:`zlib.crc32` gives it.
    :return: Its four big-endian bytes, base64.
    """
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def composite_crc32(part_checksums: list[str]) -> str:
    """
    The checksum S3 gives a multipart object: the CRC32 of the parts' CRC32s, then ``-<parts>``.

    :param part_checksums: Base64 CRC32 of each part, in order.
    :return: The object's composite checksum.
    """
    raw = b"".join(base64.b64decode(checksum) for checksum in part_checksums)
    return f"{crc32_base64(zlib.crc32(raw))}-{len(part_checksums)}"
