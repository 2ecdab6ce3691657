"""Security options reach every request they concern: the expected bucket owner and server-side encryption."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError
from support.proxy import FaultProxy, Rule

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ClientSettings, SinkSettings
from model_runner.sink.settings import MiB

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

OWNER = "123456789012"
MULTIPART = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, expected_bucket_owner=OWNER)


async def test_the_expected_bucket_owner_is_on_every_request_of_a_write(proxy: FaultProxy, bucket: str) -> None:
    sink = AsyncS3Sink(bucket, "owned", client=ClientSettings(endpoint_url=proxy.url), settings=MULTIPART)
    assert await sink.validate_s3_bucket()
    assert await sink.write("small", list(synthetic_detections(10)))
    assert await sink.write("large", list(synthetic_detections(15_000)))
    seen = proxy.header_values("x-amz-expected-bucket-owner")
    operations = {operation for operation, _ in seen}
    assert {"HeadBucket", "PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"} <= operations
    assert all(value == OWNER for _, value in seen)


async def test_the_expected_bucket_owner_is_on_the_abort_too(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "refuse", status=500, code="InternalError"))
    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, expected_bucket_owner=OWNER)
    client = ClientSettings(endpoint_url=proxy.url, max_attempts=1)
    with pytest.raises(ClientError):
        await AsyncS3Sink(bucket, "owned", client=client, settings=settings).write(
            "aborted", list(synthetic_detections(15_000))
        )
    assert ("AbortMultipartUpload", OWNER) in proxy.header_values("x-amz-expected-bucket-owner")
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


async def test_without_an_expected_owner_no_such_header_is_sent(proxy: FaultProxy, bucket: str) -> None:
    assert await AsyncS3Sink(bucket, "any", client=ClientSettings(endpoint_url=proxy.url)).write("image", [])
    assert {value for _, value in proxy.header_values("x-amz-expected-bucket-owner")} == {None}


@pytest.mark.parametrize("count", [10, 15_000], ids=["put", "multipart"])
async def test_sse_s3_encrypts_the_object(bucket: str, s3: Any, count: int) -> None:
    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, server_side_encryption="AES256")
    result = await AsyncS3Sink(bucket, "sse", settings=settings).write_with_result("image", synthetic_detections(count))
    assert s3.head_object(Bucket=bucket, Key=result.key)["ServerSideEncryption"] == "AES256"


@pytest.mark.parametrize("count", [10, 15_000], ids=["put", "multipart"])
async def test_sse_kms_encrypts_the_object_with_the_given_key(bucket: str, s3: Any, count: int) -> None:
    key_id = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
    settings = SinkSettings(
        part_size=5 * MiB, multipart_threshold=5 * MiB, server_side_encryption="aws:kms", sse_kms_key_id=key_id
    )
    result = await AsyncS3Sink(bucket, "kms", settings=settings).write_with_result("image", synthetic_detections(count))
    head = s3.head_object(Bucket=bucket, Key=result.key)
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == key_id
