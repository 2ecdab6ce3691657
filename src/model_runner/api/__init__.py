"""Enumerations shared by every sink."""

from __future__ import annotations

from enum import Enum

__all__ = ["SinkMode", "SinkType"]


class SinkMode(str, Enum):
    """How a sink receives features: all of an image's at once, or as they are produced."""

    AGGREGATE = "AGGREGATE"
    STREAMING = "STREAMING"


class SinkType(str, Enum):
    """The kinds of sink a model runner can write to."""

    S3 = "S3"
    KINESIS = "Kinesis"
