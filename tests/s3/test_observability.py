"""What a write tells as it goes and when it ends: WriteResult, progress, metadata, metrics hooks and logs."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, OpenTelemetryMetrics, S3Sink, SinkMetrics, SinkSettings, WriteResult
from model_runner.sink.settings import MiB

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

MULTIPART = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
# About 7.6 MB encoded: two parts of 5 MiB.
MULTIPART_COUNT = 15_000


class RecordingMetrics(SinkMetrics):
    """Keeps every hook call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def write_started(self, *args: Any) -> None:
        self.calls.append(("write_started", args))

    def write_finished(self, *args: Any) -> None:
        self.calls.append(("write_finished", args))

    def write_failed(self, *args: Any) -> None:
        self.calls.append(("write_failed", args))

    def part_uploaded(self, *args: Any) -> None:
        self.calls.append(("part_uploaded", args))

    def request_retried(self, *args: Any) -> None:
        self.calls.append(("request_retried", args))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


async def test_write_result_holds_every_figure_a_harness_needs(bucket: str, s3: Any) -> None:
    result = await AsyncS3Sink(bucket, "figures", settings=MULTIPART).write_with_result(
        "image", synthetic_detections(MULTIPART_COUNT)
    )
    head = s3.head_object(Bucket=bucket, Key="figures/image.geojson", ChecksumMode="ENABLED")
    assert (result.bucket, result.key) == (bucket, "figures/image.geojson")
    assert result.bytes == head["ContentLength"]
    assert result.features == MULTIPART_COUNT
    assert result.parts == 2
    assert result.etag == head["ETag"]
    assert 0 < result.encode_seconds < result.seconds
    assert 0 < result.upload_seconds < result.seconds
    assert result.megabytes_per_second == pytest.approx(result.bytes / 1e6 / result.seconds)


@pytest.mark.parametrize(("count", "parts"), [(10, 0), (MULTIPART_COUNT, 2)], ids=["put", "multipart"])
async def test_progress_grows_to_the_result(bucket: str, count: int, parts: int) -> None:
    seen: list[tuple[int, int]] = []
    result = await AsyncS3Sink(bucket, "progress", settings=MULTIPART).write_with_result(
        "image", synthetic_detections(count), on_progress=lambda done, features: seen.append((done, features))
    )
    assert result.parts == parts
    # One call per stored part, then one when the object is stored.
    assert len(seen) == parts + 1
    assert seen == sorted(seen)
    assert seen[-1] == (result.bytes, result.features)
    if parts:
        # Either part may be stored first.
        first_bytes, first_features = seen[0]
        assert first_bytes in {5 * MiB, result.bytes - 5 * MiB}
        # The features counted are those of the encoded batches within as many bytes as are stored: never more.
        per_feature = result.bytes / result.features
        assert 0 < first_features <= first_bytes / per_feature * 1.05


async def test_a_progress_callback_that_raises_fails_the_write_and_stores_nothing(bucket: str, s3: Any) -> None:
    def stop(done: int, features: int) -> None:
        raise RuntimeError("user pressed stop")

    with pytest.raises(RuntimeError, match="user pressed stop"):
        await AsyncS3Sink(bucket, "stopped", settings=MULTIPART).write(
            "image", synthetic_detections(MULTIPART_COUNT), on_progress=stop
        )
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


