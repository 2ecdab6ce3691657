"""Every object's checksum is the CRC32 of its bytes, for a single PutObject and a multipart upload alike: the
result's checksum checks a download with zlib.crc32, and S3 reports it as a FULL_OBJECT checksum."""

from __future__ import annotations

import base64
import zlib
from typing import Any

import pytest

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, S3Sink, SinkSettings
from model_runner.sink.settings import MiB

pytestmark = [pytest.mark.timeout(120)]

SMALL_PARTS = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, max_parts_in_flight=3)


def crc32(body: bytes) -> str:
    return base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()


@pytest.fixture(scope="module")
def large() -> list[dict[str, Any]]:
    # ~12.7 MB: three parts of 5 MiB, the last shorter.
    return list(synthetic_detections(25_000, seed=15))


@pytest.mark.anyio
async def test_a_small_objects_checksum_is_the_crc32_of_its_bytes(s3: Any, bucket: str) -> None:
    result = await AsyncS3Sink(bucket, "crc").write_with_result("small", list(synthetic_detections(20, seed=1)))
    body = s3.get_object(Bucket=bucket, Key=result.key)["Body"].read()
    assert result.parts == 0
    assert result.checksum == crc32(body)


@pytest.mark.anyio
async def test_a_multipart_objects_checksum_is_the_crc32_of_its_bytes_as_s3_reports_it(
    s3: Any, bucket: str, large: list[dict[str, Any]]
) -> None:
    result = await AsyncS3Sink(bucket, "crc", settings=SMALL_PARTS).write_with_result("large", large)
    body = s3.get_object(Bucket=bucket, Key=result.key)["Body"].read()
    assert result.parts == 3
    assert result.checksum == crc32(body)
    head = s3.head_object(Bucket=bucket, Key=result.key, ChecksumMode="ENABLED")
    assert (head["ChecksumCRC32"], head["ChecksumType"]) == (result.checksum, "FULL_OBJECT")
    attributes = s3.get_object_attributes(Bucket=bucket, Key=result.key, ObjectAttributes=["Checksum"])
    assert attributes["Checksum"] == {"ChecksumCRC32": result.checksum, "ChecksumType": "FULL_OBJECT"}


def test_the_sync_sink_reports_the_same(s3: Any, bucket: str, large: list[dict[str, Any]]) -> None:
    result = S3Sink(bucket, "crc", settings=SMALL_PARTS).write_with_result("large", iter(large))
    body = s3.get_object(Bucket=bucket, Key=result.key)["Body"].read()
    assert result.parts == 3
    assert result.checksum == crc32(body)
