"""
What a contender is, and this project's two: ``AsyncS3Sink`` awaited, ``S3Sink`` through ``asyncio.to_thread``.

This module imports the sink and nothing heavier, so that a cold measurement of the sink loads before its clock
only what a service importing the sink loads. The seed and the floors are in :mod:`benchmarks.baselines`, the
peers in :mod:`benchmarks.peers`; :mod:`benchmarks.child` maps each key to its module.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, ClassVar

from benchmarks.results import WriteFigures
from model_runner.sink import AsyncS3Sink, S3Sink, SinkSettings
from model_runner.sink.results import WriteResult

__all__ = [
    "IMAGE_ID",
    "WARM_UP",
    "AsyncSinkContender",
    "Contender",
    "FacadeContender",
    "Job",
    "SequenceSinkContender",
    "WriterContender",
]

# The image id's last segment names the object, as in the seed; a uuid prefix like the model runner's job ids.
IMAGE_ID = "2b5f7c4e-0d1a-4c6e-9a8b-3f2e1d0c9b8a:s3://imagery/{name}.tif"
# Warm-up objects land beside the measured ones under names starting with this; the harness does not count them.
WARM_UP = "warm-up"

Job = tuple[str, Any]

_TINY = [
    {"type": "Feature", "id": str(i), "geometry": {"type": "Point", "coordinates": [0.0, 0.0]}, "properties": {}}
    for i in range(3)
]


class Contender(ABC):
    """
    One way of writing collections, driven from the measured loop; an async context manager.

    :param bucket: The bucket.
    :param prefix: The key prefix of the measured writes.
    """

    key: ClassVar[str] = ""
    #: How the measured loop calls it: ``await``, ``to_thread`` or ``direct`` (a blocking call on the loop).
    call_mode: ClassVar[str] = "await"

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix
        # This project's sinks keep the WriteResults of their last run here.
        self.results: list[WriteResult] = []
        # What a contender opens in __aenter__ (clients, sessions), closed by __aexit__.
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Contender:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def mode(self, writes: int) -> str:
        """
        How the measured loop calls this contender for a workload.

        :param writes: Writes in the workload.
        :return: ``await``, ``to_thread`` or ``direct``.
        """
        return self.call_mode

    @classmethod
    def prepare(cls, features: Iterable[Any]) -> Any:
        """
        Turn a collection's features into what this contender writes, before the clock starts.

        :param features: A list, or a generator for streamed workloads.
        :return: The payload of one write.
        """
        return features

    async def warm_up(self, writes: int) -> None:
        """
        Write tiny collections concurrently, as the measured writes will run: client made, worker threads and
        executor started, as in a service that has been writing for a while.

        :param writes: How many.
        """
        await self.run([(IMAGE_ID.format(name=f"{WARM_UP}-{i:04d}"), self.prepare(_TINY)) for i in range(writes)])

    def write_figures(self) -> WriteFigures | None:
        """
        The last run's figures as the contender's own ``WriteResult`` objects give them.

        :return: The figures, or `None` for a contender that returns no ``WriteResult``.
        """
        if not self.results:
            return None
        results = self.results
        return WriteFigures(
            writes=len(results),
            seconds=max(result.seconds for result in results),
            upload_seconds=max(result.upload_seconds for result in results),
            encode_seconds=sum(result.encode_seconds for result in results),
            bytes=sum(result.bytes for result in results),
            features=sum(result.features for result in results),
            parts=sum(result.parts for result in results),
            retries=sum(result.retries for result in results),
        )

    @abstractmethod
    async def run(self, jobs: list[Job]) -> int:
        """
        Write every job's collection, concurrently when there are several.

        :param jobs: ``(image id, payload)`` pairs.
        :return: Bytes stored.
        """


class AsyncSinkContender(Contender):
    """:class:`AsyncS3Sink`, awaited; with default settings unless a subclass sets ``settings``."""

    key = "AsyncS3Sink"
    settings: ClassVar[SinkSettings | None] = None

    def __init__(self, bucket: str, prefix: str) -> None:
        super().__init__(bucket, prefix)
        self.sink = (
            AsyncS3Sink(bucket, prefix)
            if self.settings is None
            else AsyncS3Sink(bucket, prefix, settings=self.settings)
        )

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.sink.aclose()

    async def run(self, jobs: list[Job]) -> int:
        """
        Write the collections.

        :param jobs: ``(image id, features)`` pairs.
        :return: Bytes stored.
        """
        self.results = await asyncio.gather(*(self.sink.write_with_result(*job) for job in jobs))
        return sum(result.bytes for result in self.results)


class SequenceSinkContender(AsyncSinkContender):
    """:class:`AsyncS3Sink` writing GeoJSON text sequences (``output_format="geojsonseq"``)."""

    key = "AsyncS3Sink-seq"
    settings = SinkSettings(output_format="geojsonseq")


class WriterContender(AsyncSinkContender):
    """:meth:`AsyncS3Sink.open`: each collection added in 240 batches from 8 tasks, as a model runner adds tiles."""

    key = "AsyncS3Sink.open"
    batches: ClassVar[int] = 240
    tasks: ClassVar[int] = 8

    async def run(self, jobs: list[Job]) -> int:
        """
        Write each collection through an open writer.

        :param jobs: ``(image id, features)`` pairs.
        :return: Bytes stored.
        """
        self.results = await asyncio.gather(*(self._write(image_id, features) for image_id, features in jobs))
        return sum(result.bytes for result in self.results)

    async def _write(self, image_id: str, features: list[Any]) -> WriteResult:
        size = -(-len(features) // self.batches)
        tiles = [features[start : start + size] for start in range(0, len(features), size)]
        async with self.sink.open(image_id) as writer:

            async def add(task: int) -> None:
                for tile in tiles[task :: self.tasks]:
                    await writer.add(tile)

            await asyncio.gather(*(add(task) for task in range(self.tasks)))
        assert writer.result is not None
        return writer.result


class FacadeContender(Contender):
    """The :class:`S3Sink` facade with default settings, through ``asyncio.to_thread`` (default executor)."""

    key = "S3Sink"
    call_mode = "to_thread"

    def __init__(self, bucket: str, prefix: str) -> None:
        super().__init__(bucket, prefix)
        self.sink = S3Sink(bucket, prefix)

    async def run(self, jobs: list[Job]) -> int:
        """
        Write the collections.

        :param jobs: ``(image id, features)`` pairs.
        :return: Bytes stored.
        """
        write = self.sink.write_with_result
        self.results = await asyncio.gather(*(asyncio.to_thread(write, *job) for job in jobs))
        return sum(result.bytes for result in self.results)


CONTENDERS: dict[str, type[Contender]] = {
    kind.key: kind for kind in (AsyncSinkContender, SequenceSinkContender, WriterContender, FacadeContender)
}