async def test_a_progress_callback_failing_once_the_object_is_stored_does_not_fail_the_write(
    bucket: str, s3: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def break_at_the_end(done: int, features: int) -> None:
        if features == 3:
            raise RuntimeError("progress bar closed")

    with caplog.at_level(logging.WARNING, logger="model_runner.sink.s3_sink"):
        result = await AsyncS3Sink(bucket, "late").write_with_result(
            "image", synthetic_detections(3), on_progress=break_at_the_end
        )
    assert s3.head_object(Bucket=bucket, Key=result.key)["ContentLength"] == result.bytes
    assert any("on_progress failed" in record.getMessage() for record in caplog.records)


async def test_an_encoding_failure_is_logged_with_the_feature_index(
    bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    features = [*synthetic_detections(2), {"type": "Feature", "properties": {"bad": {1}}}]
    with caplog.at_level(logging.ERROR, logger="model_runner.sink.s3_sink"), pytest.raises(TypeError):
        await AsyncS3Sink(bucket, "bad").write("image", features)
    (record,) = caplog.records
    assert "FeatureEncodingError" in record.getMessage()
    assert "feature 2" in record.getMessage()


@pytest.mark.parametrize("count", [10, MULTIPART_COUNT], ids=["put", "multipart"])
async def test_metadata_is_stored_with_the_object_and_read_back(bucket: str, s3: Any, count: int) -> None:
    sink = AsyncS3Sink(bucket, "meta", settings=MULTIPART)
    assert await sink.object_metadata("image") is None
    assert await sink.write("image", synthetic_detections(count), metadata={"source-sha256": "ab" * 32})
    assert s3.head_object(Bucket=bucket, Key="meta/image.geojson")["Metadata"] == {"source-sha256": "ab" * 32}
    assert await sink.object_metadata("image") == {"source-sha256": "ab" * 32}


async def test_metrics_hooks_follow_a_write(bucket: str) -> None:
    metrics = RecordingMetrics()
    sink = AsyncS3Sink(bucket, "hooks", settings=MULTIPART, metrics=metrics)
    result = await sink.write_with_result("image", synthetic_detections(MULTIPART_COUNT))
    assert metrics.names() == ["write_started", "part_uploaded", "part_uploaded", "write_finished"]
    assert metrics.calls[0][1] == (bucket, "hooks/image.geojson")
    stored_parts = sorted(args[2:] for name, args in metrics.calls if name == "part_uploaded")
    assert [number for number, _ in stored_parts] == [1, 2]
    assert sum(size for _, size in stored_parts) == result.bytes
    assert metrics.calls[-1][1] == (result,)


async def test_a_failed_write_is_told_to_the_hooks_with_its_error(bucket: str) -> None:
    metrics = RecordingMetrics()
    sink = AsyncS3Sink(bucket, "hooks", metrics=metrics)
    with pytest.raises(TypeError):
        await sink.write("image", [{"type": "Feature", "properties": {"bad": {1}}}])
    assert metrics.names() == ["write_started", "write_failed"]
    failed_bucket, failed_key, error, seconds = metrics.calls[1][1]
    assert (failed_bucket, failed_key) == (bucket, "hooks/image.geojson")
    assert type(error).__name__ == "FeatureEncodingError"
    assert seconds > 0


async def test_a_hook_that_raises_never_fails_the_write(bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(SinkMetrics):
        def write_finished(self, result: WriteResult) -> None:
            raise RuntimeError("exporter down")

    with caplog.at_level(logging.WARNING, logger="model_runner.sink.s3_sink"):
        assert await AsyncS3Sink(bucket, "broken", metrics=Broken()).write("image", synthetic_detections(3))
    assert any("write_finished" in record.getMessage() for record in caplog.records)


def test_the_facade_passes_progress_metadata_and_metrics_through(bucket: str, s3: Any) -> None:
    metrics = RecordingMetrics()
    seen: list[tuple[int, int]] = []
    sink = S3Sink(bucket, "facade", settings=MULTIPART, metrics=metrics)
    result = sink.write_with_result(
        "image",
        synthetic_detections(MULTIPART_COUNT),
        metadata={"run": "7"},
        on_progress=lambda done, features: seen.append((done, features)),
    )
    assert seen[-1] == (result.bytes, MULTIPART_COUNT)
    assert metrics.names()[-1] == "write_finished"
    assert s3.head_object(Bucket=bucket, Key=result.key)["Metadata"] == {"run": "7"}
    assert sink.write("other", [], metadata={"run": "8"}) is True


async def test_opentelemetry_metrics_count_writes_bytes_and_failures(bucket: str, missing_bucket: str) -> None:
    reader = InMemoryMetricReader()
    metrics = OpenTelemetryMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
    result = await AsyncS3Sink(bucket, "otel", settings=MULTIPART, metrics=metrics).write_with_result(
        "image", synthetic_detections(MULTIPART_COUNT)
    )
    assert await AsyncS3Sink(missing_bucket, "otel", metrics=metrics).write("image", []) is False

    points: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for scope in data.resource_metrics[0].scope_metrics:
        for metric in scope.metrics:
            points[metric.name] = list(metric.data.data_points)
    writes = {point.attributes["outcome"]: point for point in points["model_runner.sink.writes"]}
    assert writes["stored"].value == 1
    assert writes["failed"].value == 1
    assert writes["failed"].attributes["error.type"] == "404"  # HeadBucket answers with no body
    assert [point.value for point in points["model_runner.sink.bytes"]] == [result.bytes]
    assert [point.value for point in points["model_runner.sink.features"]] == [MULTIPART_COUNT]
    assert [point.value for point in points["model_runner.sink.parts"]] == [2]
    assert {point.value for point in points["model_runner.sink.writes.active"]} == {0}
    assert sum(point.count for point in points["model_runner.sink.write.duration"]) == 2


async def test_a_write_logs_one_debug_line_with_its_figures(bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="model_runner.sink.s3_sink"):
        result = await AsyncS3Sink(bucket, "logged").write_with_result("image", synthetic_detections(7))
    lines = [record for record in caplog.records if record.name == "model_runner.sink.s3_sink"]
    assert len(lines) == 1
    record: Any = lines[0]
    assert record.levelno == logging.DEBUG
    assert (record.bucket, record.key, record.bytes, record.features) == (bucket, result.key, result.bytes, 7)
    assert record.seconds == result.seconds
    # Never the features themselves.
    assert "Feature" not in record.getMessage()
