"""Deciding parts: sizes, the 10,000-part rule and chunks that straddle parts. No I/O here."""

from __future__ import annotations

import base64
import sys
import zlib

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_runner.sink.settings import MAX_PART_SIZE, MIN_PART_SIZE, MiB, SinkSettings
from model_runner.sink.upload.parts import MAX_PARTS, ObjectCrc, PartPlan, SealedBody, crc32_combine, part_size_for
from model_runner.sink.upload.stream import single_error

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

TiB = 1024 * 1024 * MiB


def cut(plan: PartPlan, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    parts = []
    for chunk in chunks:
        parts += [(number, b"".join(pieces)) for number, pieces in plan.add(memoryview(chunk))]
    last = plan.finish()
    if last is not None:
        parts.append((last[0], b"".join(last[1])))
    return parts


def test_chunks_are_cut_into_parts_of_the_planned_size_in_order() -> None:
    chunks = [bytes([i]) * size for i, size in enumerate([3, 10, 1, 7, 25, 2])]
    parts = cut(PartPlan(8), chunks)
    assert [number for number, _ in parts] == [1, 2, 3, 4, 5, 6]
    assert [len(body) for _, body in parts] == [8, 8, 8, 8, 8, 8]
    assert b"".join(body for _, body in parts) == b"".join(chunks)


def test_a_chunk_larger_than_several_parts_is_split_across_them() -> None:
    chunk = bytes(range(256)) * 100
    parts = cut(PartPlan(1000), [b"head", chunk, b"tail"])
    assert [len(body) for _, body in parts] == [1000] * 25 + [608]
    assert b"".join(body for _, body in parts) == b"head" + chunk + b"tail"


def test_chunks_that_fill_parts_exactly_leave_no_empty_last_part() -> None:
    parts = cut(PartPlan(4), [b"abcd", b"efgh"])
    assert parts == [(1, b"abcd"), (2, b"efgh")]


def test_part_sizes_stay_within_s3_limits_and_reach_s3s_largest_object_in_10000_parts() -> None:
    base = SinkSettings().part_size
    sizes = [part_size_for(number, base) for number in range(1, MAX_PARTS + 1)]
    assert sizes[0] == base == 8 * MiB
    assert all(MIN_PART_SIZE <= size <= MAX_PART_SIZE for size in sizes)
    assert sizes == sorted(sizes)
    # S3's largest object is 5 TiB; a stream of unknown length must fit in 10,000 parts.
    assert sum(sizes) >= 5 * TiB
    assert sum(part_size_for(number, MIN_PART_SIZE) for number in range(1, MAX_PARTS + 1)) >= 5 * TiB


def test_a_stream_past_10000_parts_is_refused() -> None:
    plan = PartPlan(1, number=MAX_PARTS)
    with pytest.raises(ValueError, match="10,000 parts"):
        plan.add(memoryview(b"x" * 10_000))


@pytest.mark.anyio
async def test_the_object_crc_of_parts_sealed_concurrently_is_the_crc32_of_the_whole() -> None:
    # Parts are sent concurrently and may reach their sealing in any order: the object's CRC32 follows part order.
    chunks = [bytes([index]) * (1000 + index) for index in range(40)]
    parts = cut(PartPlan(4096), chunks)
    crc = ObjectCrc()
    sealed: dict[int, SealedBody] = {}

    async def seal_part(number: int, body: bytes) -> None:
        sealed[number] = await crc.seal(number, [memoryview(body)])

    async with anyio.create_task_group() as group:
        for number, body in reversed(parts):
            group.start_soon(seal_part, number, body)
    whole = b"".join(chunks)
    assert crc.checksum == base64.b64encode(zlib.crc32(whole).to_bytes(4, "big")).decode()
    for number, body in parts:
        assert sealed[number].body.read() == body
        assert sealed[number].checksum == base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()


@pytest.mark.parametrize(
    "options",
    [
        {"part_size": 4 * MiB},
        {"part_size": 6 * 1024 * MiB},
        {"max_parts_in_flight": 0},
        {"encode_call_seconds": 0},
        {"sse_kms_key_id": "key"},
        {"role_duration_seconds": 60},
    ],
)
def test_settings_outside_s3s_limits_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SinkSettings(**options)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=40), part_size=st.integers(1, 50))
def test_any_chunks_cut_into_any_part_size_join_back_to_the_stream(chunks: list[bytes], part_size: int) -> None:
    parts = cut(PartPlan(part_size), chunks)
    assert b"".join(body for _, body in parts) == b"".join(chunks)
    assert [number for number, _ in parts] == list(range(1, len(parts) + 1))
    assert all(len(body) == part_size for _, body in parts[:-1])
    assert all(0 < len(body) <= part_size for _, body in parts)


def test_parts_failing_together_raise_the_first_error_itself() -> None:
    # Parts in flight often fail at once for one cause; callers catch the ClientError, not a task group's wrapper.
    first, second = ValueError("part 1"), ValueError("part 2")
    nested = BaseExceptionGroup("parts", [KeyboardInterrupt(), ExceptionGroup("inner", [first, second])])
    assert single_error(nested) is first
    assert single_error(BaseExceptionGroup("parts", [second, first])) is second
    only_cancelled = BaseExceptionGroup("parts", [KeyboardInterrupt()])
    assert isinstance(single_error(only_cancelled), KeyboardInterrupt)


@given(first=st.binary(max_size=300), second=st.binary(max_size=300), repeat=st.integers(0, 5000))
def test_crc32_combine_gives_the_crc32_of_both_strings_end_to_end(first: bytes, second: bytes, repeat: int) -> None:
    second = second * repeat if second else bytes(repeat)  # lengths up to about 1.5 MB
    assert crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second)) == zlib.crc32(first + second)
