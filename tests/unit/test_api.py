"""The public surface: the enums, and the documented members of S3Sink and AsyncS3Sink."""

from __future__ import annotations

import inspect
from enum import Enum

import pytest

from model_runner.api import SinkMode, SinkType
from model_runner.sink import AsyncS3Sink, AsyncSink, ClientSettings, S3Sink, Sink, SinkSettings
from model_runner.sink import s3_sink as s3_sink_module

pytestmark = pytest.mark.timeout(30)

ROLE_ARN = "arn:aws:iam::123456789012:role/model-runner-writer"


def test_sink_mode_members() -> None:
    assert [member.name for member in SinkMode] == ["AGGREGATE", "STREAMING"]
    assert SinkMode.AGGREGATE.value == "AGGREGATE"
    assert SinkMode.STREAMING.value == "STREAMING"


def test_sink_type_members() -> None:
    assert [member.name for member in SinkType] == ["S3", "KINESIS"]
    assert SinkType.S3.value == "S3"
    assert SinkType.KINESIS.value == "Kinesis"


@pytest.mark.parametrize("enum", [SinkMode, SinkType])
def test_enums_are_str_enums(enum: type[Enum]) -> None:
    assert issubclass(enum, str)
    assert issubclass(enum, Enum)
    for member in enum:
        assert isinstance(member, str)
        assert member == member.value
        assert enum(member.value) is member


def test_enums_compare_equal_to_their_values() -> None:
    assert SinkMode.AGGREGATE == "AGGREGATE"
    assert SinkType.KINESIS == "Kinesis"
    assert SinkType.KINESIS != "KINESIS"
    with pytest.raises(ValueError):
        SinkType("KINESIS")


def test_sinks_implement_the_abstract_sinks() -> None:
    assert issubclass(S3Sink, Sink)
    assert issubclass(AsyncS3Sink, AsyncSink)
    assert inspect.iscoroutinefunction(AsyncS3Sink.write)
    assert inspect.iscoroutinefunction(AsyncS3Sink.validate_s3_bucket)
    assert not inspect.iscoroutinefunction(S3Sink.write)
    assert not inspect.iscoroutinefunction(S3Sink.validate_s3_bucket)


def test_abstract_sinks_cannot_be_instantiated() -> None:
    with pytest.raises(TypeError):
        Sink()  # type: ignore[abstract]
    with pytest.raises(TypeError):
        AsyncSink()  # type: ignore[abstract]


@pytest.mark.parametrize("sink_class", [S3Sink, AsyncS3Sink])
def test_attributes(sink_class: type[S3Sink] | type[AsyncS3Sink]) -> None:
    sink = sink_class("results-bucket", "detections/run-1")
    assert sink.bucket == "results-bucket"
    assert sink.prefix == "detections/run-1"
    assert sink.assumed_role is None


@pytest.mark.parametrize("sink_class", [S3Sink, AsyncS3Sink])
def test_assumed_role_is_the_third_positional_argument(sink_class: type[S3Sink] | type[AsyncS3Sink]) -> None:
    sink = sink_class("results-bucket", "out", ROLE_ARN)
    assert sink.assumed_role == ROLE_ARN


@pytest.mark.parametrize("sink_class", [S3Sink, AsyncS3Sink])
def test_mode_name_and_str(sink_class: type[S3Sink] | type[AsyncS3Sink]) -> None:
    sink = sink_class("results-bucket", "out")
    assert sink.mode is SinkMode.AGGREGATE
    assert sink.name() == "S3"
    assert sink.name() == SinkType.S3.value
    assert str(sink) == "S3 AGGREGATE"


@pytest.mark.parametrize("sink_class", [S3Sink, AsyncS3Sink])
def test_name_is_static(sink_class: type[S3Sink] | type[AsyncS3Sink]) -> None:
    assert isinstance(inspect.getattr_static(sink_class, "name"), staticmethod)
    assert sink_class.name() == "S3"


@pytest.mark.parametrize("sink_class", [S3Sink, AsyncS3Sink])
def test_mode_is_a_property(sink_class: type[S3Sink] | type[AsyncS3Sink]) -> None:
    assert isinstance(inspect.getattr_static(sink_class, "mode"), property)


@pytest.mark.parametrize("sink_class", [S3Sink, AsyncS3Sink])
def test_settings_default_and_given(sink_class: type[S3Sink] | type[AsyncS3Sink]) -> None:
    assert sink_class("results-bucket", "out").settings == SinkSettings()
    # The facade's private loop thread is busy beside its worker threads: one of them is its default.
    assert sink_class("results-bucket", "out").client.max_worker_threads == (1 if sink_class is S3Sink else 2)
    given = ClientSettings(max_worker_threads=3)
    assert sink_class("results-bucket", "out", client=given).client.max_worker_threads == 3
    custom = SinkSettings(acl=None, content_type="application/json")
    assert sink_class("results-bucket", "out", settings=custom).settings is custom


@pytest.mark.parametrize("sink_class", [S3Sink, AsyncS3Sink])
@pytest.mark.parametrize("bad_bucket", ["", "has space", "slash/in/name", "x" * 256])
def test_invalid_bucket_name_is_refused_at_construction(
    sink_class: type[S3Sink] | type[AsyncS3Sink], bad_bucket: str
) -> None:
    with pytest.raises(ValueError):
        sink_class(bad_bucket, "out")


@pytest.mark.parametrize("sink_class", [S3Sink, AsyncS3Sink])
def test_prefix_must_be_a_string(sink_class: type[S3Sink] | type[AsyncS3Sink]) -> None:
    with pytest.raises(TypeError):
        sink_class("results-bucket", None)  # type: ignore[arg-type]


def test_default_settings() -> None:
    settings = SinkSettings()
    assert settings.acl == "bucket-owner-full-control"
    assert settings.content_type is None  # by format
    assert settings.output_format == "geojson"
    assert settings.effective_content_type == "application/geo+json"
    assert settings.multipart_threshold == 8 * 1024 * 1024


def test_s3_sink_module_logger() -> None:
    assert s3_sink_module.logger.name == "model_runner.sink.s3_sink"
    assert "logger" in s3_sink_module.__all__
