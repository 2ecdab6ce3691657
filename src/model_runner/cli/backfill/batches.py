"""
The backfill's batches for Dask: the files cut into batches of about equal bytes, and the task that writes a batch on
a worker, on an event loop and a sink of its own.
"""

from __future__ import annotations

import heapq
import importlib
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import anyio

from model_runner.cli.backfill.cleanup import abort_uploads
from model_runner.cli.backfill.sources import Outcome, Source
from model_runner.cli.backfill.writes import BackfillError, Target, quiet_sink_errors, run_sources
from model_runner.sink.async_s3_sink import object_key

__all__ = ["balanced_batches", "import_distributed", "object_keys", "run_batch"]

logger = logging.getLogger(__name__)


def balanced_batches(sources: Sequence[Source], count: int) -> list[list[Source]]:
    """
    Split files into batches of about equal bytes: each file, largest first, goes to the lightest batch.

    :param sources: The files.
    :param count: How many batches at most.
    :return: The non-empty batches.
    """
    heap: list[tuple[int, int, list[Source]]] = [(0, index, []) for index in range(min(count, len(sources)))]
    for source in sorted(sources, key=lambda source: source.size, reverse=True):
        size, index, batch = heapq.heappop(heap)
        batch.append(source)
        heapq.heappush(heap, (size + source.size, index, batch))
    return [batch for _, _, batch in sorted(heap, key=lambda entry: entry[1])]


def import_distributed() -> Any:
    """
    Import distributed, which only ``--dask`` needs.

    :return: The module, untyped.
    :raises BackfillError: If the dask extra is not installed.
    """
    try:
        return importlib.import_module("distributed")
    except ImportError:
        raise BackfillError("--dask needs the dask extra: pip install 'model-runner-sink[dask]'") from None


def object_keys(target: Target, sources: Sequence[Source]) -> list[str]:
    """
    The keys files are written to.

    :param target: Where they are written.
    :param sources: The files.
    :return: Their keys, in order.
    """
    return [object_key(target.prefix, source.image_id, target.output_format) for source in sources]


async def _write_batch(
    sources: Sequence[Source], target: Target, report: Callable[[Outcome], object], stop: Any, rerun: bool
) -> None:
    if rerun:
        # A scheduler that allows it runs a batch again when its worker died mid-batch: the uploads that worker
        # was writing are in progress still, and nothing else of this job writes these keys.
        for problem in await abort_uploads(target, object_keys(target, sources)):
            logger.error("%s", problem)
    await run_sources(sources, target, report, stop=stop)


def run_batch(
    sources: Sequence[Source], target: Target, stop_event: str | None = None, started_event: str | None = None
) -> list[Outcome]:
    """
    Write a batch of files on a dask worker, on an event loop and a sink of its own.

    :param sources: The files, readable from the worker.
    :param target: Where and how to write.
    :param stop_event: Name of a ``distributed.Event`` that, once set, stops the batch.
    :param started_event: Name of a ``distributed.Event`` the batch sets when it starts; finding it set already,
        the batch knows it runs again after its worker died, and first aborts the uploads left under its keys.
    :return: The outcome of each file done.
    """
    outcomes: list[Outcome] = []
    stop = None
    rerun = False
    if stop_event is not None or started_event is not None:
        distributed = import_distributed()
        client = distributed.get_client()
        if stop_event is not None:
            stop = distributed.Event(stop_event, client=client).wait
        if started_event is not None:
            started = distributed.Event(started_event, client=client)
            rerun = started.is_set()
            started.set()
    with quiet_sink_errors():
        anyio.run(partial(_write_batch, sources, target, outcomes.append, stop, rerun))
    return outcomes
