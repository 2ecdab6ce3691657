"""Sinks that write GeoJSON detection results to Amazon S3."""

from __future__ import annotations

from model_runner.sink.async_s3_sink import AsyncS3Sink
from model_runner.sink.clients import close_shared_clients
from model_runner.sink.exceptions import (
    ChecksumMismatchError,
    FeatureEncodingError,
    InvalidAssumedRoleException,
    ObjectExistsError,
    SinkError,
)
from model_runner.sink.metrics import OpenTelemetryMetrics, SinkMetrics
from model_runner.sink.results import WriteResult
from model_runner.sink.s3_sink import S3Sink
from model_runner.sink.settings import ClientSettings, SinkSettings
from model_runner.sink.sink import AsyncSink, Sink
from model_runner.sink.writer import AsyncSinkWriter, SinkWriter

__all__ = [
    "AsyncS3Sink",
    "AsyncSink",
    "AsyncSinkWriter",
    "ChecksumMismatchError",
    "ClientSettings",
    "FeatureEncodingError",
    "InvalidAssumedRoleException",
    "ObjectExistsError",
    "OpenTelemetryMetrics",
    "S3Sink",
    "Sink",
    "SinkError",
    "SinkMetrics",
    "SinkSettings",
    "SinkWriter",
    "WriteResult",
    "close_shared_clients",
]
