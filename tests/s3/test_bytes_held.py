"""Writes under the multipart threshold count against max_bytes_in_flight as they are encoded, not once whole: 30
concurrent writes sharing a 4 MiB budget hold what its documented bound says, and all are stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
import pytest
from aiobotocore.session import get_session

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink.budget import ByteBudget
from model_runner.sink.clients import SharedClient
from model_runner.sink.encoding import encode_collection
from model_runner.sink.settings import ClientSettings, MiB, SinkSettings
from model_runner.sink.upload import upload_object

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

WRITES = 30


class Holdings:
    """The encoded bytes the writes have taken and not yet given up (by returning), against the budget's count."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held = 0
        self.largest_chunk = 0
        # The most bytes held at once beyond what the budget counts.
        self.most_uncounted = 0

    async def counted(self, chunks: AsyncIterator[memoryview], taken: list[int]) -> AsyncIterator[memoryview]:
        async for chunk in chunks:
            self.held += len(chunk)
            taken[0] += len(chunk)
            self.largest_chunk = max(self.largest_chunk, len(chunk))
            self.most_uncounted = max(self.most_uncounted, self.held - self.budget.used)
            yield chunk


async def test_30_small_writes_sharing_a_4_mib_budget_hold_no_more_than_its_bound(bucket: str, s3: Any) -> None:
    settings = SinkSettings()
    limit = ClientSettings(max_bytes_in_flight=4 * MiB).max_bytes_in_flight
    budget = ByteBudget(limit)
    holdings = Holdings(budget)
    collections = {f"image-{i}": list(synthetic_detections(5000, seed=i)) for i in range(WRITES)}

    async def write(shared: SharedClient, image_id: str) -> None:
        taken = [0]
        chunks = holdings.counted(encode_collection(collections[image_id]), taken)
        await upload_object(shared, bucket, f"held/{image_id}.geojson", chunks, settings)
        holdings.held -= taken[0]

    async with get_session().create_client("s3") as client, anyio.create_task_group() as group:
        shared = SharedClient(client, budget=budget, limiter=anyio.CapacityLimiter(ClientSettings().max_worker_threads))
        for image_id in collections:
            group.start_soon(write, shared, image_id)

    for image_id, features in collections.items():
        stored = s3.get_object(Bucket=bucket, Key=f"held/{image_id}.geojson")["Body"].read()
        assert stored == orjson.dumps({"type": "FeatureCollection", "features": features})
    body = len(stored)
    assert limit < 2 * body < settings.multipart_threshold
    # Each write holds, besides what the budget counts, at most the one chunk it is waiting with.
    assert holdings.most_uncounted <= WRITES * holdings.largest_chunk
    # The documented bound: the limit plus one body, under the threshold here, and one chunk.
    assert budget.peak <= limit + settings.multipart_threshold + holdings.largest_chunk
    assert budget.used == 0
