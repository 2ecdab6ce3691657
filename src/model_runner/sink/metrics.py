"""Metrics hooks the sinks call as writes go, and a ready adapter for OpenTelemetry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model_runner.sink.responses import error_code
from model_runner.sink.results import WriteResult

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter

__all__ = ["OpenTelemetryMetrics", "SinkMetrics"]


class SinkMetrics:
    """
    What a sink tells about its writes. Subclass it and override the hooks you need; the others do nothing.

    Hooks are called on the sink's event loop thread, so they must be quick and must not block. An exception
    raised by a hook is logged and ignored: metrics never fail a write.
    """

    def write_started(self, bucket: str, key: str) -> None:
        """
        A write began.

        :param bucket: The bucket.
        :param key: The object key.
        """

    def write_finished(self, result: WriteResult) -> None:
        """
        A write stored its object.

        :param result: What the write did.
        """

    def write_failed(self, bucket: str, key: str, error: BaseException, seconds: float) -> None:
        """
        A write failed or was cancelled; nothing was stored.

        :param bucket: The bucket.
        :param key: The object key.
        :param error: Why: a ``ClientError``, a ``FeatureEncodingError``, a cancellation...
        :param seconds: How long the write ran.
        """

    def part_uploaded(self, bucket: str, key: str, part_number: int, size: int) -> None:
        """
        A part of a multipart upload was stored.

        :param bucket: The bucket.
        :param key: The object key.
        :param part_number: The part number, from 1.
        :param size: Its size in bytes.
        """

    def request_retried(self, bucket: str, key: str, operation: str, retries: int) -> None:
        """
        botocore retried an S3 request (throttling, a reset connection, a 5xx); told once the request ended,
        whether it then succeeded or failed.

        :param bucket: The bucket.
        :param key: The object key.
        :param operation: The S3 operation, e.g. ``"UploadPart"``.
        :param retries: How many times it was retried.
        """


def error_type(error: BaseException) -> str:
    """
    A short, bounded label for a failure: the S3 error code of a ``ClientError``, else the exception's class.

    :param error: The failure.
    :return: E.g. ``"SlowDown"``, ``"FeatureEncodingError"``, ``"CancelledError"``.
    """
    return error_code(error) or type(error).__name__


class OpenTelemetryMetrics(SinkMetrics):
    """
    Records writes as OpenTelemetry metrics. Needs ``opentelemetry-api`` (``pip install model-runner-sink[otel]``);
    what the instruments export to is the application's choice of SDK and exporter.

    Instruments, all attributed with ``s3.bucket``:

    - ``model_runner.sink.writes`` (counter, with ``outcome``: ``stored`` or ``failed``, and ``error.type``);
    - ``model_runner.sink.write.duration`` (histogram, s), ``model_runner.sink.write.size`` (histogram, By);
    - ``model_runner.sink.bytes``, ``model_runner.sink.features``, ``model_runner.sink.parts`` (counters);
    - ``model_runner.sink.retries`` (counter, with ``s3.operation``);
    - ``model_runner.sink.writes.active`` (up-down counter).

    :param meter: The meter to create instruments on; by default the global meter provider's for this library.
    :raises ImportError: If ``opentelemetry-api`` is not installed.
    """

    def __init__(self, meter: Meter | None = None) -> None:
        from opentelemetry import metrics

        meter = meter or metrics.get_meter("model_runner.sink")
        self._writes = meter.create_counter("model_runner.sink.writes", unit="{write}", description="Writes ended")
        self._duration = meter.create_histogram(
            "model_runner.sink.write.duration", unit="s", description="Duration of writes"
        )
        self._size = meter.create_histogram("model_runner.sink.write.size", unit="By", description="Objects written")
        self._bytes = meter.create_counter("model_runner.sink.bytes", unit="By", description="Bytes stored")
        self._features = meter.create_counter("model_runner.sink.features", unit="{feature}", description="Features")
        self._parts = meter.create_counter("model_runner.sink.parts", unit="{part}", description="Parts stored")
        self._retries = meter.create_counter("model_runner.sink.retries", unit="{retry}", description="S3 retries")
        self._active = meter.create_up_down_counter(
            "model_runner.sink.writes.active", unit="{write}", description="Writes in progress"
        )

    def write_started(self, bucket: str, key: str) -> None:
        """
        Count the write as active.

        :param bucket: The bucket.
        :param key: The object key.
        """
        self._active.add(1, {"s3.bucket": bucket})

    def write_finished(self, result: WriteResult) -> None:
        """
        Record a stored object.

        :param result: What the write did.
        """
        attributes: dict[str, Any] = {"s3.bucket": result.bucket}
        self._active.add(-1, attributes)
        self._writes.add(1, {**attributes, "outcome": "stored"})
        self._duration.record(result.seconds, attributes)
        self._size.record(result.bytes, attributes)
        self._bytes.add(result.bytes, attributes)
        self._features.add(result.features, attributes)

    def write_failed(self, bucket: str, key: str, error: BaseException, seconds: float) -> None:
        """
        Record a failed write.

        :param bucket: The bucket.
        :param key: The object key.
        :param error: Why it failed.
        :param seconds: How long it ran.
        """
        attributes: dict[str, Any] = {"s3.bucket": bucket}
        self._active.add(-1, attributes)
        self._writes.add(1, {**attributes, "outcome": "failed", "error.type": error_type(error)})
        self._duration.record(seconds, attributes)

    def part_uploaded(self, bucket: str, key: str, part_number: int, size: int) -> None:
        """
        Count a stored part.

        :param bucket: The bucket.
        :param key: The object key.
        :param part_number: The part number.
        :param size: Its size in bytes.
        """
        self._parts.add(1, {"s3.bucket": bucket})

    def request_retried(self, bucket: str, key: str, operation: str, retries: int) -> None:
        """
        Count retries.

        :param bucket: The bucket.
        :param key: The object key.
        :param operation: The S3 operation.
        :param retries: How many times it was retried.
        """
        self._retries.add(retries, {"s3.bucket": bucket, "s3.operation": operation})
