"""The abstract sinks: what a model runner can write detections to."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Iterable
from typing import Any

from model_runner.api import SinkMode

__all__ = ["AsyncSink", "Sink"]


class _SinkIdentity(ABC):
    @staticmethod
    @abstractmethod
    def name() -> str:
        """
        Retrieve the name of the sink type.

        :return: The string representation of the sink type.
        """

    @property
    @abstractmethod
    def mode(self) -> SinkMode:
        """
        The mode of the sink.

        :return: The `SinkMode` of this sink.
        """

    def __str__(self) -> str:
        return f"{self.name()} {self.mode.value}"


class Sink(_SinkIdentity):
    """A destination for the features detected in one image, written from synchronous code."""

    @abstractmethod
    def write(self, image_id: str, features: Iterable[Any]) -> bool:
        """
        Write the features detected in one image.

        :param image_id: The identifier of the image.
        :param features: The GeoJSON features detected in the image.
        :return: `True` if the features were stored, `False` otherwise.
        """


class AsyncSink(_SinkIdentity):
    """A destination for the features detected in one image, written from asyncio."""

    @abstractmethod
    async def write(self, image_id: str, features: Iterable[Any] | AsyncIterable[Any]) -> bool:
        """
        Write the features detected in one image.

        :param image_id: The identifier of the image.
        :param features: The GeoJSON features detected in the image.
        :return: `True` if the features were stored, `False` otherwise.
        """
