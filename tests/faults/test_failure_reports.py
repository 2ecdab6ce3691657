"""What operators see when S3 misbehaves: retries told to the metrics hooks, failures logged with code and id."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
from botocore.exceptions import ClientError
from support.proxy import FaultProxy, Rule

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ClientSettings, SinkMetrics, SinkSettings
from model_runner.sink.settings import MiB

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

MULTIPART = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)


class Retries(SinkMetrics):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def request_retried(self, bucket: str, key: str, operation: str, retries: int) -> None:
        self.seen.append((operation, retries))


@pytest.mark.parametrize(("count", "operation"), [(10, "PutObject"), (15_000, "UploadPart")], ids=["put", "multipart"])
async def test_retried_requests_reach_the_hooks_and_the_result(
    proxy: FaultProxy, bucket: str, count: int, operation: str
) -> None:
    proxy.add_rule(Rule({operation}, "slowdown", times=1))
    metrics = Retries()
    sink = AsyncS3Sink(
        bucket, "retried", client=ClientSettings(endpoint_url=proxy.url), settings=MULTIPART, metrics=metrics
    )
    result = await sink.write_with_result("image", synthetic_detections(count))
    assert metrics.seen == [(operation, 1)]
    assert result.retries == 1


async def test_retries_of_a_request_that_failed_at_last_are_told_too(proxy: FaultProxy, bucket: str) -> None:
    proxy.add_rule(Rule({"PutObject"}, "refuse", status=503, code="SlowDown"))
    metrics = Retries()
    client = ClientSettings(endpoint_url=proxy.url, max_attempts=3)
    sink = AsyncS3Sink(bucket, "retried", client=client, metrics=metrics)
    with pytest.raises(ClientError):
        await sink.write("image", synthetic_detections(3))
    assert metrics.seen == [("PutObject", 2)]


async def test_a_failed_write_is_logged_at_error_with_the_s3_code_and_request_id(
    proxy: FaultProxy, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.add_rule(Rule({"PutObject"}, "refuse", status=500, code="InternalError"))
    sink = AsyncS3Sink(bucket, "failed", client=ClientSettings(endpoint_url=proxy.url, max_attempts=1))
    with caplog.at_level(logging.DEBUG), pytest.raises(ClientError) as raised:
        await sink.write("image", synthetic_detections(5))
    request_id = raised.value.response["ResponseMetadata"]["RequestId"]
    assert request_id
    errors: list[Any] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    record = errors[0]
    assert record.name == "model_runner.sink.s3_sink"
    assert (record.bucket, record.key) == (bucket, "failed/image.geojson")
    assert (record.error_code, record.operation, record.request_id) == ("InternalError", "PutObject", request_id)
    assert "InternalError" in record.getMessage()
    assert request_id in record.getMessage()
    ours = [record for record in caplog.records if record.name.startswith("model_runner")]
    everything = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in ours)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in everything
    assert "properties" not in everything
